"""JumpReLU SAE: the paper's formulas in plain torch, straight-through gradients, SAELens parity."""

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.sae import SAE, JumpReLUSAE, SAEConfig, get_architecture

import sae_lens  # noqa: E402  (a [test] dependency: missing means a broken install, not a skip)

D_IN, D_SAE = 16, 48


def random_jumprelu(mode="step", dtype="float64", bandwidth=0.5, **kw) -> JumpReLUSAE:
    torch.manual_seed(0)
    cfg = SAEConfig("jumprelu", d_in=D_IN, d_sae=D_SAE, dtype=dtype, jumprelu_sparsity_loss_mode=mode,
                    jumprelu_bandwidth=bandwidth, hook_name="blocks.1.hook_resid_post", **kw)
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.W_dec.mul_(torch.rand(D_SAE, 1, dtype=sae.W_dec.dtype) + 0.5)  # norms ≠ 1 exercise the tanh weights
        sae.b_enc.normal_(std=0.2)
        sae.b_dec.normal_(std=0.5)
        sae.threshold.uniform_(0.0, 0.6)
    return sae


def params(sae):
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


def rect(z):
    return ((z > -0.5) & (z < 0.5)).double()


def reference(p, x):
    """Eq. 4, 8 and the decoder, written out."""
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    f = h * (h > p["threshold"]).double()
    return h, f, f @ p["W_dec"] + p["b_dec"]


def test_encode_decode_match_the_paper():
    sae = random_jumprelu()
    x = torch.randn(40, D_IN, dtype=torch.float64)
    _, f, x_hat = reference(params(sae), x)
    latents = sae.encode(x)
    assert 0 < (latents > 0).double().mean() < 1
    assert torch.allclose(latents, f, atol=1e-12)
    assert torch.allclose(sae(x), x_hat, atol=1e-12)
    assert torch.allclose(sae.encode(x.reshape(4, 10, D_IN)).reshape(40, D_SAE), latents)
    with pytest.raises(ValueError, match="d_in"):
        sae.encode(torch.randn(2, D_IN + 1, dtype=torch.float64))


def test_negative_threshold_still_zeroes_negative_pre_activations():
    # SAELens's inference JumpReLU applies ReLU before the threshold mask; so do we
    sae = random_jumprelu()
    with torch.no_grad():
        sae.threshold.fill_(-0.5)
    x = torch.randn(20, D_IN, dtype=torch.float64)
    h = sae.hidden_pre(x)
    assert torch.equal(sae.encode(x), torch.relu(h))


@pytest.mark.parametrize("pre_act", [None, 0.3])
def test_step_loss_and_straight_through_gradients(pre_act):
    """θ's gradient: eq. 11 through the MSE plus eq. 12 through the L0 penalty."""
    sae = random_jumprelu(pre_act_loss_coefficient=pre_act)
    p, eps, lam, batch = params(sae), 0.5, 0.2, 64
    x = torch.randn(batch, D_IN, dtype=torch.float64)
    dead = torch.rand(D_SAE) < 0.5
    out = sae.training_loss(x, sparsity_coefficient=lam, dead_mask=dead)
    out.loss.backward()

    h, f, x_hat = reference(p, x)
    theta = p["threshold"]
    norms = p["W_dec"].norm(dim=1)
    mse = (x_hat - x).pow(2).sum(-1).mean()
    l0 = (h > theta).double().sum(-1).mean()
    pre_act_loss = (torch.relu(theta - h) * dead.double() * norms).sum(-1).mean()
    assert out.mse_loss.item() == pytest.approx(mse.item(), rel=1e-12)
    assert out.sparsity_loss.item() == pytest.approx(l0.item(), rel=1e-12)
    assert out.aux_loss.item() == pytest.approx(pre_act_loss.item() if pre_act else 0.0, rel=1e-12)
    expected_loss = mse + lam * l0 + (pre_act * pre_act_loss if pre_act else 0.0)
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    assert torch.allclose(out.feature_acts, f)

    kernel = rect((h - theta) / eps) / eps
    assert kernel.sum() > 0  # some pre-activations fall inside the window
    d_f = 2 * (x_hat - x) @ p["W_dec"].T / batch
    g_theta = (-theta * kernel * d_f).sum(0) + lam * (-kernel).sum(0) / batch  # eq. 11 + eq. 12
    d_h = (h > theta).double() * d_f  # the step penalty sends nothing to h
    if pre_act:
        g_theta += pre_act * ((theta > h).double() * dead.double() * norms).sum(0) / batch
        d_h -= pre_act * (theta > h).double() * dead.double() * norms / batch
    assert torch.allclose(sae.threshold.grad, g_theta, atol=1e-12)
    assert torch.allclose(sae.b_enc.grad, d_h.sum(0), atol=1e-12)


