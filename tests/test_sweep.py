"""Sweeps: grid expansion and stable ids, validation before training, fused groups ending with the
weights of single runs, reruns that skip finished points, failures confined to their point, and
grouping by stream and memory budget."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import TrainConfig
from pipeline.constants import METRICS_LOG_FILENAME, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from pipeline.checkpoint import STATE_FILENAME, list_checkpoints
from pipeline.errors import ConfigError, SAEWriteError
from pipeline.sweep import (GIB, POINT_FILENAME, load_sweep, point_status, read_point_record, run_sweep,
                            sae_memory_bytes, stream_memory_bytes)
from pipeline.training import TrainResult, train, train_group
from tests.conftest import full_disk_torch_save, write_synthetic_cache

# 20 steps of 128 tokens on a 2,048-token cache: a sweep point trains in well under a second.
SMALL = dict(d_sae=32, k=4, lr=3e-3, train_batch_size_tokens=128, training_tokens=128 * 20,
             shuffle_buffer_tokens=512, log_every=5, seed=0)


def low_rank_cache(path, n_seqs=64, ctx=32, d_in=16, rank=4):
    """float16 activations on a rank-4 subspace at norm ~50 (like real residuals), 256-row chunks."""
    rng = np.random.default_rng(0)
    codes = rng.exponential(size=(n_seqs * ctx, rank)) * (rng.random((n_seqs * ctx, rank)) < 0.5)
    acts = (50.0 * codes @ rng.normal(size=(rank, d_in))).astype(np.float32)
    tokens = np.full((n_seqs, ctx), 7, dtype=np.int32)
    return write_synthetic_cache(path, acts, tokens, dtype="float16", chunk_tokens=256, chunks_per_shard=2,
                                 n_holdout_chunks=1)


def write_sweep(tmp_path, cache_path, *, name="s", grid=None, points=None, evaluate=None, **base):
    """A sweep file over ``SMALL`` (plus ``base``; a field given as None is left out) writing to
    ``tmp_path/sweeps/<name>``; its path."""
    fields = {"cache_path": str(cache_path), **SMALL, **base}
    data = {"output_path": str(tmp_path / "sweeps" / name),
            "base": {k: v for k, v in fields.items() if v is not None}}
    for key, value in (("grid", grid), ("points", points), ("evaluate", evaluate)):
        if value is not None:
            data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def weights(folder):
    return load_file(str(folder / SAE_WEIGHTS_FILENAME))


def log_without_timing(folder):
    records = [json.loads(line) for line in (folder / METRICS_LOG_FILENAME).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def assert_same_sae(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert torch.equal(load_file(str(a / SPARSITY_FILENAME))["sparsity"], load_file(str(b / SPARSITY_FILENAME))["sparsity"])
    assert log_without_timing(a) == log_without_timing(b)


# ------------------------------------------------------------------------------------- grid and ids
def test_grid_expands_to_the_cartesian_product_with_stable_readable_ids(tmp_path):
    path = write_sweep(tmp_path, "unused", name="g", grid={"k": [16, 32, 64, 128], "d_sae": [2304, 4608]})
    sweep = load_sweep(path)
    assert [(p.cfg.k, p.cfg.d_sae) for p in sweep.points] == [(k, d) for k in (16, 32, 64, 128) for d in (2304, 4608)]
    point = sweep.points[3]
    digest = hashlib.sha256(json.dumps({"architecture": "topk", "d_sae": 4608, "k": 32}, sort_keys=True).encode())
    assert point.id == f"topk-k32-dsae4608-{digest.hexdigest()[:6]}"
    assert point.params == {"k": 32, "d_sae": 4608, "architecture": "topk"}
    assert point.cfg.output_path == str(tmp_path / "sweeps" / "g" / point.id) and point.cfg.lr == 3e-3
    # the ids survive reordered fields, numbers written otherwise, and an edited base
    path = write_sweep(tmp_path, "unused", name="g", grid={"d_sae": [4608.0, 2304], "k": ["16", 32.0, 64, 128]},
                       lr=1e-3)
    assert {p.id for p in load_sweep(path).points} == {p.id for p in sweep.points}
    assert len({p.id for p in sweep.points}) == 8


def test_points_are_crossed_with_the_grid(tmp_path):
    path = write_sweep(tmp_path, "unused", grid={"d_sae": [64, 128]},
                       points=[{"architecture": "standard", "l1_coefficient": 5}, {"architecture": "topk", "k": 8}])
    points = load_sweep(path).points
    assert [(p.cfg.architecture, p.cfg.d_sae) for p in points] == [("standard", 64), ("standard", 128),
                                                                     ("topk", 64), ("topk", 128)]
    assert points[0].cfg.l1_coefficient == 5 and points[3].cfg.k == 8
    assert re.fullmatch(r"standard-l1_5-dsae64-[0-9a-f]{6}", points[0].id)
    assert re.fullmatch(r"topk-k8-dsae128-[0-9a-f]{6}", points[3].id)


@pytest.mark.parametrize("sweep, message", [
    ({"grid": {"l1_coefficient": [1, -1]}, "base": {"architecture": "standard"}},
     r"point 2 of 2 \(l1_coefficient=-1\): l1_coefficient must be >= 0"),
    ({"grid": {"k": [4, 64]}}, r"point 2 of 2 \(k=64\): k \(64\) must not exceed d_sae \(32\)"),
    ({"grid": {"k": [0, 4, 64]}}, r"2 invalid points:\n  sweep '.*', point 1 of 3 \(k=0\): k must be .*\n"
                                  r"  sweep '.*', point 3 of 3 \(k=64\): k \(64\) must not exceed d_sae \(32\)"),
    ({"grid": {"k": list(range(33, 45))}}, r"12 invalid points:\n(  sweep .*\n){10}  \.\.\. and 2 more$"),
    ({"gird": {"k": [4]}}, "unknown key 'gird'. Did you mean 'grid'"),
    ({"grid": {"k": 4}}, r"grid.k must be a non-empty list"),
    ({"grid": {"output_path": ["a", "b"]}}, "sets 'output_path', which the sweep sets itself"),
    ({"grid": {"k": [4]}, "points": [{"k": 8}]}, "'k' is in both grid and points\\[0\\]"),
    ({"points": [{"k": 4}, {"k": 4.0}]}, "points 1 and 2 are the same point"),
    ({"points": [{"k": 4}, {}]}, r"points 1 \(k=4, architecture=topk\) and 2 \(architecture=topk\) train the same SAE"),
    ({"grid": {"k": [4]}, "evaluate": {"n_ce_sequence": 4}}, "Did you mean 'n_ce_sequences'"),
    ({"grid": {"k": [4, 8]}, "points": [{"architecture": "standard"}]},
     r"point 1 of 2 \(architecture=standard, k=4\): architecture 'standard' does not read 'k'"),
])
def test_bad_sweeps_are_refused_naming_the_point_and_field(tmp_path, sweep, message):
    data = {"output_path": str(tmp_path / "out"), **sweep}
    data["base"] = {**SMALL, **data.get("base", {})}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)
    assert not (tmp_path / "out").exists()


def test_an_empty_sweep_file_is_refused(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="sweep file '.*empty.yaml' is empty; give it a base"):
        load_sweep(path)


def test_a_d_in_mismatch_is_refused_before_anything_trains(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    path = write_sweep(tmp_path, cache.path, grid={"d_in": [16, 32]})
    with pytest.raises(ConfigError, match=r"point topk-din32-\w+: d_in 32 .* does not match the cache \(16"):
        run_sweep(load_sweep(path), progress=False)
    assert not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------------------------- fused training
RESAMPLING = {"resample_dead_latents": True, "feature_sampling_window": 5, "dead_feature_window": 1}
FUSED_POINTS = [  # every architecture; the first two resample >= 128 dead latents, each from its own RNG stream
    {"architecture": "topk", "k": 1, "d_sae": 256, **RESAMPLING},
    {"architecture": "topk", "k": 2, "d_sae": 256, **RESAMPLING},
    {"architecture": "topk", "k": 8, "training_tokens": 128 * 12},  # fewer steps: a prefix of the stream
    {"architecture": "standard", "l1_coefficient": 0.5, "resample_dead_latents": True, "feature_sampling_window": 7,
     "dead_feature_window": 3},
    {"architecture": "gated", "l1_coefficient": 0.5},
    {"architecture": "batchtopk", "k": 4},
    {"architecture": "jumprelu", "l0_coefficient": 0.1},
    {"architecture": "matryoshka", "k": 4, "matryoshka_widths": [8, 32]},
]


def test_a_fused_group_ends_with_exactly_the_weights_of_single_runs(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    cfgs = [TrainConfig(**{**SMALL, **p, "cache_path": str(cache.path), "output_path": str(tmp_path / "group" / str(i))})
            for i, p in enumerate(FUSED_POINTS)]
    outcomes = train_group(cfgs, progress=False)
    assert all(isinstance(o, TrainResult) for o in outcomes), outcomes
    assert [o.state.step for o in outcomes] == [c.total_steps for c in cfgs] and cfgs[2].total_steps == 12
    for i, cfg in enumerate(cfgs):
        alone = tmp_path / "single" / str(i)
        train(replace(cfg, output_path=str(alone)), progress=False)
        assert_same_sae(tmp_path / "group" / str(i), alone)


def stop_at(folder, step):
    """Leave ``folder`` as a run killed after its checkpoint at ``step``: no SAE, no later checkpoint
    (its log still runs past ``step``, as a killed run's does)."""
    for ckpt in list_checkpoints(folder / "checkpoints"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME):
        (folder / name).unlink()


def test_a_group_resumes_members_stopped_at_different_steps_to_the_uninterrupted_weights(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    points = [{"k": 1, "d_sae": 256, **RESAMPLING, "n_checkpoints": 4},  # stopped at step 15 of 20
              {"k": 4, "n_checkpoints": 2},                             # at step 10 of 20
              {"k": 8, "training_tokens": 128 * 12, "n_checkpoints": 4},  # at step 9 of 12
              {"architecture": "standard", "l1_coefficient": 0.5}]      # from scratch

    def cfgs(root):
        return [TrainConfig(**{**SMALL, **p, "cache_path": str(cache.path), "output_path": str(tmp_path / root / str(i))})
                for i, p in enumerate(points)]

    train_group(cfgs("full"), progress=False)
    shutil.copytree(tmp_path / "full", tmp_path / "stopped")
    for i, step in ((0, 15), (1, 10), (2, 9)):
        stop_at(tmp_path / "stopped" / str(i), step)
    shutil.rmtree(tmp_path / "stopped" / "3")
    resumed = [replace(c, resume_from_checkpoint="latest") if i < 3 else c for i, c in enumerate(cfgs("stopped"))]
    outcomes = train_group(resumed, progress=False)
    assert all(isinstance(o, TrainResult) for o in outcomes), outcomes
    assert [o.state.step for o in outcomes] == [20, 20, 12, 20]
    for i in range(len(points)):
        assert_same_sae(tmp_path / "full" / str(i), tmp_path / "stopped" / str(i))


def test_a_group_reads_each_chunk_as_often_as_one_single_run(tmp_path, monkeypatch):
    from pipeline.cache import ActivationCache

    cache = low_rank_cache(tmp_path / "cache")
    reads = []
    real_read = ActivationCache.read_chunk

    def counting_read(self, hook, i, **kw):
        reads.append(i)
        return real_read(self, hook, i, **kw)

    monkeypatch.setattr(ActivationCache, "read_chunk", counting_read)
    cfgs = [TrainConfig(**{**SMALL, "k": k, "cache_path": str(cache.path), "output_path": str(tmp_path / str(k))})
            for k in (1, 2, 4)]
    train(replace(cfgs[0], output_path=str(tmp_path / "single")), progress=False)
    single = len(reads)
    reads.clear()
    train_group(cfgs, progress=False)
    assert single > 7 and len(reads) == single  # 3 SAEs, the bytes of one run: 1/3 per trained token


def test_each_sae_of_a_group_logs_to_its_own_wandb_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: dict[str, list[int]] = {}
    real_init = wandb.init

    def spy_init(**kw):
        run = real_init(**kw)
        real_log = run.log
        run.log = lambda data, step=None: (logged.setdefault(kw["name"], []).append(step), real_log(data, step=step))
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    cache = low_rank_cache(tmp_path / "cache")
    cfgs = [TrainConfig(**{**SMALL, "k": k, "cache_path": str(cache.path), "output_path": str(tmp_path / str(k)),
                           "log_to_wandb": True, "run_name": f"k{k}"}) for k in (2, 4)]
    train_group(cfgs, progress=False)
    assert logged == {"k2": [10, 20], "k4": [10, 20]}


def test_a_group_refuses_configs_with_different_batch_streams(tmp_path):
    a = TrainConfig(**SMALL, cache_path="c", output_path=str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="differ in seed, which fix the batch stream"):
        train_group([a, replace(a, seed=1, output_path=str(tmp_path / "b"))], progress=False)
    with pytest.raises(ConfigError, match="share an output_path"):
        train_group([a, replace(a, k=8)], progress=False)


def test_a_nan_point_fails_alone_and_leaves_no_sae(tmp_path, capsys):
    cache = low_rank_cache(tmp_path / "cache")
    # lr 1e30: the first (clipped) step moves the weights by ~1e30, so step 1's loss overflows
    path = write_sweep(tmp_path, cache.path, grid={"lr": [3e-3, 1e30]})
    sweep = load_sweep(path)
    good, bad = sweep.points
    assert bad.id.startswith("topk-lr1e_30-")
    result = run_sweep(sweep, progress=False)
    assert result.trained == [good.id] and list(result.failed) == [bad.id]
    assert re.match(r"loss became (inf|nan) at step 1: ", result.failed[bad.id])
    assert f"FAILED {bad.id}: loss became" in capsys.readouterr().out
    bad_folder = sweep.folder(bad)
    assert not (bad_folder / SAE_CFG_FILENAME).exists() and not (bad_folder / SAE_WEIGHTS_FILENAME).exists()
    assert read_point_record(bad_folder)["status"] == "failed"
    # the survivor is exactly what it would have been without its failing neighbour
    train(replace(good.cfg, output_path=str(tmp_path / "alone"), overwrite=False, run_name=None), progress=False)
    assert_same_sae(sweep.folder(good), tmp_path / "alone")
    # a rerun retries the failed point and skips the finished one
    again = run_sweep(load_sweep(path), progress=False)
    assert again.skipped == [good.id] and list(again.failed) == [bad.id]


@pytest.mark.parametrize("fault, fails_at, kept", [
    ("before", 12, 10),  # W_dec poisoned before step 12: its loss is NaN
    ("after", 15, 10),   # the update of step 15 leaves a NaN: checkpoint step_15 must not be written
])
def test_a_nan_in_one_sae_of_a_fused_group_keeps_its_last_checkpoint_and_the_others_finish(
        tmp_path, monkeypatch, fault, fails_at, kept):
    from pipeline.checkpoint import list_checkpoints, load_checkpoint_state
    from pipeline.report import evaluate_points
    from pipeline.training import Trainer

    real_step = Trainer.step

    def poison(trainer, when):  # only the SAE with l1_coefficient 1 is hit, at the chosen moment
        if trainer.cfg.l1_coefficient == 1 and fault == when and trainer.state.step == fails_at:
            with torch.no_grad():
                trainer.sae.W_dec[0, 0] = float("nan")

    def poisoned_step(self, x):
        poison(self, "before")
        metrics = real_step(self, x)
        poison(self, "after")
        return metrics

    monkeypatch.setattr(Trainer, "step", poisoned_step)
    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"l1_coefficient": [0.5, 1, 2]}, architecture="standard",
                                   k=None, n_checkpoints=4, log_every=1))
    ok_a, bad, ok_b = sweep.points
    result = run_sweep(sweep, progress=False)
    assert len(result.groups) == 1 and sorted(result.trained) == sorted([ok_a.id, ok_b.id])
    folder, error = sweep.folder(bad), result.failed[bad.id]
    assert read_point_record(folder)["status"] == "failed" and read_point_record(folder)["error"] == error
    cause = "loss became nan" if fault == "before" else r"the parameters became NaN/Inf \(not saved\)"
    assert re.match(rf"^{cause} at step {fails_at}: ", error), error
    assert "W_dec: 1 of 512 values NaN/Inf (1 NaN, 0 Inf)" in error
    assert f"Its last checkpoint, {folder / 'checkpoints' / f'step_{kept:09d}'}, is kept." in error
    # the others finished and are evaluated; the failed point has no SAE, only its good checkpoints
    assert evaluate_points(sweep.output_path, ce_loss=False) == [ok_a.id, ok_b.id]
    for point in (ok_a, ok_b):
        assert json.loads((sweep.folder(point) / "metrics.json").read_text())["explained_variance"] > 0
    assert not (folder / SAE_CFG_FILENAME).exists()
    steps_kept = [int(c.name.removeprefix("step_")) for c in list_checkpoints(folder / "checkpoints")]
    assert steps_kept == list(range(5, kept + 1, 5))
    # the kept checkpoint loads and is exactly the state the same SAE reaches trained alone, unpoisoned
    monkeypatch.undo()
    train(replace(bad.cfg, output_path=str(tmp_path / "alone"), overwrite=False, run_name=None), progress=False)
    ours, alone = (f / "checkpoints" / f"step_{kept:09d}" for f in (folder, tmp_path / "alone"))
    saved, clean = load_checkpoint_state(ours), load_checkpoint_state(alone)
    assert saved["sae"].keys() == clean["sae"].keys()
    assert all(torch.equal(saved["sae"][k], clean["sae"][k]) for k in clean["sae"])
    assert saved["trainer"]["step"] == clean["trainer"]["step"] == kept
    assert weights(ours).keys() == weights(alone).keys()
    assert all(torch.equal(weights(ours)[k], weights(alone)[k]) for k in weights(alone))
    # the last finite loss named is the one the SAE logged for the step before the fault
    log = (tmp_path / "alone" / METRICS_LOG_FILENAME).read_text().splitlines()
    logged = {r["step"]: r["loss"] for r in map(json.loads, log)}
    assert f"last finite loss {logged[fails_at]:.6g} at step {fails_at - 1}." in error


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")])
def test_an_out_of_memory_point_fails_alone(tmp_path, monkeypatch, error):
    from pipeline.training import Trainer

    real_step = Trainer.step

    def step_or_run_out(self, x):
        if self.cfg.k == 2 and self.state.step == 3:
            raise error
        return real_step(self, x)

    monkeypatch.setattr(Trainer, "step", step_or_run_out)
    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4]}))
    result = run_sweep(sweep, progress=False)
    assert result.trained == [sweep.points[1].id]
    assert result.failed == {sweep.points[0].id: f"{type(error).__name__}: {error}"}
    assert read_point_record(sweep.folder(sweep.points[0]))["status"] == "failed"
    assert not (sweep.folder(sweep.points[0]) / SAE_CFG_FILENAME).exists()


