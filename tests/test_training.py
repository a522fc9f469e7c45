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


def _tiny_trainer(architecture="standard"):
    from pipeline.sae import SAEConfig, get_architecture

    torch.manual_seed(0)
    k = 2 if architecture == "topk" else None
    sae = get_architecture(architecture)(SAEConfig(architecture=architecture, d_in=4, d_sae=8, k=k))
    return Trainer(sae, TrainConfig(architecture=architecture, d_sae=8, k=2, training_tokens=40,
                                    train_batch_size_tokens=4, shuffle_buffer_tokens=8))


def _params(trainer):
    return {name: p.detach().clone() for name, p in trainer.sae.named_parameters()}


def test_nan_and_inf_in_a_batch_stop_naming_the_tensor_the_counts_and_the_last_finite_loss():
    trainer = _tiny_trainer()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    losses = [trainer.step(x)["loss"] for _ in range(3)]
    before = _params(trainer)
    bad = x.clone()
    bad[0, 0], bad[1, 2], bad[3, 3] = float("nan"), float("nan"), float("-inf")
    with pytest.raises(TrainingError) as err:
        trainer.step(bad)
    assert str(err.value).startswith("the input batch holds NaN/Inf at step 3: the input batch: 3 of 16 values "
                                     "NaN/Inf (2 NaN, 1 Inf);")
    assert f"max finite |x| {x.abs().flatten()[torch.isfinite(bad).flatten()].max().item():.4g}" in str(err.value)
    assert f"last finite loss {losses[-1]:.6g} at step 2. No checkpoint was written before it." in str(err.value)
    after = _params(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the optimiser never saw the batch
    assert trainer.state.step == 3


def test_a_poisoned_parameter_is_named_when_the_loss_becomes_nan():
    trainer = _tiny_trainer()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    first = trainer.step(x)["loss"]
    with torch.no_grad():
        trainer.sae.W_dec[2, 1] = float("nan")
    with pytest.raises(TrainingError, match=r"^loss became nan at step 1: .*W_dec: 1 of 32 values NaN/Inf \(1 NaN, "
                                            rf"0 Inf\).*last finite loss {first:.6g} at step 0\."):
        trainer.step(x)


def test_a_nan_gradient_stops_before_clipping_or_the_optimiser_spread_it():
    trainer = _tiny_trainer()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    trainer.step(x)
    before = _params(trainer)
    poison = torch.zeros(4, 8)
    poison[0, 3] = float("inf")
    handle = trainer.sae.W_enc.register_hook(lambda grad: grad + poison)  # the loss stays finite
    try:
        with pytest.raises(TrainingError, match=r"^a gradient holds NaN/Inf at step 1: W_enc.grad: 1 of 32 values "
                                                r"NaN/Inf \(0 NaN, 1 Inf\); max finite"):
            trainer.step(x)
    finally:
        handle.remove()
    assert all(torch.equal(before[k], p.detach()) for k, p in trainer.sae.named_parameters())


def test_a_nan_state_is_never_saved_as_a_checkpoint(tmp_path, monkeypatch):
    from pipeline.checkpoint import list_checkpoints, load_checkpoint_state

    cache, _ = _low_rank_cache(tmp_path)
    real_step = Trainer.step

    def overflow_in_step_30(self, x):  # the update that ends step 30 leaves a NaN in W_dec
        metrics = real_step(self, x)
        if self.state.step == 30:
            with torch.no_grad():
                self.sae.W_dec[0, 0] = float("nan")
        return metrics

    monkeypatch.setattr(Trainer, "step", overflow_in_step_30)
    cfg = _small_cfg(cache, tmp_path, "run", n_checkpoints=4)  # checkpoints at steps 10, 20, 30, 40
    with pytest.raises(TrainingError, match=r"^the parameters became NaN/Inf \(not saved\) at step 30: W_dec: 1 of "
                                            r"512 values NaN/Inf.*Its last checkpoint, .*step_000000020, is kept"):
        train(cfg, progress=False)
    found = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step_000000010", "step_000000020"]
    assert not (tmp_path / "run" / SAE_CFG_FILENAME).exists()
    state = load_checkpoint_state(found[-1])
    assert all(torch.isfinite(t).all() for t in state["sae"].values())
    # the kept checkpoint is the state an unpoisoned run had at step 20
    monkeypatch.undo()
    train(_small_cfg(cache, tmp_path, "clean", n_checkpoints=4), progress=False)
    clean = load_checkpoint_state(tmp_path / "clean" / "checkpoints" / "step_000000020")
    assert state["sae"].keys() == clean["sae"].keys()
    assert all(torch.equal(state["sae"][k], clean["sae"][k]) for k in clean["sae"])
    kept, reference = _weights(found[-1]), _weights(tmp_path / "clean" / "checkpoints" / "step_000000020")
    assert kept.keys() == reference.keys() and all(torch.equal(kept[k], reference[k]) for k in kept)


def _small_cfg(cache, tmp_path, name, **kw):
    base = dict(cache_path=str(cache.path), d_sae=32, k=4, l1_coefficient=0.5, lr=3e-3,
                train_batch_size_tokens=128, training_tokens=128 * 40, shuffle_buffer_tokens=512,
                log_every=5, output_path=str(tmp_path / name), seed=0)
    return TrainConfig(**{**base, **kw})


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, architecture):
    import shutil

    cache, _ = _low_rank_cache(tmp_path)
    full = train(_small_cfg(cache, tmp_path, "full", architecture=architecture, n_checkpoints=4,
                            resample_dead_latents=True, feature_sampling_window=7, dead_feature_window=3),
                 progress=False)
    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == [f"step_{s:09d}" for s in (10, 20, 30, 40)]
    # a run stopped after step 20: its folder holds the first two checkpoints and a partial log
    stopped = tmp_path / "stopped"
    shutil.copytree(tmp_path / "full", stopped)
    for p in ckpts[2:]:
        shutil.rmtree(stopped / "checkpoints" / p.name)
    for name in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors"):
        (stopped / name).unlink()
    resumed = train(_small_cfg(cache, tmp_path, "stopped", architecture=architecture, n_checkpoints=4,
                               resample_dead_latents=True, feature_sampling_window=7, dead_feature_window=3,
                               resume_from_checkpoint="latest"), progress=False)
    a, b = _weights(tmp_path / "full"), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (stopped / METRICS_LOG_FILENAME).read_text().splitlines()]
    assert steps == list(range(5, 41, 5))
    assert resumed.state.tokens_seen == full.state.tokens_seen == 128 * 40
    # every checkpoint is itself a loadable SAE
    assert SAE.load(ckpts[0]).cfg.architecture == architecture


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path):
    cache, _ = _low_rank_cache(tmp_path)
    train(_small_cfg(cache, tmp_path, "run", n_checkpoints=2), progress=False)
    with pytest.raises(ConfigError, match="lr: checkpoint 0.003, now 0.001"):
        train(_small_cfg(cache, tmp_path, "run", n_checkpoints=2, lr=1e-3, resume_from_checkpoint="latest"),
              progress=False)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        train(_small_cfg(cache, tmp_path, "other", resume_from_checkpoint="latest"), progress=False)


