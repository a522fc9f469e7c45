"""SAE architectures: hand-computed encode/decode/losses, TopK sparse path, training hooks."""

import math

import pytest
import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.sae import ARCHITECTURES, SAE, SAEConfig, SparseLatents, get_architecture
from pipeline.sae.standard import StandardSAE
from pipeline.sae.topk import (TopKSAE, _segments, geometric_median, row_topk, topk_training_forward_dense,
                               topk_training_forward_sparse)


def set_params(sae: SAE, **tensors) -> SAE:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(sae, name).copy_(torch.as_tensor(value, dtype=getattr(sae, name).dtype))
    return sae


@pytest.fixture
def standard_hand() -> StandardSAE:
    sae = StandardSAE(SAEConfig("standard", d_in=2, d_sae=3))
    return set_params(
        sae,
        W_enc=[[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]],
        b_enc=[0.0, -1.0, 0.5],
        W_dec=[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
        b_dec=[1.0, 1.0],
    )


@pytest.fixture
def topk_hand() -> TopKSAE:
    sae = TopKSAE(SAEConfig("topk", d_in=2, d_sae=4, k=2))
    return set_params(
        sae,
        W_enc=[[1.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 0.5]],
        b_enc=[0.0, 0.0, 0.0, 0.0],
        W_dec=[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]],
        b_dec=[0.0, 0.0],
    )


X_STANDARD = torch.tensor([[3.0, 2.0], [1.0, 1.0]])
X_TOPK = torch.tensor([[3.0, 1.0], [-1.0, -2.0]])


def test_standard_encode_decode_by_hand(standard_hand):
    f = standard_hand.encode(X_STANDARD)
    # x - b_dec = [2, 1] → pre = [2, 0, 1.5]; [0, 0] → pre = [0, -1, 0.5]
    assert torch.equal(f, torch.tensor([[2.0, 0.0, 1.5], [0.0, 0.0, 0.5]]))
    assert torch.allclose(standard_hand.decode(f), torch.tensor([[4.5, 2.5], [1.5, 1.5]]))
    assert torch.allclose(standard_hand(X_STANDARD), torch.tensor([[4.5, 2.5], [1.5, 1.5]]))


def test_standard_without_b_dec_subtraction(standard_hand):
    standard_hand.cfg.apply_b_dec_to_input = False
    f = standard_hand.encode(torch.tensor([[3.0, 2.0]]))
    assert torch.equal(f, torch.tensor([[3.0, 1.0, 1.5]]))


def test_standard_loss_by_hand(standard_hand):
    out = standard_hand.training_loss(X_STANDARD, sparsity_coefficient=0.1, dead_mask=None)
    # token 1: (3-4.5)² + (2-2.5)² = 2.5; token 2: 0.25 + 0.25 = 0.5
    assert out.mse_loss.item() == pytest.approx(1.5)
    # token 1: 2·1 + 1.5·√2; token 2: 0.5·√2 → mean = 1 + √2
    assert out.sparsity_loss.item() == pytest.approx(1 + math.sqrt(2))
    assert out.loss.item() == pytest.approx(1.5 + 0.1 * (1 + math.sqrt(2)))
    assert out.aux_loss.item() == 0.0
    assert out.loss.requires_grad
    assert torch.equal(SAE.firing_counts(out), torch.tensor([1, 0, 2]))


def test_encode_accepts_leading_dims(standard_hand, topk_hand):
    for sae, x in ((standard_hand, X_STANDARD), (topk_hand, X_TOPK)):
        x3 = torch.stack([x, 2 * x, -x])  # [3, 2, d_in]
        f3 = sae.encode(x3)
        assert f3.shape == (3, 2, sae.cfg.d_sae)
        assert torch.equal(f3.reshape(6, -1), sae.encode(x3.reshape(6, -1)))
        assert sae(x3).shape == x3.shape


