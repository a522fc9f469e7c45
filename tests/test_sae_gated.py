"""Gated SAE (encode, loss, SAELens interchange, folding) and ghost grads of the standard SAE.

Every expected value is computed here from the plain formulas, not through the SAE's methods.
"""

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.sae import SAE, GatedSAE, SAEConfig, StandardSAE, get_architecture

try:
    import sae_lens
except ImportError:  # only the SAELens interchange tests need it
    sae_lens = None
needs_sae_lens = pytest.mark.skipif(sae_lens is None, reason="sae_lens is not installed")

D_IN, D_SAE = 16, 48


def random_gated(dtype: str = "float64", apply_b_dec_to_input: bool = True, seed: int = 0) -> GatedSAE:
    """A gated SAE with every parameter perturbed so no term is trivially zero."""
    torch.manual_seed(seed)
    cfg = SAEConfig("gated", d_in=D_IN, d_sae=D_SAE, dtype=dtype, apply_b_dec_to_input=apply_b_dec_to_input,
                    hook_name="blocks.1.hook_resid_post", model_name="tiny")
    sae = GatedSAE(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.add_(0.3 * torch.randn_like(sae.W_dec))
        sae.b_dec.normal_(std=0.5)
        sae.b_gate.normal_(std=0.3)
        sae.r_mag.normal_(std=0.5)
        sae.b_mag.normal_(std=0.3)
    return sae


def reference_gated(p: dict, x: torch.Tensor, apply_b_dec_to_input: bool = True) -> dict:
    """Rajamanoharan et al. 2024, eqs. 6–9, written out from the paper on a dict of tensors, with
    the L1 weighted by decoder norms and the decoder live in both gate terms (as SAELens)."""
    x_c = x - p["b_dec"] if apply_b_dec_to_input else x
    pi_gate = x_c @ p["W_enc"] + p["b_gate"]
    pi_mag = x_c @ (p["W_enc"] * torch.exp(p["r_mag"])[None, :]) + p["b_mag"]
    f = torch.where(pi_gate > 0, torch.clamp(pi_mag, min=0), torch.zeros_like(pi_mag))
    x_hat = f @ p["W_dec"] + p["b_dec"]
    gate = torch.clamp(pi_gate, min=0)
    return {
        "f": f,
        "x_hat": x_hat,
        "mse": ((x - x_hat) ** 2).sum(1).mean(),
        "l1": (gate * torch.linalg.vector_norm(p["W_dec"], dim=1)).sum(1).mean(),
        "aux": ((x - (gate @ p["W_dec"] + p["b_dec"])) ** 2).sum(1).mean(),
    }


def params_of(sae: SAE, requires_grad: bool = False) -> dict:
    return {n: t.detach().clone().requires_grad_(requires_grad) for n, t in sae.named_parameters()}


# ------------------------------------------------------------------------------ (a) encode/decode
def test_parameters_match_sae_lens_names_and_shapes():
    sae = random_gated()
    shapes = {n: tuple(t.shape) for n, t in sae.state_dict().items()}
    assert shapes == {"W_enc": (D_IN, D_SAE), "b_gate": (D_SAE,), "r_mag": (D_SAE,), "b_mag": (D_SAE,),
                      "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    assert not hasattr(sae, "b_enc")


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_encode_decode_match_the_paper(apply_b_dec_to_input):
    sae = random_gated(apply_b_dec_to_input=apply_b_dec_to_input)
    x = torch.randn(40, D_IN, dtype=torch.float64)
    ref = reference_gated(params_of(sae), x, apply_b_dec_to_input)
    f = sae.encode(x)
    assert 0 < (f > 0).float().mean() < 1  # some latents gated off, some on
    assert torch.allclose(f, ref["f"], atol=1e-12)
    assert torch.allclose(sae.decode(f), ref["x_hat"], atol=1e-12)
    assert torch.allclose(sae(x), ref["x_hat"], atol=1e-12)
    x3 = x.reshape(4, 10, D_IN)
    assert torch.allclose(sae.encode(x3).reshape(40, D_SAE), f)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.randn(3, D_IN + 1, dtype=torch.float64))


def test_gate_and_magnitude_paths_separately():
    sae = random_gated()
    x = torch.randn(8, D_IN, dtype=torch.float64)
    p = params_of(sae)
    assert torch.allclose(sae.gate_pre(x), (x - p["b_dec"]) @ p["W_enc"] + p["b_gate"])
    w_mag = p["W_enc"] * p["r_mag"].exp()
    assert torch.allclose(sae.hidden_pre(x), (x - p["b_dec"]) @ w_mag + p["b_mag"])


def test_init_and_config_checks():
    torch.manual_seed(1)
    sae = GatedSAE(SAEConfig("gated", d_in=8, d_sae=24))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((24,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
        assert not getattr(sae, name).any(), name
    sample = torch.randn(100, 8) + 3
    sae.initialize_from_activations(sample)
    assert torch.allclose(sae.b_dec, sample.mean(0), atol=1e-6)
    assert get_architecture("gated") is GatedSAE
    names = (GatedSAE.sparsity_coefficient_name, GatedSAE.sparsity_warm_up_name)
    assert names == ("l1_coefficient", "l1_warm_up_steps")
    with pytest.raises(ConfigError, match="no k"):
        GatedSAE(SAEConfig("gated", d_in=8, d_sae=24, k=2))


def test_reinit_latents_resets_gate_parameters():
    sae = random_gated()
    ids = torch.tensor([1, 5])
    directions = torch.nn.functional.normalize(torch.randn(2, D_IN, dtype=torch.float64), dim=1)
    before = params_of(sae)
    sae.reinit_latents(ids, directions, encoder_norm=0.2)
    assert torch.allclose(sae.W_dec[ids], directions)
    assert torch.allclose(sae.W_enc[:, ids], 0.2 * directions.T)
    keep = torch.ones(D_SAE, dtype=torch.bool)
    keep[ids] = False
    for name in ("b_gate", "r_mag", "b_mag"):
        assert not getattr(sae, name)[ids].any(), name
        assert torch.equal(getattr(sae, name)[keep], before[name][keep]), name
    assert torch.equal(sae.b_dec, before["b_dec"])


# ---------------------------------------------------------------------------------- (b) loss
def test_training_loss_parts_match_the_paper():
    sae = random_gated()
    x = torch.randn(32, D_IN, dtype=torch.float64)
    lam = 0.3
    out = sae.training_loss(x, sparsity_coefficient=lam, dead_mask=None)
    ref = reference_gated(params_of(sae), x)
    assert torch.allclose(out.mse_loss, ref["mse"])
    assert torch.allclose(out.sparsity_loss, ref["l1"])
    assert torch.allclose(out.aux_loss, ref["aux"])
    assert torch.allclose(out.loss, ref["mse"] + lam * ref["l1"] + ref["aux"])
    assert torch.allclose(out.feature_acts, ref["f"])
    assert torch.allclose(out.sae_out, ref["x_hat"])
    assert torch.equal(SAE.firing_counts(out), (ref["f"] > 0).sum(0))


def test_training_loss_gradients_match_the_paper():
    sae = random_gated()
    x = torch.randn(32, D_IN, dtype=torch.float64)
    sae.training_loss(x, sparsity_coefficient=0.3, dead_mask=None).loss.backward()
    p = params_of(sae, requires_grad=True)
    ref = reference_gated(p, x)
    (ref["mse"] + 0.3 * ref["l1"] + ref["aux"]).backward()
    for name, param in sae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.allclose(param.grad, p[name].grad, atol=1e-10), name


def test_gate_terms_see_a_live_decoder_and_leave_the_magnitude_path():
    """The sparsity and auxiliary terms reach the decoder (both terms, so the decoder norms are
    held in balance; see the module docstring) and the gate path, never ``r_mag`` or ``b_mag``."""
    sae = random_gated()
    x = torch.randn(32, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_coefficient=0.3, dead_mask=None)
    mse = (sae(x) - x).pow(2).sum(-1).mean()  # same graph as the loss's MSE term: subtract it
    (out.loss - mse).backward()
    assert not sae.r_mag.grad.any() and not sae.b_mag.grad.any()
    assert sae.W_enc.grad.any() and sae.b_gate.grad.any()
    p = params_of(sae, requires_grad=True)
    ref = reference_gated(p, x)
    (0.3 * ref["l1"] + ref["aux"]).backward()
    for name in ("W_dec", "b_dec"):
        assert p[name].grad.abs().sum() > 0, name
        assert torch.allclose(getattr(sae, name).grad, p[name].grad, atol=1e-10), name
    # the penalty alone pulls every decoder row that a gate uses towards a smaller norm
    p = params_of(sae, requires_grad=True)
    reference_gated(p, x)["l1"].backward()
    used = (torch.clamp((x - p["b_dec"]) @ p["W_enc"] + p["b_gate"], min=0) > 0).any(0)
    radial = (p["W_dec"].grad * p["W_dec"]).sum(1)
    assert used.any() and (radial[used] > 0).all() and not radial[~used].any()


def test_training_keeps_decoder_norms_and_sparsity():
    """Regression for the frozen-aux / live-penalty mismatch: there, the penalty shrank W_dec
    (mean row norm ≈ 0.12 after these 300 steps, L0 ≈ 48, unexplained variance ≈ 15%; with the
    decoder live in both terms: ≈ 0.52, ≈ 23, ≈ 7%)."""
    torch.manual_seed(7)
    d_in, d_sae, n_true = 32, 128, 64
    dirs = torch.nn.functional.normalize(torch.randn(n_true, d_in), dim=1)

    def batch(n: int = 256) -> torch.Tensor:
        return ((torch.rand(n, n_true) < 0.05) * torch.rand(n, n_true) * 3) @ dirs

    sae = GatedSAE(SAEConfig("gated", d_in=d_in, d_sae=d_sae))
    sae.initialize_from_activations(batch(4096))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for _ in range(300):
        out = sae.training_loss(batch(), sparsity_coefficient=1.0, dead_mask=None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    x = batch(2048)
    with torch.no_grad():
        l0 = (sae.encode(x) > 0).float().sum(-1).mean()
    assert sae.W_dec.norm(dim=1).mean() > 0.3
    assert l0 < 35
    assert (sae(x) - x).pow(2).sum(-1).mean() < 0.1 * (x - x.mean(0)).pow(2).sum(-1).mean()


# ------------------------------------------------------------------------------ (c) SAELens
@needs_sae_lens
def test_loss_values_and_gradients_match_sae_lens_training_sae():
    """Same config, same objective: SAELens 6.54.12's ``GatedTrainingSAE`` gives the same loss
    parts and the same gradient on every parameter."""
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = random_gated()
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="float64"))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(32, D_IN, dtype=torch.float64)
    out = ours.training_loss(x, sparsity_coefficient=0.3, dead_mask=None)
    step = TrainStepInput(sae_in=x, coefficients={"l1": 0.3}, dead_neuron_mask=None,
                          n_training_steps=0, is_logging_step=False)
    ref = theirs.training_forward_pass(step)
    assert torch.allclose(out.mse_loss, ref.losses["mse_loss"])
    assert torch.allclose(0.3 * out.sparsity_loss, ref.losses["l1_loss"])
    assert torch.allclose(out.aux_loss, ref.losses["auxiliary_reconstruction_loss"])
    assert torch.allclose(out.loss, ref.loss)
    assert torch.allclose(out.feature_acts, ref.feature_acts)
    out.loss.backward()
    ref.loss.backward()
    for name, param in theirs.named_parameters():
        assert torch.allclose(getattr(ours, name).grad, param.grad, atol=1e-10), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    sae = random_gated(dtype)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert type(loaded) is GatedSAE and loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@needs_sae_lens
def test_sae_lens_loads_our_folder(tmp_path):
    sae = random_gated("float32")
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert isinstance(theirs, sae_lens.GatedSAE)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(32, D_IN)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(theirs(x), sae(x), atol=1e-5)


@needs_sae_lens
def test_we_load_a_sae_lens_folder(tmp_path):
    torch.manual_seed(3)
    theirs = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    theirs.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(std=0.5)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert isinstance(ours, GatedSAE) and ours.cfg.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(32, D_IN)
    f = theirs.encode(x)
    assert 0 < (f > 0).float().mean() < 1
    assert torch.allclose(ours.encode(x), f, atol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)


@needs_sae_lens
def test_we_load_a_sae_lens_training_sae(tmp_path):
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig

    torch.manual_seed(4)
    theirs = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        for name in ("b_gate", "r_mag", "b_mag", "b_dec"):
            getattr(theirs, name).normal_(std=0.3)
    theirs.save_inference_model(tmp_path)
    x = torch.randn(32, D_IN)
    assert torch.allclose(SAE.load(tmp_path).encode(x), theirs.encode(x), atol=1e-5)


# ------------------------------------------------------------------------------ (d) folding
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_scale_is_exact(apply_b_dec_to_input):
    sae = random_gated(apply_b_dec_to_input=apply_b_dec_to_input)
    sae.cfg.normalize_activations = "expected_average_only_in"
    gate_params = {n: getattr(sae, n).detach().clone() for n in ("b_gate", "r_mag", "b_mag")}
    scale = 3.7
    x = torch.randn(40, D_IN, dtype=torch.float64)
    latents_before = sae.encode(scale * x)
    recon_before = sae(scale * x)
    sae.fold_activation_scale(scale)
    assert torch.allclose(sae.encode(x), latents_before, atol=1e-12)
    assert torch.equal(sae.encode(x) > 0, latents_before > 0)
    assert torch.allclose(sae(x), recon_before / scale, atol=1e-12)
    for name, before in gate_params.items():
        assert torch.equal(getattr(sae, name), before), name
    assert sae.cfg.normalize_activations == "none"


# --------------------------------------------------------------------- (e) ghost grads (standard)
def random_standard(use_ghost_grads: bool, dtype: str = "float64", seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(SAEConfig("standard", d_in=D_IN, d_sae=D_SAE, dtype=dtype, use_ghost_grads=use_ghost_grads))
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(std=0.1)
        sae.b_dec.normal_(std=0.5)
    return sae


def reference_ghost_loss(p: dict, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Jermyn & Templeton 2024 ghost grads, written out step by step (plain exp, no shift)."""
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    x_hat = torch.clamp(h, min=0) @ p["W_dec"] + p["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    residual = (x - x_hat).detach()
    ghost = torch.exp(h[:, dead]) @ p["W_dec"][dead]
    half = 0.5 * torch.linalg.vector_norm(residual, dim=1) / torch.linalg.vector_norm(ghost, dim=1)
    ghost = half.detach()[:, None] * ghost
    raw = ((ghost - residual) ** 2).sum(1).mean()
    return (mse / raw).detach() * raw


def test_ghost_grads_leave_the_loss_unchanged_without_dead_latents():
    x = torch.randn(32, D_IN, dtype=torch.float64)
    plain = random_standard(False).training_loss(x, sparsity_coefficient=0.2, dead_mask=None)
    assert "ghost_grad_loss" not in plain.extra
    ghost_sae = random_standard(True)
    for dead in (None, torch.zeros(D_SAE, dtype=torch.bool)):
        out = ghost_sae.training_loss(x, sparsity_coefficient=0.2, dead_mask=dead)
        assert torch.equal(out.loss, plain.loss)
        assert out.extra == {"ghost_grad_loss": 0.0}


def test_ghost_grads_match_the_recipe():
    sae = random_standard(True)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    x = torch.randn(32, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_coefficient=0.2, dead_mask=dead)
    out.loss.backward()
    p = params_of(sae, requires_grad=True)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = torch.clamp(h, min=0)
    x_hat = f @ p["W_dec"] + p["b_dec"]
    mse = ((x - x_hat) ** 2).sum(1).mean()
    l1 = (f * torch.linalg.vector_norm(p["W_dec"], dim=1)).sum(1).mean()
    ghost = reference_ghost_loss(p, x, dead)
    assert out.extra["ghost_grad_loss"] == pytest.approx(ghost.item(), rel=1e-12)
    assert ghost.item() == pytest.approx(mse.item(), rel=1e-12)  # rescaled to equal the MSE
    (mse + 0.2 * l1 + ghost).backward()
    assert torch.allclose(out.loss, mse + 0.2 * l1 + ghost)
    for name, param in sae.named_parameters():
        assert torch.allclose(param.grad, p[name].grad, atol=1e-10), name


def test_ghost_grads_reach_dead_latents_that_never_fire():
    """Dead latents far below zero get no gradient from ReLU; ghost grads give their encoder
    columns, biases and decoder rows one, in float32 without exp under/overflow."""
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:8] = True
    x = torch.randn(32, D_IN)
    grads = {}
    for use_ghost_grads in (False, True):
        sae = random_standard(use_ghost_grads, dtype="float32")
        with torch.no_grad():
            sae.b_enc[dead] = -200.0  # exp(-200) is 0 in float32
        out = sae.training_loss(x, sparsity_coefficient=0.2, dead_mask=dead)
        assert not (out.feature_acts[:, dead] > 0).any()
        out.loss.backward()
        grads[use_ghost_grads] = {n: t.grad.clone() for n, t in sae.named_parameters()}
    assert not grads[False]["W_enc"][:, dead].any() and not grads[False]["b_enc"][dead].any()
    for name, g in grads[True].items():
        assert torch.isfinite(g).all(), name
    assert (grads[True]["W_enc"][:, dead].norm(dim=0) > 0).all()
    assert (grads[True]["b_enc"][dead] != 0).all()
    assert (grads[True]["W_dec"][dead].norm(dim=1) > 0).all()
    # live latents' encoder gradients come from the MSE and L1 only
    assert torch.equal(grads[True]["W_enc"][:, ~dead], grads[False]["W_enc"][:, ~dead])