def test_resampling_restarts_dead_latents_along_badly_reconstructed_inputs():
    from pipeline.sae import SAEConfig, get_architecture
    from pipeline.training import resample_dead_latents

    torch.manual_seed(0)
    sae = get_architecture("standard")(SAEConfig(architecture="standard", d_in=8, d_sae=16))
    trainer = Trainer(sae, TrainConfig(architecture="standard", d_sae=16, dead_feature_window=2))
    x = torch.randn(32, 8)
    out = sae.training_loss(x, sparsity_coefficient=1.0)
    out.loss.backward()
    trainer.optimizer.step()
    trainer.state.steps_since_fired[:4] = 5  # latents 0-3 dead
    x_hat = torch.zeros_like(x)
    x_hat[1:] = x[1:]  # only input 0 is badly reconstructed: every draw must pick it
    assert resample_dead_latents(trainer, x, x_hat) == 4
    direction = (x[0] - sae.b_dec) / (x[0] - sae.b_dec).norm()
    for i in range(4):
        assert torch.allclose(sae.W_dec[i], direction, atol=1e-6)
        assert torch.allclose(sae.W_enc[:, i] / sae.W_enc[:, i].norm(), direction, atol=1e-6)
        assert sae.b_enc[i] == 0
        assert trainer.optimizer.state[sae.W_dec]["exp_avg"][i].abs().sum() == 0
    assert trainer.optimizer.state[sae.W_dec]["exp_avg"][4:].abs().sum() > 0
    assert not trainer.dead_mask().any()


