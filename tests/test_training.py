"""Trainer mechanics: schedules, dead-latent tracking, scale folding, refusal of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.constants import METRICS_LOG_FILENAME, SAE_CFG_FILENAME
from pipeline.errors import ConfigError, TrainingError
from pipeline.sae import SAE
from pipeline.training import Trainer, activation_scale, lr_multiplier, train
from tests.conftest import write_synthetic_cache


def test_lr_multiplier_warm_up_constant_and_decay():
    # 10 steps, 2 warm-up, decay over the last 4: 0.5, 1, 1, 1, 1, 1, 1.0(4/4), .75, .5, .25
    got = [lr_multiplier(s, 10, 2, 4, "constant") for s in range(10)]
    assert got == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert lr_multiplier(0, 10, 0, 0, "cosineannealing") == pytest.approx(1.0)
    assert lr_multiplier(5, 10, 0, 0, "cosineannealing") == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2)


def test_activation_scale_sets_expected_norm_to_sqrt_d_in():
    assert activation_scale(48.0, 576, "expected_average_only_in") == pytest.approx(24.0 / 48.0)
    assert activation_scale(48.0, 576, "none") == 1.0
    with pytest.raises(TrainingError):
        activation_scale(0.0, 576, "expected_average_only_in")


def _low_rank_cache(tmp_path, n_seqs=64, ctx=32, d_in=16, rank=4, scale=50.0):
    """Activations on a rank-4 subspace, far from unit norm (like real residuals)."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(rank, d_in))
    codes = rng.exponential(size=(n_seqs * ctx, rank)) * (rng.random((n_seqs * ctx, rank)) < 0.5)
    acts = (scale * codes @ basis).astype(np.float32)
    tokens = np.full((n_seqs, ctx), 7, dtype=np.int32)
    return write_synthetic_cache(tmp_path / "lr", acts, tokens, dtype="float16", chunk_tokens=256,
                                 chunks_per_shard=2, n_holdout_chunks=1), acts


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_training_learns_and_saved_sae_reconstructs_raw_activations(tmp_path, architecture):
    cache, acts = _low_rank_cache(tmp_path)
    cfg = TrainConfig(cache_path=str(cache.path), architecture=architecture, d_sae=32, k=4, l1_coefficient=0.5,
                      lr=3e-3, train_batch_size_tokens=128, training_tokens=128 * 300, shuffle_buffer_tokens=512,
                      log_every=25, output_path=str(tmp_path / "sae"), seed=0)
    result = train(cfg, progress=False)
    sae = SAE.load(tmp_path / "sae")
    assert sae.cfg.architecture == architecture and (tmp_path / "sae" / SAE_CFG_FILENAME).exists()
    # evaluated on raw (unscaled) holdout rows: the normalisation scale was folded into the weights
    x = torch.from_numpy(acts[-256:])
    with torch.no_grad():
        x_hat = sae(x)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert ev > 0.9, ev
    log = [json.loads(line) for line in (tmp_path / "sae" / METRICS_LOG_FILENAME).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(25, 301, 25))
    assert log[-1]["mse_loss"] < log[0]["mse_loss"]
    assert result.state.tokens_seen == 128 * 300


def test_dead_latents_are_those_silent_for_the_window():
    from pipeline.sae import SAEConfig, get_architecture

    sae = get_architecture("topk")(SAEConfig(architecture="topk", d_in=4, d_sae=8, k=1))
    cfg = TrainConfig(d_sae=8, k=1, dead_feature_window=3, feature_sampling_window=1000)
    trainer = Trainer(sae, cfg)
    counts = torch.zeros(8)
    counts[0] = 2
    for _ in range(3):
        trainer._track_firing(counts, 4)
    assert trainer.dead_mask().tolist() == [False] + [True] * 7
    trainer._track_firing(torch.ones(8), 4)
    assert not trainer.dead_mask().any()


def test_train_refuses_d_in_mismatch_and_non_empty_output(tmp_path):
    cache, _ = _low_rank_cache(tmp_path)
    with pytest.raises(ConfigError, match="d_in 32 .* does not match the cache \\(16"):
        train(TrainConfig(cache_path=str(cache.path), d_in=32, output_path=str(tmp_path / "o")), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # --overwrite replaces SAEs only, never a folder of other files
        with pytest.raises(ConfigError, match="not an SAE.*nothing was changed"):
            train(TrainConfig(cache_path=str(cache.path), d_sae=32, k=4, output_path=str(tmp_path / "full"),
                              overwrite=overwrite), progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"
    with pytest.raises(ConfigError, match="overlaps the cache"):
        train(TrainConfig(cache_path=str(cache.path), d_sae=32, k=4, output_path=str(cache.path), overwrite=True),
              progress=False)
    assert cache.path.joinpath("zarr.json").exists()


def test_nan_loss_stops_with_the_step():
    from pipeline.sae import SAEConfig, get_architecture

    sae = get_architecture("standard")(SAEConfig(architecture="standard", d_in=4, d_sae=8))
    trainer = Trainer(sae, TrainConfig(architecture="standard", d_sae=8, training_tokens=8,
                                       train_batch_size_tokens=4, shuffle_buffer_tokens=8))
    x = torch.ones(4, 4)
    x[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="at step 0"):
        trainer.step(x)
