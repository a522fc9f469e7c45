"""Metrics on hand-made tensors, the streaming accumulator, and CE loss recovered on a tiny model."""

import math

import pytest
import torch

from pipeline.evals import (
    RECONSTRUCTION_KEYS,
    ReconstructionStats,
    ce_loss_recovered,
    cosine_similarity,
    dead_fraction,
    explained_variance,
    l0,
    mse,
)
from pipeline.sae import SAEConfig, StandardSAE

X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])  # per-dim mean [3, 2]


def test_l0_and_dead_fraction():
    acts = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, -1.0, 0.0]])
    assert l0(acts) == pytest.approx(1.5)
    assert l0(acts.reshape(1, 2, 4)) == pytest.approx(1.5)
    assert dead_fraction(torch.tensor([0, 3, 1, 0])) == pytest.approx(0.5)


def test_mse_and_cosine_by_hand():
    x_hat = X + torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    assert mse(X, x_hat) == pytest.approx(5.0 / 6.0)
    assert cosine_similarity(X, X) == pytest.approx(1.0)
    assert cosine_similarity(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [-2.0, 0.0]])) == pytest.approx(-0.5)


def test_explained_variance_by_hand():
    assert explained_variance(X, X) == pytest.approx(1.0)
    assert explained_variance(X, X.mean(0).expand_as(X)) == pytest.approx(0.0, abs=1e-12)
    # total = Σ (x - [3, 2])² = (4 + 0 + 4) + (0 + 4 + 4) = 16; residual = 1 + 4 = 5
    x_hat = X + torch.tensor([[1.0, 0.0], [0.0, -2.0], [0.0, 0.0]])
    assert explained_variance(X, x_hat) == pytest.approx(1 - 5 / 16)


def test_streaming_stats_equal_one_shot():
    torch.manual_seed(0)
    x = torch.randn(103, 6) * 3 + 1000.0  # large mean: the naive Σx² - n·mean² would cancel
    x_hat = x + 0.5 * torch.randn_like(x)
    acts = torch.relu(torch.randn(103, 10) - 1.0)
    acts[:, 7] = 0.0
    stats = ReconstructionStats(d_sae=10)
    for chunk in (slice(0, 1), slice(1, 40), slice(40, 41), slice(41, 103)):
        if chunk.start % 2:
            stats.update(x[chunk], x_hat[chunk], firing_counts=(acts[chunk] != 0).sum(0))
        else:
            stats.update(x[chunk], x_hat[chunk], feature_acts=acts[chunk])
    result = stats.compute()
    assert tuple(result) == RECONSTRUCTION_KEYS
    assert result["n_tokens"] == 103
    assert result["l0"] == pytest.approx(l0(acts), rel=1e-12)
    assert result["mse"] == pytest.approx(mse(x, x_hat), rel=1e-9)
    assert result["explained_variance"] == pytest.approx(explained_variance(x, x_hat), rel=1e-9)
    assert result["cosine_similarity"] == pytest.approx(cosine_similarity(x, x_hat), rel=1e-12)
    assert result["dead_fraction"] == pytest.approx(0.1)
    assert math.isnan(ReconstructionStats(4).compute()["mse"])
    with pytest.raises(ValueError):
        stats.update(x, x_hat)


def identity_sae(d_in: int) -> StandardSAE:
    """x̂ = ReLU(x) - ReLU(-x) = x exactly: latents [x, -x], decoder [I; -I]."""
    sae = StandardSAE(SAEConfig("standard", d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, d_head=4, n_heads=4, n_ctx=12, d_vocab=50, act_fn="relu", seed=0
    )
    return HookedTransformer(cfg).eval()


def test_ce_loss_recovered(tiny_model):
    torch.manual_seed(0)
    tokens = torch.randint(0, 50, (6, 12))
    hook = "blocks.0.hook_resid_post"
    x = torch.randn(5, 16)
    assert torch.allclose(identity_sae(16)(x), x)

    perfect = ce_loss_recovered(tiny_model, identity_sae(16), tokens, hook, batch_size=4)
    assert set(perfect) == {"ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered"}
    assert perfect["ce_loss_zero_ablation"] != pytest.approx(perfect["ce_loss_clean"])
    assert perfect["ce_loss_with_sae"] == pytest.approx(perfect["ce_loss_clean"], rel=1e-5)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        clean = float(tiny_model(tokens, return_type="loss"))
    assert perfect["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)

    zeros = identity_sae(16)
    with torch.no_grad():
        zeros.W_dec.zero_()
    result = ce_loss_recovered(tiny_model, zeros, tokens, hook, batch_size=4)
    assert result["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)

    # keeping every position clean makes both spliced runs equal the clean run
    keep_all = torch.ones_like(tokens, dtype=torch.bool)
    masked = ce_loss_recovered(tiny_model, zeros, tokens, hook, exclude_positions_mask=keep_all)
    assert masked["ce_loss_with_sae"] == pytest.approx(masked["ce_loss_clean"], rel=1e-6)


def test_ce_loss_recovered_flattens_per_head_hooks(tiny_model):
    # attn.hook_z is [batch, pos, n_heads=4, d_head=4]; the cache and the SAE see it as d_in = 16
    tokens = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    perfect = ce_loss_recovered(tiny_model, identity_sae(16), tokens, "blocks.0.attn.hook_z", batch_size=4)
    assert perfect["ce_loss_with_sae"] == pytest.approx(perfect["ce_loss_clean"], rel=1e-5)
    assert perfect["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