# ------------------------------------------------------------------------------------- reruns
def test_a_rerun_trains_only_new_and_changed_points(tmp_path, capsys):
    cache = low_rank_cache(tmp_path / "cache")
    first_sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4]}))
    ids = [p.id for p in first_sweep.points]
    first = run_sweep(first_sweep, progress=False)
    assert first.trained == ids and first.skipped == [] and len(first.groups) == 1
    stamps = {pid: (first_sweep.output_path / pid / SAE_WEIGHTS_FILENAME).stat().st_mtime_ns for pid in ids}
    record = read_point_record(first_sweep.output_path / ids[0])
    assert record["status"] == "finished" and record["params"] == {"k": 2, "architecture": "topk"}

    again = run_sweep(load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4]})), progress=False)
    assert again.trained == [] and again.skipped == ids and again.groups == []
    assert f"skip {ids[0]} (finished)" in capsys.readouterr().out
    assert stamps == {pid: (first_sweep.output_path / pid / SAE_WEIGHTS_FILENAME).stat().st_mtime_ns for pid in ids}

    grown_sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4, 8]}))
    grown = run_sweep(grown_sweep, progress=False)
    assert grown.skipped == ids and grown.trained == [grown_sweep.points[2].id]

    changed_sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4, 8]}, lr=1e-3))
    status = point_status(changed_sweep.folder(changed_sweep.points[0]), changed_sweep.points[0].cfg,
                          record["cache"])
    assert (status.kind, status.detail) == ("changed", "lr: 0.003 → 0.001")
    changed = run_sweep(changed_sweep, progress=False)
    assert changed.trained == [p.id for p in changed_sweep.points] == ids + [grown_sweep.points[2].id]
    assert yaml.safe_load((changed_sweep.folder(changed_sweep.points[0]) / "train_config.yaml").read_text())["lr"] == 1e-3