def test_topk_encode_by_hand(topk_hand):
    f = topk_hand.encode(X_TOPK)
    # pre = [3, 1, -3, 2] keeps {0, 3}; pre = [-1, -2, 1, -1.5] keeps {2, 0}, ReLU zeroes the -1
    assert torch.equal(f, torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 0.0]]))
    assert torch.allclose(topk_hand.decode(f), torch.tensor([[4.2, 1.6], [-1.0, 0.0]]))


def test_topk_selects_exactly_k():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig("topk", d_in=8, d_sae=32, k=5))
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so ReLU zeroes none of the k
    f = sae.encode(torch.randn(50, 8))
    assert torch.equal((f != 0).sum(-1), torch.full((50,), 5))


@pytest.mark.parametrize("shape, k, ties", [((257, 4608), 32, False), ((64, 2304), 128, False), ((3, 5, 576), 16, False),
                                             ((200, 96), 3, True), ((40, 97), 5, False), ((30, 64), 64, False)])
def test_row_topk_selects_what_torch_topk_selects(shape, k, ties):
    torch.manual_seed(0)
    scores = torch.randint(-4, 5, shape).float() if ties else torch.randn(shape)
    values, indices = row_topk(scores, k)
    reference = scores.topk(k, dim=-1).values  # sorted, descending
    assert values.shape == indices.shape == reference.shape
    assert torch.equal(values.sort(-1, descending=True).values, reference)
    assert torch.equal(scores.gather(-1, indices), values)  # indices point at their values
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all()  # no column twice


def test_row_topk_segments_divide_the_row_and_keep_k_blocks():
    assert _segments(4608, 32) == 12 and _segments(4608, 128) == 6 and _segments(2304, 64) == 6
    assert _segments(97, 5) == 1  # a prime width: plain topk
    assert _segments(4608, 0) == 1 and row_topk(torch.randn(4, 4608), 0)[0].shape == (4, 0)
    with pytest.raises(RuntimeError, match="out of range"):
        row_topk(torch.randn(4, 96), 97)
    assert _segments(64, 64) == 1 and _segments(96, 48) == 1  # fewer than k blocks would be left
    for d, k in ((4608, 16), (2304, 128), (96, 3)):
        s = _segments(d, k)
        assert d % s == 0 and d // s >= k


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_loss_and_auxk_by_hand(topk_hand, sparse):
    topk_hand.use_sparse_kernels = sparse
    out = topk_hand.training_loss(X_TOPK, sparsity_coefficient=0.0, dead_mask=None)
    # token 1: x̂ = [4.2, 1.6] → 1.44 + 0.36; token 2: x̂ = [-1, 0] → 0 + 4
    assert out.mse_loss.item() == pytest.approx(2.9)
    assert out.aux_loss.item() == 0.0
    assert out.loss.item() == pytest.approx(2.9)
    assert torch.equal(SAE.firing_counts(out), torch.tensor([1, 0, 1, 1]))

    dead = torch.tensor([False, True, False, True])
    out = topk_hand.training_loss(X_TOPK, sparsity_coefficient=0.0, dead_mask=dead)
    # k_aux = d_in // 2 = 1. Token 1: dead pre {1: 1, 3: 2} → latent 3, ê = 2·[0.6, 0.8];
    # e = x - x̂ = [-1.2, -0.6]; ||e - ê||² = 2.4² + 2.2² = 10.6.
    # Token 2: dead pre {1: -2, 3: -1.5} → ReLU(-1.5) = 0, ê = 0; e = [0, -2] → 4.
    assert out.aux_loss.item() == pytest.approx(7.3)
    assert out.loss.item() == pytest.approx(2.9 + 7.3 / 32)


def _grads(sae, x, dead, forward):
    sae.zero_grad(set_to_none=True)
    fwd = forward(sae, x, dead)
    loss = (fwd.sae_out - x).pow(2).sum(-1).mean()
    if fwd.aux_recon is not None:
        loss = loss + (fwd.aux_recon - (x - fwd.sae_out).detach()).pow(2).sum(-1).mean()
    loss.backward()
    return fwd, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("apply_b_dec_to_input,rescale", [(True, False), (False, False), (True, True)])