def test_step_penalty_gradient_alone():
    """∂/∂θ of λ·mean_b Σ H(h-θ) is -(λ/(Bε)) Σ_b rect((h-θ)/ε) (eq. 12)."""
    sae = random_jumprelu()
    x = torch.randn(32, D_IN, dtype=torch.float64)
    h = sae.hidden_pre(x).detach()
    theta = sae.threshold
    sae.sparsity_penalty(h, theta, h).backward()
    expected = -rect((h - theta.detach()) / 0.5).sum(0) / 0.5 / 32
    assert torch.allclose(theta.grad, expected)


def test_tanh_penalty_value():
    sae = random_jumprelu("tanh", jumprelu_tanh_scale=3.0)
    x = torch.randn(30, D_IN, dtype=torch.float64)
    out = sae.training_loss(x, sparsity_coefficient=0.1)
    p = params(sae)
    _, f, _ = reference(p, x)
    expected = torch.tanh(3.0 * f * p["W_dec"].norm(dim=1)).sum(-1).mean()
    assert out.sparsity_loss.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("mode,pre_act", [("step", None), ("step", 0.3), ("tanh", None), ("tanh", 0.3)])
def test_training_matches_sae_lens(mode, pre_act):
    """Same weights → same losses and gradients as SAELens's JumpReLUTrainingSAE."""
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = random_jumprelu(mode, dtype="float32", pre_act_loss_coefficient=pre_act)
    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, jumprelu_sparsity_loss_mode=mode, jumprelu_bandwidth=0.5,
        pre_act_loss_coefficient=pre_act, jumprelu_tanh_scale=ours.cfg.jumprelu_tanh_scale))
    theirs.load_state_dict(params(ours))
    x = torch.randn(64, D_IN)
    dead = torch.rand(D_SAE) < 0.5
    out = ours.training_loss(x, sparsity_coefficient=0.2, dead_mask=dead)
    ref = theirs.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l0": 0.2}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert out.mse_loss.item() == pytest.approx(ref.losses["mse_loss"].item(), rel=1e-5)
    assert 0.2 * out.sparsity_loss.item() == pytest.approx(ref.losses["l0_loss"].item(), rel=1e-5)
    if pre_act:
        assert pre_act * out.aux_loss.item() == pytest.approx(ref.losses["pre_act_loss"].item(), rel=1e-5)
    assert torch.allclose(out.feature_acts, ref.feature_acts)
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, getattr(theirs, name).grad, atol=1e-5, rtol=1e-4), name


def test_threshold_projection_and_decoder_constraint():
    sae = random_jumprelu("step")
    sae.cfg.jumprelu_unit_norm_decoder = True  # Gemma Scope's constraint (off by default)
    with torch.no_grad():
        sae.threshold[:5] = -0.1
    x = torch.randn(16, D_IN, dtype=torch.float64)
    sae.training_loss(x, sparsity_coefficient=0.1)
    assert (sae.threshold >= 0).all()  # projected before the forward, as SAELens does
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.before_optimizer_step()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(D_SAE, dtype=torch.float64), atol=1e-12)
    with torch.no_grad():
        sae.threshold[:3] = -1.0
    sae.after_optimizer_step()
    assert (sae.threshold >= 0).all()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE, dtype=torch.float64))

    # by default (SAELens's recipe) and in tanh mode the decoder is left free
    for free in (random_jumprelu("step"), random_jumprelu("tanh")):
        norms = free.W_dec.norm(dim=1).clone()
        free.W_dec.grad = torch.ones_like(free.W_dec)
        free.before_optimizer_step()
        free.after_optimizer_step()
        assert torch.equal(free.W_dec.grad, torch.ones_like(free.W_dec))
        assert torch.equal(free.W_dec.norm(dim=1), norms)