def test_an_interrupted_point_is_retrained(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2]}))
    run_sweep(sweep, progress=False)
    folder = sweep.folder(sweep.points[0])
    (folder / POINT_FILENAME).unlink()  # killed after saving the SAE, before recording the outcome
    assert point_status(folder, sweep.points[0].cfg, {}).kind == "unfinished"
    assert run_sweep(sweep, progress=False).trained == [sweep.points[0].id]


def test_an_unwritable_sweep_folder_is_one_error_before_anything_trains(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    (tmp_path / "afile").write_text("not a folder")
    path = write_sweep(tmp_path, cache.path, grid={"k": [2]})
    path.write_text(path.read_text().replace(str(tmp_path / "sweeps" / "s"), str(tmp_path / "afile" / "sw")))
    sweep = load_sweep(path)
    with pytest.raises(SAEWriteError, match=r"cannot write the sweep folder '.*afile/sw': Not a directory \(ENOTDIR "
                                            r".*Nothing was trained. Fix: make it writable"):
        run_sweep(sweep, progress=False)


def test_a_sweep_stopped_by_a_full_disk_resumes_each_point_from_its_checkpoint(tmp_path, capsys):
    cache = low_rank_cache(tmp_path / "cache")
    points = [{"k": 2, "n_checkpoints": 4}, {"k": 4, "n_checkpoints": 2}, {"k": 8}]
    reference = load_sweep(write_sweep(tmp_path, cache.path, name="ref", points=points))
    run_sweep(reference, progress=False)
    path = write_sweep(tmp_path, cache.path, points=points)
    sweep = load_sweep(path)
    k2, k4, k8 = sweep.points
    # one group; after step 20 k2 writes its checkpoint, then the disk fills as k4 writes its own
    with pytest.MonkeyPatch.context() as mp:
        full_disk_torch_save(mp, f"{k4.id}/checkpoints/.step_000000020.tmp")
        with pytest.raises(SAEWriteError) as err:
            run_sweep(sweep, progress=False)
    message = str(err.value)
    k4_checkpoints = sweep.folder(k4) / "checkpoints"
    assert message.startswith(f"cannot write checkpoint step_000000020 to {k4_checkpoints / 'step_000000020'}, "
                              "the disk is full: ")
    assert f"The last complete checkpoint, {k4_checkpoints / 'step_000000010'}, is kept." in message
    assert message.endswith("or the same `sae-pipeline sweep` command (it resumes interrupted points).")
    identity = read_point_record(reference.folder(k4))["cache"]
    statuses = [point_status(sweep.folder(p), p.cfg, identity) for p in sweep.points]
    assert [(s.kind, s.detail) for s in statuses] == [("unfinished", "resume from step 20 of 20"),
                                                      ("unfinished", "resume from step 10 of 20"),
                                                      ("unfinished", "from scratch, no checkpoint")]
    # a changed config, other activations or a damaged checkpoint: from scratch, saying why
    changed = point_status(sweep.folder(k4), replace(k4.cfg, lr=1e-3), identity)
    other_cache = point_status(sweep.folder(k4), k4.cfg, {**identity, "tokens_sha256": "0"})
    shutil.copytree(sweep.folder(k4), tmp_path / "damaged")
    state = tmp_path / "damaged" / "checkpoints" / "step_000000010" / STATE_FILENAME
    state.write_bytes(state.read_bytes()[:40])
    damaged = point_status(tmp_path / "damaged", replace(k4.cfg, output_path=str(tmp_path / "damaged")), identity)
    for status, why in ((changed, "lr: checkpoint 0.003, now 0.001"), (other_cache, "cache at cache_path differs"),
                        (damaged, "cannot be read")):
        assert status.resume_from is None and status.detail.startswith(
            "from scratch, its latest checkpoint step_000000010 cannot be resumed: ") and why in status.detail
    # a damaged newest checkpoint with a good one before it: resume from that one
    shutil.copytree(sweep.folder(k2), tmp_path / "damaged_k2")
    newest = tmp_path / "damaged_k2" / "checkpoints" / "step_000000020" / STATE_FILENAME
    newest.write_bytes(newest.read_bytes()[:40])
    older = point_status(tmp_path / "damaged_k2", replace(k2.cfg, output_path=str(tmp_path / "damaged_k2")), identity)
    assert older.resume_from == str(tmp_path / "damaged_k2" / "checkpoints" / "step_000000015")
    assert older.detail.startswith("resume from step 15 of 20 (step_000000020 cannot be resumed: ")
    # space is back: the same command resumes k2 and k4 and retrains k8, all ending as uninterrupted
    capsys.readouterr()
    result = run_sweep(load_sweep(path), progress=False)
    out = capsys.readouterr().out
    assert f"continue {k2.id} (unfinished: resume from step 20 of 20)" in out
    assert f"continue {k4.id} (unfinished: resume from step 10 of 20)" in out
    assert f"retrain {k8.id} (unfinished: from scratch, no checkpoint)" in out
    assert f"{k4.id} (unfinished: resume from step 10 of 20)" in out.split("group 1:")[1]
    assert result.trained == [k2.id, k4.id, k8.id] and len(result.groups) == 1
    for point, ref in zip(sweep.points, reference.points):
        assert_same_sae(sweep.folder(point), reference.folder(ref))


# ------------------------------------------------------------------------------------- grouping
def test_groups_follow_the_batch_stream_and_the_memory_budget(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"seed": [0, 1], "d_sae": [32, 64]}))
    cfg = sweep.points[0].cfg
    # parameters, gradients and Adam moments of W_enc, W_dec, biases; a step's [B, d_sae], [B, d_in] tensors
    assert sae_memory_bytes(cfg, 16) == (4 * (2 * 16 * 32 + 3 * 32 + 16) * 4, 4 * 128 * (32 + 16) * 4)
    assert stream_memory_bytes(cfg, 16, 2) == 3 * 512 * 16 * 2 + 6 * 128 * 16 * 4
    assert stream_memory_bytes(cfg, 16, 2, train_rows=300) == 3 * 300 * 16 * 2 + 6 * 128 * 16 * 4  # buffer never fuller
    one_per_seed = run_sweep(sweep, dry_run=True, progress=False).groups
    assert [[p.cfg.seed for p in g.points] for g in one_per_seed] == [[0, 0], [1, 1]]
    states = [sae_memory_bytes(p.cfg, 16) for p in one_per_seed[0].points]
    assert one_per_seed[0].memory_bytes == (stream_memory_bytes(cfg, 16, 2, 1792) + sum(s for s, _ in states)
                                            + max(step for _, step in states))
    budget = (one_per_seed[0].memory_bytes - 1) / GIB  # one byte short of a pair
    alone = run_sweep(sweep, max_memory_gb=budget, dry_run=True, progress=False).groups
    assert [len(g.points) for g in alone] == [1, 1, 1, 1]
    assert not (tmp_path / "sweeps").exists()  # a dry run writes nothing