def test_wandb_gets_saelens_metric_names_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_init = wandb.init

    def spy_init(**kw):
        run = real_init(**kw)
        real_log = run.log
        run.log = lambda data, step=None: (logged.append((step, data)), real_log(data, step=step))
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    cache, _ = _low_rank_cache(tmp_path)
    train(_small_cfg(cache, tmp_path, "wb", architecture="standard", log_to_wandb=True, wandb_log_frequency=10),
          progress=False)
    assert [step for step, _ in logged] == [10, 20, 30, 40]
    keys = set(logged[-1][1])
    assert {"losses/mse_loss", "losses/l1_loss", "losses/overall_loss", "metrics/l0",
            "metrics/explained_variance", "sparsity/dead_features", "details/current_learning_rate"} <= keys
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*"))


def test_a_damaged_checkpoint_is_named_not_loaded(tmp_path):
    from pipeline.checkpoint import STATE_FILENAME, load_checkpoint_state

    (tmp_path / "step_000000010").mkdir()
    state = tmp_path / "step_000000010" / STATE_FILENAME
    torch.save({"sae": {}, "optimizer": {}, "trainer": {}, "rng": torch.zeros(1), "config": {}}, state)
    assert set(load_checkpoint_state(state.parent)) == {"sae", "optimizer", "trainer", "rng", "config"}
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(ConfigError, match="cannot be read .* damaged"):
        load_checkpoint_state(state.parent)
    torch.save({"weights": torch.zeros(2)}, state)
    with pytest.raises(ConfigError, match="lacks .*not written by this trainer"):
        load_checkpoint_state(state.parent)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_gradient_norm_is_clipped_as_saelens_does(max_grad_norm):
    from pipeline.sae import SAEConfig, get_architecture

    torch.manual_seed(0)
    sae = get_architecture("standard")(SAEConfig(architecture="standard", d_in=8, d_sae=16))
    trainer = Trainer(sae, TrainConfig(architecture="standard", d_sae=16, max_grad_norm=max_grad_norm))
    trainer.step(50 * torch.randn(64, 8))  # a loss of ~10^4: raw gradient norm far above 1
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in sae.parameters()]))
    if max_grad_norm is None:
        assert norm > 10
    else:
        assert norm == pytest.approx(1.0, rel=1e-4)


def test_resume_never_replaces_a_finished_sae_nor_trains_on_another_cache(tmp_path):
    import shutil

    cache, acts = _low_rank_cache(tmp_path)
    train(_small_cfg(cache, tmp_path, "run", n_checkpoints=2), progress=False)
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_000000020")
    train(_small_cfg(cache, tmp_path, "victim", architecture="standard"), progress=False)
    before = _weights(tmp_path / "victim")
    with pytest.raises(ConfigError, match="already holds a finished SAE; resuming would replace it"):
        train(_small_cfg(cache, tmp_path, "victim", resume_from_checkpoint=ckpt), progress=False)
    after = _weights(tmp_path / "victim")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same path now holding different activations
    shutil.rmtree(cache.path)
    tokens = np.full((64, 32), 9, dtype=np.int32)
    write_synthetic_cache(cache.path, acts[::-1].copy() * 2, tokens, dtype="float16", chunk_tokens=256,
                                  chunks_per_shard=2, n_holdout_chunks=1)
    for name in ("cfg.json", "sae_weights.safetensors"):
        (tmp_path / "run" / name).unlink()
    with pytest.raises(ConfigError, match="cache at cache_path differs"):
        train(_small_cfg(cache, tmp_path, "run", n_checkpoints=2, resume_from_checkpoint="latest"), progress=False)