def test_init_and_config_checks():
    torch.manual_seed(1)
    step = JumpReLUSAE(SAEConfig("jumprelu", d_in=8, d_sae=24, jumprelu_init_threshold=0.02))
    assert torch.allclose(step.W_dec.norm(dim=1), torch.ones(24))
    assert torch.equal(step.threshold, torch.full((24,), 0.02))
    tanh = JumpReLUSAE(SAEConfig("jumprelu", d_in=8, d_sae=24, jumprelu_sparsity_loss_mode="tanh"))
    assert torch.allclose(tanh.W_dec.norm(dim=1), torch.full((24,), 0.1))
    for sae in (step, tanh):
        assert torch.equal(sae.W_enc, sae.W_dec.T)
        assert not sae.b_enc.any() and not sae.b_dec.any()
    assert JumpReLUSAE(SAEConfig("jumprelu", d_in=8, d_sae=24, dtype="bfloat16")).threshold.dtype == torch.float32
    assert JumpReLUSAE(SAEConfig("jumprelu", d_in=8, d_sae=24, dtype="float64")).threshold.dtype == torch.float64
    assert get_architecture("jumprelu") is JumpReLUSAE
    assert (JumpReLUSAE.sparsity_coefficient_name, JumpReLUSAE.sparsity_warm_up_name) == ("l0_coefficient", "l0_warm_up_steps")
    for bad, match in [({"k": 4}, "no k"), ({"jumprelu_sparsity_loss_mode": "quadratic"}, "sparsity_loss_mode"),
                       ({"jumprelu_bandwidth": 0.0}, "bandwidth"), ({"jumprelu_tanh_scale": -1.0}, "tanh_scale"),
                       ({"jumprelu_init_threshold": -0.1}, "init_threshold"),
                       ({"pre_act_loss_coefficient": -1.0}, "pre_act")]:
        with pytest.raises(ConfigError, match=match):
            JumpReLUSAE(SAEConfig("jumprelu", d_in=8, d_sae=24, **bad))


def test_reinit_latents_resets_threshold():
    sae = random_jumprelu()
    ids = torch.tensor([2, 7])
    directions = torch.nn.functional.normalize(torch.randn(2, D_IN, dtype=torch.float64), dim=1)
    before = sae.threshold.detach().clone()
    sae.reinit_latents(ids, directions, encoder_norm=0.2)
    assert torch.equal(sae.threshold[ids], torch.full((2,), 0.01, dtype=torch.float64))
    keep = torch.ones(D_SAE, dtype=torch.bool)
    keep[ids] = False
    assert torch.equal(sae.threshold[keep], before[keep])


@pytest.mark.parametrize("mode", ["step", "tanh"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_fold_activation_scale(mode, apply_b_dec_to_input):
    sae = random_jumprelu(mode, apply_b_dec_to_input=apply_b_dec_to_input)
    scale = 3.7
    x = torch.randn(50, D_IN, dtype=torch.float64)
    pre, latents, recon = sae.hidden_pre(scale * x), sae.encode(scale * x), sae(scale * x)
    threshold = sae.threshold.detach().clone()
    sae.fold_activation_scale(scale)
    assert torch.allclose(sae.hidden_pre(x), pre, atol=1e-12)  # pre-activations unchanged ...
    assert torch.equal(sae.threshold, threshold)  # ... so θ needs no rescaling
    assert torch.allclose(sae.encode(x), latents, atol=1e-12)
    assert torch.allclose(sae(x), recon / scale, atol=1e-12)


# ----------------------------------------------------------------------------------- SAELens io
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    sae = random_jumprelu(dtype=dtype, pre_act_loss_coefficient=0.5)
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert type(loaded) is JumpReLUSAE and loaded.cfg == sae.cfg
    for name, p in sae.named_parameters():
        assert getattr(loaded, name).dtype == p.dtype
        assert torch.equal(getattr(loaded, name), p), name


@pytest.mark.parametrize("mode", ["step", "tanh"])
def test_sae_lens_loads_our_folder(tmp_path, mode):
    sae = random_jumprelu(mode, dtype="float32")
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == "jumprelu"
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(32, D_IN)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-6)
    assert torch.allclose(theirs(x), sae(x), atol=1e-5)


def _randomise(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.5 * torch.rand_like(p) if name == "threshold" else torch.randn_like(p))


def test_we_load_a_sae_lens_jumprelu_folder(tmp_path):
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
    _randomise(theirs)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert isinstance(ours, JumpReLUSAE)
    x = torch.randn(32, D_IN)
    assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_we_load_a_sae_lens_trained_jumprelu(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    theirs = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, dtype="bfloat16"))
    _randomise(theirs)
    theirs.save_inference_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.dtype == "bfloat16" and ours.threshold.dtype == torch.float32
    x = torch.randn(32, D_IN)
    assert torch.equal(ours.encode(x), sae_lens.SAE.load_from_disk(tmp_path).encode(x))