# AuxK branches: dense block with top-k (k_aux=8 < n_dead), dense block without a sort (k_aux ≥
# n_dead), sparse kernels (n_dead > 8·k_aux)
@pytest.mark.parametrize("dead_fraction,k_aux", [(0.0, None), (0.5, None), (0.5, 64), (0.5, 2)])
def test_topk_sparse_path_matches_dense_reference(apply_b_dec_to_input, rescale, dead_fraction, k_aux):
    torch.manual_seed(1)
    cfg = SAEConfig("topk", d_in=16, d_sae=64, k=4, k_aux=k_aux, dtype="float64",
                    apply_b_dec_to_input=apply_b_dec_to_input, rescale_acts_by_decoder_norm=rescale)
    sae = TopKSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if rescale:  # rows of norms 0.2–5 so ranking by h·||W_dec,i|| differs from ranking by h
            sae.W_dec.mul_(torch.exp(torch.empty(64, 1, dtype=torch.float64).uniform_(-1.6, 1.6)))
    x = torch.randn(32, 16, dtype=torch.float64)
    dead = (torch.rand(64) < dead_fraction) if dead_fraction else None
    sparse, g_sparse = _grads(sae, x, dead, topk_training_forward_sparse)
    dense, g_dense = _grads(sae, x, dead, topk_training_forward_dense)
    order_s, order_d = sparse.indices.argsort(-1), dense.indices.argsort(-1)
    assert torch.equal(sparse.indices.gather(-1, order_s), dense.indices.gather(-1, order_d))
    assert torch.allclose(sparse.values.gather(-1, order_s), dense.values.gather(-1, order_d))
    assert torch.allclose(sparse.sae_out, dense.sae_out)
    assert (sparse.aux_recon is None) == (dense.aux_recon is None)
    if dead is not None:
        assert torch.allclose(sparse.aux_recon, dense.aux_recon)
    for name in g_dense:
        assert torch.allclose(g_sparse[name], g_dense[name], atol=1e-10), name
    if not apply_b_dec_to_input:
        assert torch.allclose(g_sparse["b_dec"], g_dense["b_dec"])


def test_topk_training_loss_same_on_both_paths():
    torch.manual_seed(2)
    sae = TopKSAE(SAEConfig("topk", d_in=16, d_sae=64, k=4, dtype="float64"))
    x = torch.randn(20, 16, dtype=torch.float64)
    dead = torch.rand(64) < 0.3
    losses = []
    for sparse in (True, False):
        sae.use_sparse_kernels = sparse
        losses.append(sae.training_loss(x, sparsity_coefficient=0.0, dead_mask=dead))
    assert torch.allclose(losses[0].loss, losses[1].loss)
    assert torch.allclose(losses[0].aux_loss, losses[1].aux_loss)
    dense_latents = losses[0].feature_acts.to_dense()
    assert torch.allclose(dense_latents, sae.encode(x))