def test_bad_values_are_refused_before_overwrite_deletes_anything(tmp_path):
    cache, _ = _low_rank_cache(tmp_path)
    train(_small_cfg(cache, tmp_path, "keep"), progress=False)
    for bad in ({"seed": -1}, {"lr": float("nan")}, {"adam_beta1": 1.5}, {"lr_warm_up_steps": -5}):
        with pytest.raises(ConfigError):
            train(_small_cfg(cache, tmp_path, "keep", overwrite=True, **bad), progress=False)
    assert (tmp_path / "keep" / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("where", ["checkpoint state", "checkpoint weights", "final SAE"])
def test_a_full_disk_names_the_path_keeps_the_last_checkpoint_and_resumes_from_it(tmp_path, monkeypatch, where):
    from pipeline.checkpoint import list_checkpoints
    from pipeline.errors import SAEWriteError
    from tests.conftest import full_disk_save_file, full_disk_torch_save

    cache, _ = _low_rank_cache(tmp_path)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    if where == "checkpoint state":  # checkpoints at steps 10, 20, 30, 40: the disk fills writing step 20
        full_disk_torch_save(monkeypatch, ".step_000000020.tmp")
    elif where == "checkpoint weights":
        full_disk_save_file(monkeypatch, ".step_000000020.tmp")
    else:
        full_disk_save_file(monkeypatch, str(run / ".sae_weights"))
    with pytest.raises(SAEWriteError) as err:
        train(_small_cfg(cache, tmp_path, "run", n_checkpoints=4), progress=False)
    final = where == "final SAE"
    kept = [10, 20, 30, 40] if final else [10]
    target, what = (run, "the trained SAE") if final else (ckpts / "step_000000020", "checkpoint step_000000020")
    message = str(err.value)
    assert message.startswith(f"cannot write {what} to {target}, the disk is full: No space left on device (ENOSPC")
    assert "free on that filesystem. Nothing half-written reads as complete." in message
    assert message.endswith(f"The last complete checkpoint, {ckpts / f'step_{kept[-1]:09d}'}, is kept. Fix: free "
                            "space on that filesystem, then continue from it: rerun the same `sae-pipeline train` "
                            "command with --resume, or the same `sae-pipeline sweep` command (it resumes "
                            "interrupted points).")
    # the half-written checkpoint is gone, not merely hidden; the SAE folder does not read as finished
    names = [f"step_{s:09d}" for s in kept]
    assert [p.name for p in list_checkpoints(ckpts)] == names and sorted(p.name for p in ckpts.iterdir()) == names
    assert not (run / SAE_CFG_FILENAME).exists()
    # space is back: resuming from the kept checkpoint ends exactly where an uninterrupted run does
    monkeypatch.undo()
    train(_small_cfg(cache, tmp_path, "run", n_checkpoints=4, resume_from_checkpoint="latest"), progress=False)
    train(_small_cfg(cache, tmp_path, "clean", n_checkpoints=4), progress=False)
    resumed, clean = _weights(run), _weights(tmp_path / "clean")
    assert resumed.keys() == clean.keys() and all(torch.equal(resumed[k], clean[k]) for k in clean)


@pytest.mark.parametrize("where", ["output_path", "checkpoint_path"])
def test_an_unwritable_output_or_checkpoint_folder_is_one_error_before_any_step(tmp_path, where):
    from pipeline.errors import SAEWriteError

    cache, _ = _low_rank_cache(tmp_path)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = {"output_path": str(blocker / "sae")} if where == "output_path" else {
        "checkpoint_path": str(blocker / "ckpts")}
    cfg = _small_cfg(cache, tmp_path, "run", n_checkpoints=2)
    cfg = TrainConfig.from_dict({**cfg.to_dict(), **bad})
    with pytest.raises(SAEWriteError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    assert message.startswith(f"cannot write the output folder to {cfg.output_path}")
    assert "Not a directory" in message and str(blocker) in message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step ran
