"""BatchTopK and Matryoshka SAEs: selection, threshold EMA, prefix losses, SAELens parity and export."""

import json
import math

import pytest
import torch

from pipeline.constants import SAE_CFG_FILENAME
from pipeline.errors import ConfigError
from pipeline.sae import SAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, SAEConfig, get_architecture
from pipeline.sae.batchtopk import batch_topk

import sae_lens  # noqa: E402  (a [test] dependency: missing means a broken install, not a skip)

D_IN, D_SAE = 16, 64


def make(architecture="batchtopk", k=3.5, dtype="float64", widths=(8, 24, D_SAE), **kw):
    torch.manual_seed(0)
    extra = {"matryoshka_widths": list(widths)} if architecture == "matryoshka" else {}
    cfg = SAEConfig(architecture, d_in=D_IN, d_sae=D_SAE, k=k, dtype=dtype,
                    hook_name="blocks.2.hook_resid_post", **extra, **kw)
    sae = get_architecture(architecture)(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(std=0.2)
        sae.b_dec.normal_(std=0.5)
    return sae


def tensors(sae, names=("W_enc", "b_enc", "W_dec", "b_dec")):
    return {name: getattr(sae, name).detach().clone() for name in names}


# ------------------------------------------------------------------------------------ batchtopk
@pytest.mark.parametrize("k,batch", [(2, 10), (2.5, 10), (0.3, 7), (0.29, 100)])
def test_batch_topk_keeps_the_int_k_b_largest(k, batch):
    torch.manual_seed(1)
    pre = torch.randn(batch, D_SAE, dtype=torch.float64) + 3.0  # all positive: nothing lost to ReLU
    acts = batch_topk(pre, k)
    n = int(k * batch)  # SAELens's count: 0.29 · 100 = 28.999… → 28
    assert (acts != 0).sum() == n
    cutoff = pre.flatten().sort(descending=True).values[n - 1]
    assert torch.equal(acts, torch.where(pre >= cutoff, pre, torch.zeros_like(pre)))
    # ReLU first: when fewer than n entries are positive, the rest of the n are zeros, not negatives
    mostly_negative = torch.randn(batch, D_SAE, dtype=torch.float64) - 2.5
    selected = batch_topk(mostly_negative, k)
    assert (selected >= 0).all()
    assert (selected > 0).sum() == min(n, int((mostly_negative > 0).sum()))
    with pytest.raises(ValueError, match="ceil"):
        batch_topk(pre[:1], 0.5)


def test_batch_topk_matches_sae_lens():
    from sae_lens.saes.batchtopk_sae import BatchTopK

    pre = torch.randn(12, D_SAE)
    assert torch.equal(batch_topk(pre, 2.75), BatchTopK(2.75)(pre))


def test_threshold_is_an_ema_of_the_smallest_selected_activation():
    sae = make(topk_threshold_lr=0.1)
    assert sae.topk_threshold.dtype == torch.float64 and sae.topk_threshold.item() == 0.0
    expected = torch.tensor(0.0, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(20, D_IN, dtype=torch.float64)
        pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
        acts = torch.relu(pre).flatten()
        n = int(3.5 * 20)
        smallest_selected = acts.sort(descending=True).values[:n]
        smallest_positive = smallest_selected[smallest_selected > 0].min()
        expected = 0.9 * expected + 0.1 * smallest_positive
        out = sae.training_loss(x)
        assert sae.topk_threshold.item() == pytest.approx(expected.item(), rel=1e-12)
        assert out.extra["topk_threshold"] == sae.topk_threshold.item()
    sae.update_threshold(torch.zeros(4, D_SAE, dtype=torch.float64))  # nothing positive: unchanged
    assert sae.topk_threshold.item() == pytest.approx(expected.item(), rel=1e-12)


def test_encode_is_jumprelu_with_the_global_threshold():
    sae = make()
    with torch.no_grad():
        sae.topk_threshold.fill_(0.4)
    x = torch.randn(30, D_IN, dtype=torch.float64)
    p = tensors(sae)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    expected = torch.where(h > 0.4, h, torch.zeros_like(h))
    assert torch.equal(sae.encode(x), expected)
    assert torch.allclose(sae(x), expected @ p["W_dec"] + p["b_dec"])


def test_loss_and_auxk_by_formula():
    sae = make(k=2, k_aux=3)
    x = torch.randn(24, D_IN, dtype=torch.float64)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out = sae.training_loss(x, dead_mask=dead)
    p = tensors(sae)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = batch_topk(pre, 2)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = (x_hat - x).pow(2).sum(-1).mean()
    aux_pre = pre.masked_fill(~dead, -math.inf)
    top = aux_pre.topk(3, dim=-1)
    aux_f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    aux = (aux_f @ p["W_dec"] - (x - x_hat)).pow(2).sum(-1).mean()
    assert torch.allclose(out.feature_acts, f)
    assert out.mse_loss.item() == pytest.approx(mse.item(), rel=1e-12)
    assert out.aux_loss.item() == pytest.approx(aux.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx((mse + aux / 32).item(), rel=1e-12)
    assert SAE.firing_counts(out).sum() == (f > 0).sum()


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_training_matches_sae_lens(architecture):
    """Same weights and batches → same latents, losses, gradients and threshold as SAELens."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    ours = make(architecture, k=2.5, dtype="float32")
    common = dict(d_in=D_IN, d_sae=D_SAE, k=2.5, rescale_acts_by_decoder_norm=False, topk_threshold_lr=0.01)
    if architecture == "matryoshka":
        theirs = MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(matryoshka_widths=[8, 24, D_SAE], **common))
    else:
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):
        x = torch.randn(32, D_IN)
        out = ours.training_loss(x)
        ref = theirs.training_forward_pass(TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))
        assert torch.equal(out.feature_acts, ref.feature_acts.detach())
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
        for name, value in ref.losses.items():
            mine = out.mse_loss.item() if name == "mse_loss" else out.extra.get(name, out.aux_loss.item())
            assert mine == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name
        assert torch.equal(ours.topk_threshold, theirs.topk_threshold)
    ours.zero_grad()
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, getattr(theirs, name).grad, atol=1e-5, rtol=1e-4), name


def test_unit_norm_decoder_hooks_and_init():
    sae = BatchTopKSAE(SAEConfig("batchtopk", d_in=8, d_sae=24, k=2))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    sae.W_dec.grad = torch.randn(24, 8)
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(24), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(2.0)
    sae.after_optimizer_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(24))


def test_config_checks():
    for k in (None, 0, -1.0, D_SAE + 0.5, True):
        with pytest.raises(ConfigError, match="k"):
            BatchTopKSAE(SAEConfig("batchtopk", d_in=D_IN, d_sae=D_SAE, k=k))
    with pytest.raises(ConfigError, match="topk_threshold_lr"):
        BatchTopKSAE(SAEConfig("batchtopk", d_in=D_IN, d_sae=D_SAE, k=2, topk_threshold_lr=0.0))
    with pytest.raises(ConfigError, match="k_aux"):
        BatchTopKSAE(SAEConfig("batchtopk", d_in=D_IN, d_sae=D_SAE, k=2, k_aux=0))
    assert BatchTopKSAE(SAEConfig("batchtopk", d_in=D_IN, d_sae=D_SAE, k=0.5)).cfg.k == 0.5
    assert BatchTopKSAE.sparsity_coefficient_name is None
    assert get_architecture("batchtopk") is BatchTopKSAE
    assert get_architecture("matryoshka") is get_architecture("matryoshka_batchtopk") is MatryoshkaSAE
    with pytest.raises(ValueError, match=r"\[batch, d_in\]"):
        make().training_loss(torch.randn(2, 3, D_IN, dtype=torch.float64))


# ----------------------------------------------------------------------------------- matryoshka
def test_matryoshka_loss_is_the_sum_of_prefix_mses():
    sae = make("matryoshka", k=3)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    out = sae.training_loss(x)
    p = tensors(sae)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = batch_topk(pre, 3)
    prefix_mse = {m: ((f[:, :m] @ p["W_dec"][:m] + p["b_dec"]) - x).pow(2).sum(-1).mean() for m in (8, 24, D_SAE)}
    assert out.loss.item() == pytest.approx(sum(prefix_mse.values()).item(), rel=1e-12)
    assert out.mse_loss.item() == pytest.approx(prefix_mse[D_SAE].item(), rel=1e-12)
    assert set(out.extra) == {"topk_threshold", "inner_mse_loss_8", "inner_mse_loss_24"}
    for m in (8, 24):
        assert out.extra[f"inner_mse_loss_{m}"] == pytest.approx(prefix_mse[m].item(), rel=1e-12)


def test_matryoshka_widths_checks():
    cfg = SAEConfig("matryoshka", d_in=D_IN, d_sae=D_SAE, k=2, matryoshka_widths=[8, 32])
    with pytest.warns(UserWarning, match="appending"):
        sae = MatryoshkaSAE(cfg)
    assert sae.cfg.matryoshka_widths == [8, 32, D_SAE]
    with pytest.warns(UserWarning, match="one level"):
        MatryoshkaSAE(SAEConfig("matryoshka", d_in=D_IN, d_sae=D_SAE, k=2, matryoshka_widths=[D_SAE]))
    for widths, match in [([], "needs matryoshka_widths"), ([8, 8, D_SAE], "strictly increasing"),
                          ([32, 8, D_SAE], "strictly increasing"), ([0, D_SAE], "integers"),
                          ([8, D_SAE + 1], "integers"), ([8.5, D_SAE], r"matryoshka_widths\[0\] must be int")]:
        with pytest.raises(ConfigError, match=match):
            MatryoshkaSAE(SAEConfig("matryoshka", d_in=D_IN, d_sae=D_SAE, k=2, matryoshka_widths=widths))


# ------------------------------------------------------------------------- fold, export, SAELens
@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_scale(architecture, apply_b_dec_to_input):
    sae = make(architecture, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.3)
    scale = 3.7
    x = torch.randn(50, D_IN, dtype=torch.float64)
    pre, latents, recon = sae.hidden_pre(scale * x), sae.encode(scale * x), sae(scale * x)
    sae.fold_activation_scale(scale)
    assert torch.allclose(sae.hidden_pre(x), pre, atol=1e-12)  # unchanged, so θ stays
    assert sae.topk_threshold.item() == 0.3
    assert torch.allclose(sae.encode(x), latents, atol=1e-12)
    assert torch.allclose(sae(x), recon / scale, atol=1e-12)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_saved_as_a_jumprelu_sae(tmp_path, architecture, dtype):
    sae = make(architecture, k=2.5, dtype=dtype, metadata={"context_size": 128})
    for _ in range(5):
        sae.training_loss(torch.randn(32, D_IN))
    assert sae.topk_threshold > 0
    sae.save(tmp_path)
    cfg_json = json.loads((tmp_path / SAE_CFG_FILENAME).read_text())
    assert cfg_json["architecture"] == "jumprelu" and cfg_json["dtype"] == dtype
    assert cfg_json["metadata"]["training_architecture"] == architecture
    assert cfg_json["metadata"]["training_architecture_details"]["k"] == 2.5
    assert cfg_json["metadata"]["context_size"] == 128

    loaded = SAE.load(tmp_path)
    assert isinstance(loaded, JumpReLUSAE)
    assert torch.equal(loaded.threshold, torch.full((D_SAE,), sae.topk_threshold.item(), dtype=sae.W_dec.dtype).float())
    x = torch.randn(64, D_IN)
    assert (sae.encode(x) > 0).any()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))

    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == "jumprelu"
    tol = 1e-2 if dtype == "bfloat16" else 1e-5
    assert torch.allclose(theirs.encode(x).float(), sae.encode(x).float(), atol=tol)
    assert torch.allclose(theirs(x).float(), sae(x).float(), atol=10 * tol)


@pytest.mark.parametrize("rescale", [False, True])
def test_we_load_a_sae_lens_trained_batchtopk(tmp_path, rescale):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(4)
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=3, rescale_acts_by_decoder_norm=rescale))
    with torch.no_grad():
        theirs.W_dec.mul_(torch.rand(D_SAE, 1) * 20)  # decoder norms far from 1
        theirs.b_enc.normal_(std=0.1)
    for _ in range(5):
        theirs.training_forward_pass(TrainStepInput(
            sae_in=torch.randn(32, D_IN), coefficients={}, dead_neuron_mask=None,
            n_training_steps=0, is_logging_step=False))
    theirs.save_inference_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert isinstance(ours, JumpReLUSAE)
    x = torch.randn(64, D_IN)
    reference = sae_lens.SAE.load_from_disk(tmp_path)
    assert (reference.encode(x) > 0).any()
    assert torch.allclose(ours.encode(x), reference.encode(x), atol=1e-5)
    assert torch.allclose(ours(x), reference(x), atol=1e-4)