def test_parallel_gradient_removal_and_renormalisation():
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig("topk", d_in=8, d_sae=16, k=2))
    sae.W_dec.grad = torch.randn(16, 8)
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(16, 1) + 0.5)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("sparse", [True, False])
def test_topk_rescaled_by_decoder_norm_by_hand(topk_hand, sparse):
    topk_hand.cfg.rescale_acts_by_decoder_norm = True
    topk_hand.use_sparse_kernels = sparse
    with torch.no_grad():
        topk_hand.W_dec[1] = torch.tensor([0.0, 4.0])  # norm 4
    # token 1: h = [3, 1, -3, 2] ranks as h·||W_dec|| = [3, 4, -3, 2] → latents 1 and 0 (not 3);
    # f = [3, 1·4, 0, 0]; x̂ = 3·[1, 0] + 1·[0, 4] = [3, 4]; error² = 0 + 9.
    # token 2: h = [-1, -2, 1, -1.5] ranks as [-1, -8, 1, -1.5] → latents 2 and 0; f = [0, 0, 1, 0];
    # x̂ = [-1, 0]; error² = 0 + 4.
    expected = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(topk_hand.encode(X_TOPK), expected)
    assert torch.allclose(topk_hand(X_TOPK), torch.tensor([[3.0, 4.0], [-1.0, 0.0]]))
    out = topk_hand.training_loss(X_TOPK, sparsity_coefficient=0.0, dead_mask=None)
    assert out.mse_loss.item() == pytest.approx(6.5)
    assert torch.allclose(SparseLatents.to_dense(out.feature_acts), expected)
    # the free decoder is left alone by the optimiser hooks
    topk_hand.W_dec.grad = torch.ones(4, 2)
    topk_hand.before_optimizer_step()
    topk_hand.after_optimizer_step()
    assert torch.equal(topk_hand.W_dec.grad, torch.ones(4, 2))
    assert topk_hand.W_dec[1].norm().item() == pytest.approx(4.0)


@pytest.mark.parametrize("architecture,k", [("topk", 3), ("batchtopk", 3.0)])
def test_fold_decoder_norms_keeps_latents_and_output(tmp_path, architecture, k):
    torch.manual_seed(6)
    cfg = SAEConfig(architecture, d_in=8, d_sae=24, k=k, dtype="float64", rescale_acts_by_decoder_norm=True)
    sae = get_architecture(architecture)(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(24, 1, dtype=torch.float64) * 3 + 0.2)
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_()
        if architecture == "batchtopk":
            sae.topk_threshold.fill_(0.3)
    x = torch.randn(30, 8, dtype=torch.float64)
    latents, recon = sae.encode(x), sae(x)
    assert (latents > 0).any()
    sae.save(tmp_path / "saved")  # saving folds a copy; the live SAE keeps training as it was
    assert sae.cfg.rescale_acts_by_decoder_norm
    loaded = SAE.load(tmp_path / "saved")
    sae.fold_decoder_norms()
    for folded in (sae, loaded):
        assert not folded.cfg.rescale_acts_by_decoder_norm
        assert torch.allclose(folded.W_dec.norm(dim=1), torch.ones(24, dtype=torch.float64))
        assert torch.allclose(folded.encode(x), latents)
        assert torch.allclose(folded(x), recon)


def test_rescale_is_refused_outside_the_topk_family():
    with pytest.raises(ConfigError, match="only for the TopK family"):
        StandardSAE(SAEConfig("standard", d_in=4, d_sae=8, rescale_acts_by_decoder_norm=True))


def test_initialisation():
    torch.manual_seed(4)
    std = StandardSAE(SAEConfig("standard", d_in=8, d_sae=16))
    assert torch.allclose(std.W_dec.norm(dim=1), torch.full((16,), 0.1))
    topk = TopKSAE(SAEConfig("topk", d_in=8, d_sae=16, k=2))
    assert torch.allclose(topk.W_dec.norm(dim=1), torch.ones(16))
    for sae in (std, topk):
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        assert torch.equal(sae.b_enc, torch.zeros(16))
    sample = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0], [100.0, 100.0]])
    s2 = StandardSAE(SAEConfig("standard", d_in=2, d_sae=4))
    s2.initialize_from_activations(sample)
    assert torch.allclose(s2.b_dec, sample.mean(0))
    t2 = TopKSAE(SAEConfig("topk", d_in=2, d_sae=4, k=1))
    t2.initialize_from_activations(sample)
    # optimality of argmin_y Σ||x_i - y||: the unit vectors towards the points sum to zero
    units = (sample - t2.b_dec.detach()) / (sample - t2.b_dec.detach()).norm(dim=1, keepdim=True)
    assert units.sum(0).norm() < 1e-3
    assert t2.b_dec.norm() < 3  # robust to the outlier, unlike the mean (≈ 20.8, 20.8)