def test_cli_sweep_dry_run_prints_the_plan(tmp_path):
    from click.testing import CliRunner

    from stages.cli import cli

    cache = low_rank_cache(tmp_path / "cache")
    path = write_sweep(tmp_path, cache.path, grid={"k": [2, 4]})
    out = CliRunner().invoke(cli, ["sweep", "--config", str(path), "--dry-run", "--set", "lr=1e-3"])
    assert out.exit_code == 0, out.output
    assert "2 points, 0 finished (skipped), 2 to train in 1 group" in out.output
    assert re.search(r"group 1: 2 SAEs, ~0.00 GiB, up to 20 batches of 128 tokens", out.output)


def test_a_point_another_run_is_training_is_left_alone_and_trained_once_it_is_free(tmp_path, capsys):
    import os
    import socket

    from pipeline.sweep import claimed_points

    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2, 4]}))
    busy, free = sweep.points
    with claimed_points(sweep, [busy]) as elsewhere:  # as another run would hold it (a separate open file)
        assert elsewhere == {}
        result = run_sweep(sweep, progress=False)
    out = capsys.readouterr().out
    assert result.busy == [busy.id] and result.trained == [free.id]
    assert not sweep.folder(busy).exists()  # never reset, resumed or written
    assert f"skip {busy.id} (being trained elsewhere: pid {os.getpid()} on {socket.gethostname()})" in out
    assert "2 points, 0 finished (skipped), 1 being trained by another run, 1 to train" in out
    result = run_sweep(load_sweep(sweep.source), progress=False)  # the lock is free again
    assert result.trained == [busy.id] and result.skipped == [free.id] and result.busy == []