def test_geometric_median_of_collinear_points():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geometric_median(points, n_iter=200).item() == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 3)])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_scale(architecture, k, apply_b_dec_to_input):
    torch.manual_seed(5)
    cfg = SAEConfig(architecture, d_in=8, d_sae=24, k=k, dtype="float64", apply_b_dec_to_input=apply_b_dec_to_input)
    sae = get_architecture(architecture)(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    scale = 3.7
    x = torch.randn(10, 8, dtype=torch.float64)
    latents_before = sae.encode(scale * x)
    recon_before = sae(scale * x)
    sae.fold_activation_scale(scale)
    assert torch.allclose(sae.encode(x), latents_before)
    assert torch.allclose(sae(x), recon_before / scale)
    with pytest.raises(ConfigError):
        sae.fold_activation_scale(0.0)


def test_config_round_trip_and_unknown_keys():
    cfg = SAEConfig("topk", d_in=4, d_sae=8, k=2, hook_name="blocks.0.hook_resid_post", metadata={"a": 1})
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["d_sea"] = bad.pop("d_sae")
    with pytest.raises(ConfigError, match="did you mean 'd_sae'"):
        SAEConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="d_in"):
        SAEConfig("topk", d_in=0, d_sae=8, k=2)
    with pytest.raises(ConfigError, match="dtype"):
        SAEConfig("topk", d_in=4, d_sae=8, k=2, dtype="int8")


def test_registry_and_architecture_checks():
    assert {"standard", "topk", "gated"} <= set(ARCHITECTURES)
    assert get_architecture("topk") is TopKSAE
    with pytest.raises(ConfigError, match="did you mean 'topk'"):
        get_architecture("topK")
    with pytest.raises(ConfigError, match="k"):
        TopKSAE(SAEConfig("topk", d_in=4, d_sae=8))
    with pytest.raises(ConfigError, match="no k"):
        StandardSAE(SAEConfig("standard", d_in=4, d_sae=8, k=2))
    with pytest.raises(ConfigError, match="architecture"):
        StandardSAE(SAEConfig("topk", d_in=4, d_sae=8, k=2))


def test_sparse_latents_to_dense():
    latents = SparseLatents(torch.tensor([[2.0, 0.0]]), torch.tensor([[3, 1]]), d_sae=4)
    assert torch.equal(latents.to_dense(), torch.tensor([[0.0, 0.0, 0.0, 2.0]]))


def _standard_step(sae, x, coefficient):
    for p in sae.parameters():
        p.grad = None
    out = sae.training_loss(x, sparsity_coefficient=coefficient)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_standard_sparse_step_matches_the_dense_graph(monkeypatch, apply_b_dec_to_input):
    import pipeline.sae.sparse as sparse_kernels
    import pipeline.sae.standard as standard

    torch.manual_seed(5)
    sae = StandardSAE(SAEConfig("standard", d_in=16, d_sae=64, dtype="float64",
                                apply_b_dec_to_input=apply_b_dec_to_input))
    x = torch.randn(48, 16, dtype=torch.float64)
    with torch.no_grad():  # about 1 latent in 50 active: the sparse path's regime
        sae.b_dec.normal_(std=0.1)
        sae.b_enc.sub_(sae.hidden_pre(x).quantile(0.98))
    calls = []
    monkeypatch.setattr(standard, "decode_active", lambda *a: calls.append(1) or sparse_kernels.decode_active(*a))
    sparse, g_sparse = _standard_step(sae, x, 3.0)
    assert calls, "the step did not take the sparse path"
    sae.use_sparse_kernels = False
    dense, g_dense = _standard_step(sae, x, 3.0)
    assert len(calls) == 1
    assert 0 < (dense.feature_acts > 0).double().mean() <= standard.SPARSE_MAX_DENSITY
    for field in ("loss", "mse_loss", "sparsity_loss"):
        assert torch.allclose(getattr(sparse, field), getattr(dense, field), rtol=1e-12), field
    assert torch.equal(sparse.feature_acts, dense.feature_acts)
    assert torch.allclose(sparse.sae_out, dense.sae_out, rtol=1e-12)
    for name in g_dense:
        assert torch.allclose(g_sparse[name], g_dense[name], rtol=1e-10, atol=1e-14), name


def test_standard_dense_batches_and_ghost_grads_stay_on_the_dense_graph(monkeypatch):
    import pipeline.sae.standard as standard

    monkeypatch.setattr(standard, "decode_active", lambda *a: pytest.fail("sparse path taken"))
    torch.manual_seed(6)
    x = torch.randn(32, 16)
    dense_batch = StandardSAE(SAEConfig("standard", d_in=16, d_sae=64))  # b_enc 0: about half active
    assert (dense_batch.encode(x) > 0).float().mean() > standard.SPARSE_MAX_DENSITY
    _standard_step(dense_batch, x, 1.0)
    ghost = StandardSAE(SAEConfig("standard", d_in=16, d_sae=64, use_ghost_grads=True))
    with torch.no_grad():
        ghost.b_enc.fill_(-5.0)
    _standard_step(ghost, x, 1.0)


@pytest.mark.parametrize("shape", [(4096, 3072), (300, 24), (130, 8), (127, 16), (64, 13), (1, 8)])
def test_firing_counts_count_each_latents_positive_entries(shape):
    from pipeline.sae.base import count_true_per_column

    rng = np.random.default_rng(sum(shape))
    acts = rng.normal(size=shape)
    acts[:, 0] = 1.0  # a column that fires on every row: 4096 is past what one byte can count
    mask = torch.from_numpy(acts > 0)
    expected = torch.tensor([(acts[:, j] > 0).sum() for j in range(shape[1])], dtype=torch.int64)
    assert torch.equal(count_true_per_column(mask), expected)


def test_csr_products_and_the_blocked_transpose_equal_dense_arithmetic():
    from pipeline.sae.sparse import ActiveLatents, csr_mm, transposed

    torch.manual_seed(0)
    dense = torch.randn(300, 130, dtype=torch.float64)
    indices = torch.rand(300, 100).topk(7, dim=-1).indices
    values = torch.rand(300 * 7, dtype=torch.float64)
    active = ActiveLatents.from_topk(indices, 100)
    matrix = torch.zeros(300, 100, dtype=torch.float64)
    matrix[active.rows, active.cols] = values
    assert torch.allclose(csr_mm(active.by_latent(values), dense), matrix.t() @ dense, atol=1e-12)
    m = torch.randn(130, 77)
    assert torch.equal(transposed(m, block=16), m.t()) and transposed(m).is_contiguous()


@pytest.mark.parametrize("shape", [(64, 48), (4, 16, 48)])
def test_the_fused_relu_and_weighted_l1_node_has_autograds_gradients(shape):
    from pipeline.sae.standard import _ReLUWeightedL1

    torch.manual_seed(0)
    h = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    norms = torch.rand(shape[-1], dtype=torch.float64, requires_grad=True)
    W = torch.randn(shape[-1], 5, dtype=torch.float64)

    def plain(h, norms):  # ReLU, decoder-like product and L1 term, as autograd sees them
        f = torch.relu(h)
        return (f @ W).pow(2).sum() + 3.0 * (f @ norms).mean()

    def fused(h, norms):
        f, s = _ReLUWeightedL1.apply(h.clone(), norms)
        return (f @ W).pow(2).sum() + 3.0 * s

    assert torch.allclose(plain(h, norms), fused(h, norms), rtol=1e-14)
    for a, b in zip(torch.autograd.grad(plain(h, norms), (h, norms)), torch.autograd.grad(fused(h, norms), (h, norms))):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
