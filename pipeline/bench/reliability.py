"""SIGKILL trials: kill a harvest or a training run at random moments, resume it, and check that
nothing was lost. Writes the figures to ``RELIABILITY.md``.

    python -m pipeline.bench.reliability [--harvest-trials 20] [--train-trials 5] [--sweep-trials 5]
        [--disk-full-trials 10] [--only KIND ...] [--seed 0] [--workdir data/bench/reliability]
        [--out RELIABILITY.md]

``--only sweep`` (repeatable; kinds: harvest, train, sweep, disk_full) runs those kinds alone and
keeps the other kinds' trials from the last run's ``<workdir>/reliability.json``; each kind draws
from its own random stream (seeded by ``--seed`` and the kind), as in a full run.

Each trial runs the real CLI (``python -m stages ...``) in a child process, sends it SIGKILL after
a random delay (uniform over the reference run's wall time, so kills land during model loading,
chunk writes, metadata updates, training steps and checkpoint writes alike), then:

* **harvest**: checks that the killed folder never opens as a complete cache unless it equals the
  reference, re-runs the same command, and compares the finished cache with an uninterrupted
  harvest of the same config: every hook's array, the token ids, the per-chunk checksums and the
  identity attributes must be identical.
* **train**: checks that every checkpoint folder left behind loads (SAE and ``training_state.pt``),
  re-runs with ``--resume`` (or, when killed before the first checkpoint, from scratch with
  ``--overwrite``), and compares the final ``sae_weights.safetensors`` tensors with an
  uninterrupted run: they must be bit-identical.
* **sweep**: kills a ``sae-pipeline sweep --no-report`` of two TopK points trained as one fused
  group (8 checkpoints each), checks that every checkpoint and every saved SAE of every point
  loads, re-runs the same command (it resumes the interrupted points from their latest
  checkpoints), and compares every point's final weights with an uninterrupted sweep's.

* **disk full**: runs the same harvest in this process with the disk "filling up" at a random
  file write (uniform over every write of an uninterrupted harvest, so it lands while the cache is
  created, while a chunk's data, its checksums or the progress attribute is written, or while the
  statistics are recorded): from that write on, zarr's writes fail with ENOSPC after half-writing
  their temporary file (:class:`FullDisk`). The harvest must stop with a
  :class:`~pipeline.errors.CacheWriteError` naming the path and ENOSPC, leave no lock and no
  half-written file in the cache, its folder refused as incomplete (or absent), and a re-run once
  the space is back must finish a cache identical to the reference.

The harvest uses SmolLM2-135M at ``blocks.0.hook_resid_post`` (the forward pass stops after
block 0, so a trial takes seconds) on the Tiny Shakespeare text of ``../shared/data``, with small
chunks so most kills land between or inside chunk writes.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import trange

from pipeline.bench.sweep_memory import existing_block
from pipeline.cache import ActivationCache, lock_path, verify
from pipeline.checkpoint import STATE_FILENAME, list_checkpoints
from pipeline.constants import CHECKSUMS_GROUP, SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from pipeline.errors import CacheError
from pipeline.sae import SAE
from pipeline.sweep import read_index

HOOK = "blocks.0.hook_resid_post"
HARVEST_TOKENS = 8192  # the trials' harvests: 16 chunks of 512 tokens


# The fault each kind of trial injects, as RELIABILITY.md names it.
FAULTS = {"harvest": "SIGKILL during harvest", "train": "SIGKILL during train", "sweep": "SIGKILL during sweep",
          "disk_full": "disk full during harvest"}


@dataclass
class Trial:
    """One fault: when (``"12.34 s"`` after the start, or ``"write 57 of 131"``), what state it
    left, and whether the resumed result equals the reference."""

    kind: str
    fault_at: str
    state_at_kill: str
    left_valid: bool
    resumed_identical: bool
    notes: list[str] = field(default_factory=list)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "stages", *args]


def _run(cmd: list[str]) -> float:
    """Run ``cmd`` to completion; returns its wall time. Raises RuntimeError with its output on failure."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def _kill_after(cmd: list[str], delay: float) -> bool:
    """Start ``cmd``, SIGKILL it after ``delay`` seconds; returns whether it was still running."""
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        child.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
        return True


# ------------------------------------------------------------------------------------- harvest
def harvest_command(shared_data: Path, out: Path, n_tokens: int) -> list[str]:
    return _cli("harvest", "--model-name", "smollm2-135m", "--hook-names", HOOK,
                "--dataset-path", str(shared_data / "tinyshakespeare" / "input.txt"),
                "--n-tokens", str(n_tokens), "--context-size", "64", "--holdout-tokens", "1024",
                "--set", "chunk_tokens=512", "--set", "chunks_per_shard=2", "--output-path", str(out))


def cache_content(path: Path) -> dict[str, Any]:
    """Everything a finished cache holds: every array as numpy, and its attributes as JSON text."""
    cache = ActivationCache.open(path)
    content = {name: np.asarray(cache.group[name][:]) for name in [*cache.hook_names, "tokens"]}
    for hook in cache.hook_names:
        content[f"{CHECKSUMS_GROUP}/{hook}"] = np.asarray(cache.group[f"{CHECKSUMS_GROUP}/{hook}"][:])
    content["attrs"] = json.dumps(cache.attrs, sort_keys=True)  # a harvest records no timestamps
    return content


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if isinstance(a[k], str) else np.array_equal(a[k], b[k]) for k in a)


def _harvest_state(path: Path, reference: dict[str, Any]) -> tuple[str, bool]:
    """(state name, valid) of a killed harvest folder. Valid: it is either refused as incomplete
    (the reader never trains on it) or opens complete AND equals the reference."""
    if not (path / "zarr.json").is_file():
        return "nothing written", True
    try:
        cache = ActivationCache.open(path, require_complete=False)
    except CacheError:
        return "metadata unreadable (refused)", True
    state = f"{cache.n_chunks_written}/{cache.layout.n_chunks} chunks"
    if not cache.complete:
        try:
            ActivationCache.open(path)
            return state + ", incomplete but opened", False
        except CacheError:
            return state + ", refused as incomplete", True
    return "complete", not verify(cache, progress=False) and same_content(cache_content(path), reference)


def run_harvest_trials(n: int, workdir: Path, shared_data: Path, rng: random.Random,
                       n_tokens: int = HARVEST_TOKENS) -> list[Trial]:
    """``n`` harvest kills (plus one uninterrupted reference harvest, kept at ``workdir/harvest_reference``)."""
    def command(out: Path) -> list[str]:
        return harvest_command(shared_data, out, n_tokens)

    return _kill_trials("harvest", n, workdir, rng, command, cache_content, same_content,
                        _harvest_state, command)


def _kill_trials(kind: str, n: int, workdir: Path, rng: random.Random, command, read, same, inspect,
                 rerun) -> list[Trial]:
    """Run ``command(<workdir>/<kind>_reference)`` once uninterrupted, then ``n`` times: start
    ``command(out)``, SIGKILL it after a random delay, ``inspect(out, reference) -> (state, valid)``,
    run ``rerun(out)`` (a command, or None to leave it) and compare ``read(out)`` with the reference
    using ``same``."""
    ref_path = workdir / f"{kind}_reference"
    _clear(ref_path)
    wall = _run(command(ref_path))
    reference = read(ref_path)
    trials = []
    for t in trange(n, desc=f"{kind} kills"):
        out = workdir / f"{kind}_trial_{t}"
        _clear(out)
        delay = rng.uniform(0.0, wall)
        if _kill_after(command(out), delay):
            state, valid = inspect(out, reference)
            follow_up = rerun(out)
            if follow_up is not None:
                _run(follow_up)
        else:
            state, valid = "finished before the kill", True
        trials.append(Trial(kind, f"{delay:.2f} s", state, valid, same(read(out), reference)))
        _clear(out)
    return trials


# ----------------------------------------------------------------------------------- disk full
class FullDisk:
    """While entered, zarr's file writes count themselves and, once armed, fail with ENOSPC after
    ``after`` more succeed, the way writes fail on a full disk: the temporary file is half
    written, then the write raises and zarr's own cleanup removes it (until :meth:`free`).
    ``writes`` counts the writes that succeeded, ``refused`` those that failed."""

    def __init__(self) -> None:
        import zarr.storage._local as local

        self._local, self._real_put = local, local._put
        self.writes, self.refused, self.armed_after = 0, 0, None

    def __enter__(self) -> "FullDisk":
        self._local._put = self._put
        return self

    def __exit__(self, *exc: Any) -> None:
        self.free()

    def arm(self, after: int = 0) -> None:
        """Fill the disk after ``after`` more writes (a second call changes nothing)."""
        if self.armed_after is None:
            self.armed_after = after

    def free(self) -> None:
        self._local._put = self._real_put

    def _put(self, path: Path, value: Any, exclusive: bool = False) -> int:
        if self.armed_after is None or self.armed_after > 0:
            self.armed_after = None if self.armed_after is None else self.armed_after - 1
            self.writes += 1
            return self._real_put(path, value, exclusive)
        self.refused += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._local._atomic_write(path, "wb", exclusive=exclusive) as f:
            f.write(value.as_buffer_like()[: len(value) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def harvest_config(shared_data: Path, out: Path, n_tokens: int):
    """The HarvestConfig of :func:`harvest_command`, for trials that run the harvest in this process."""
    from pipeline.config import HarvestConfig

    return HarvestConfig(model_name="smollm2-135m", hook_names=[HOOK], n_tokens=n_tokens, context_size=64,
                         dataset_path=str(shared_data / "tinyshakespeare" / "input.txt"), holdout_tokens=1024,
                         chunk_tokens=512, chunks_per_shard=2, output_path=str(out))


def run_disk_full_trials(n: int, workdir: Path, shared_data: Path, rng: random.Random, n_tokens: int = HARVEST_TOKENS,
                         model: Any = None) -> list[Trial]:
    """``n`` harvests whose disk fills at a random write, each re-run once the space is back (see the
    module docstring); one uninterrupted reference harvest is kept at ``workdir/disk_full_reference``."""
    from pipeline.harvest import harvest
    from pipeline.models import load_model

    model = model if model is not None else load_model("smollm2-135m")
    ref_path = workdir / "disk_full_reference"
    _clear(ref_path)
    with FullDisk() as counter:
        harvest(harvest_config(shared_data, ref_path, n_tokens), model=model)
    reference = cache_content(ref_path)
    trials = []
    for t in trange(n, desc="disk-full faults"):
        out, at = workdir / f"disk_full_trial_{t}", rng.randrange(counter.writes)
        cfg = harvest_config(shared_data, out, n_tokens)
        _clear(out)
        with FullDisk() as disk:
            disk.arm(after=at)
            state, valid = _disk_full_outcome(out, reference, lambda: harvest(cfg, model=model))
        harvest(cfg, model=model)  # the space is back: the same command again
        trials.append(Trial("disk_full", f"write {at + 1} of {counter.writes}", state, valid,
                            same_content(cache_content(out), reference)))
        _clear(out)
    return trials


def _disk_full_outcome(out: Path, reference: dict[str, Any], run) -> tuple[str, bool]:
    """Run ``run`` on a disk that fills: (state, valid). Valid: it raised a CacheWriteError naming
    the path and ENOSPC, left no lock nor half-written file in the cache, and the folder is refused
    as incomplete or absent (:func:`_harvest_state`)."""
    from pipeline.errors import CacheWriteError

    try:
        run()
        return "finished before the disk filled", True
    except CacheWriteError as err:
        clear = f"cache at {str(out)!r}" in str(err) and "ENOSPC" in str(err)
    state, valid = _harvest_state(out, reference)
    leftovers = lock_path(out).exists() or any(out.rglob("*.partial"))
    return f"stopped: {state}", valid and clear and not leftovers


# --------------------------------------------------------------------------------------- train
def train_command(cache: Path, out: Path, *extra: str) -> list[str]:
    return _cli("train", "--cache-path", str(cache), "--architecture", "topk", "--k", "16", "--d-sae", "1024",
                "--training-tokens", "98304", "--train-batch-size-tokens", "1024", "--n-checkpoints", "8",
                "--output-path", str(out), *extra)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / SAE_WEIGHTS_FILENAME))


def _checkpoints_valid(folder: Path) -> tuple[int, bool]:
    """How many checkpoints a killed run left, and whether every one of them loads."""
    found = list_checkpoints(folder / "checkpoints")
    try:
        for ckpt in found:
            SAE.load(ckpt)
            torch.load(ckpt / STATE_FILENAME, weights_only=True)
    except Exception:  # any failure to load means a half-written checkpoint
        return len(found), False
    return len(found), True


def _train_state(folder: Path, reference: Any) -> tuple[str, bool]:
    n_ckpt, valid = _checkpoints_valid(folder)
    if (folder / SAE_CFG_FILENAME).exists():  # killed after saving the SAE, before exiting
        try:
            SAE.load(folder)
        except Exception:  # a folder with cfg.json that does not load would be a lost SAE
            return "SAE saved", False
        return "SAE saved", valid
    return (f"{n_ckpt} checkpoint(s)" if n_ckpt else "no checkpoint yet (restarted)"), valid


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run_train_trials(n: int, workdir: Path, cache: Path, rng: random.Random) -> list[Trial]:
    """``n`` training kills on ``cache`` (plus one uninterrupted reference run). A run killed
    before its first checkpoint is restarted with ``--overwrite``, one killed after saving its SAE is
    left as it is, the others are resumed with ``--resume``."""
    def rerun(out: Path) -> list[str] | None:
        if (out / SAE_CFG_FILENAME).exists():
            return None  # finished: resuming would (rightly) be refused
        has_checkpoint = bool(list_checkpoints(out / "checkpoints"))
        return train_command(cache, out, "--resume" if has_checkpoint else "--overwrite")

    return _kill_trials("train", n, workdir, rng, lambda out: train_command(cache, out), weights, same_weights,
                        _train_state, rerun)


# --------------------------------------------------------------------------------------- sweep
def sweep_command(cache: Path, out: Path) -> list[str]:
    """The sweep of a trial (its file written beside ``out``): TopK k 16 and 32 at d_sae 1024, one
    fused group of 64 batches of 1024 tokens, 8 checkpoints per point."""
    config = out.with_name(f"{out.name}.yaml")
    config.write_text(json.dumps({  # JSON is YAML
        "output_path": str(out), "grid": {"k": [16, 32]},
        "base": {"cache_path": str(cache), "architecture": "topk", "d_sae": 1024, "training_tokens": 65536,
                 "train_batch_size_tokens": 1024, "n_checkpoints": 8, "seed": 0}}))
    return _cli("sweep", "--config", str(config), "--no-report")


def sweep_weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every point's final weights, by point id (``sweep.json`` lists the points)."""
    return {point["id"]: weights(out / point["id"]) for point in read_index(out)["points"]}


def same_sweep(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> bool:
    return a.keys() == b.keys() and all(same_weights(a[k], b[k]) for k in a)


def _sweep_state(out: Path, reference: dict[str, Any]) -> tuple[str, bool]:
    """("2/2 points with checkpoints (steps 40, 32), 1 SAE saved", valid) of a killed sweep. Valid:
    every checkpoint and every saved SAE of every point loads (:func:`_train_state`)."""
    folders = [out / pid for pid in reference if (out / pid).is_dir()]
    if not folders:
        return "nothing written", True
    latest = [found[-1].name for f in folders if (found := list_checkpoints(f / "checkpoints"))]
    state = f"{len(latest)}/{len(reference)} points with checkpoints"
    if latest:
        state += f" (steps {', '.join(str(int(name.removeprefix('step_'))) for name in latest)})"
    saved = sum((f / SAE_CFG_FILENAME).exists() for f in folders)
    if saved:
        state += f", {saved} SAE{'s' * (saved != 1)} saved"
    return state, all(_train_state(f, None)[1] for f in folders)


def run_sweep_trials(n: int, workdir: Path, cache: Path, rng: random.Random) -> list[Trial]:
    """``n`` sweep kills on ``cache`` (plus one uninterrupted reference sweep), each re-run with the
    same command."""
    def command(out: Path) -> list[str]:
        return sweep_command(cache, out)

    return _kill_trials("sweep", n, workdir, rng, command, sweep_weights, same_sweep, _sweep_state, command)


# ---------------------------------------------------------------------------------------- report
def summary_rows(trials: list[Trial]) -> list[dict[str, Any]]:
    rows = []
    for kind in [k for k in FAULTS if any(t.kind == k for t in trials)]:
        mine = [t for t in trials if t.kind == kind]
        rows.append({"fault": FAULTS[kind], "trials": len(mine),
                     "left_invalid": sum(not t.left_valid for t in mine),
                     "resumed_different": sum(not t.resumed_identical for t in mine),
                     "states": sorted({t.state_at_kill for t in mine})})
    return rows


def markdown(trials: list[Trial], seed: int) -> str:
    lines = ["# Reliability", "",
             "Generated by `python -m pipeline.bench.reliability` (see its docstring for the method); "
             f"seed {seed}. Two counts per fault must be 0: trials whose folder could be read as finished "
             "while wrong (for a full disk also: the error did not name the path and ENOSPC, or the lock or a "
             "half-written file was left), and trials whose resumed result differed from an uninterrupted run.",
             "",
             "| fault | trials | left a folder that reads as valid but is not | resumed result differs | states seen at the fault |",
             "| --- | ---: | ---: | ---: | --- |"]
    for r in summary_rows(trials):
        lines.append(f"| {r['fault']} | {r['trials']} | {r['left_invalid']} | {r['resumed_different']} | "
                     f"{'; '.join(r['states'])} |")
    lines += ["", "Every trial:", "", "| # | kind | fault at | state at the fault | valid | resumed identical |",
              "| ---: | --- | ---: | --- | --- | --- |"]
    lines += [f"| {i} | {t.kind} | {t.fault_at} | {t.state_at_kill} | {t.left_valid} | {t.resumed_identical} |"
              for i, t in enumerate(trials)]
    return "\n".join(lines) + "\n"


def _clear(path: Path) -> None:
    """Remove a trial's folder, and the stale writer lock and half-made cache a killed harvest may
    leave beside it."""
    from pipeline.cache import building_path

    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(building_path(path), ignore_errors=True)
    lock_path(path).unlink(missing_ok=True)


def _reference_harvest(work: Path, shared_data: Path) -> Path:
    """The uninterrupted harvest the train and sweep trials read: the harvest trials' reference,
    harvested here when they did not run."""
    path = work / "harvest_reference"
    try:
        ActivationCache.open(path)
    except CacheError:
        _clear(path)
        _run(harvest_command(shared_data, path, HARVEST_TOKENS))
    return path


def _previous_trials(work: Path) -> list[Trial]:
    """The trials of the last run (``<work>/reliability.json``), or none."""
    path = work / "reliability.json"
    return [Trial(**t) for t in json.loads(path.read_text())] if path.is_file() else []


def run_trials(kind: str, n: int, work: Path, shared_data: Path, seed: int) -> list[Trial]:
    """``n`` trials of ``kind`` (a key of ``FAULTS``), on the random stream of ``seed`` and ``kind``."""
    rng = random.Random(f"{seed}:{kind}")
    if kind == "harvest":
        return run_harvest_trials(n, work, shared_data, rng)
    if kind == "disk_full":
        return run_disk_full_trials(n, work, shared_data, rng)
    run = run_train_trials if kind == "train" else run_sweep_trials
    return run(n, work, _reference_harvest(work, shared_data), rng)


@click.command()
@click.option("--harvest-trials", default=20, show_default=True, type=int)
@click.option("--train-trials", default=5, show_default=True, type=int)
@click.option("--sweep-trials", default=5, show_default=True, type=int)
@click.option("--disk-full-trials", default=10, show_default=True, type=int)
@click.option("--only", multiple=True, type=click.Choice(list(FAULTS)),
              help="Run only these kinds (repeatable); keep the others' trials from <workdir>/reliability.json.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--shared-data", default="../shared/data", show_default=True, type=click.Path(exists=True, file_okay=False))
@click.option("--workdir", default="data/bench/reliability", show_default=True)
@click.option("--out", default="RELIABILITY.md", show_default=True)
def main(harvest_trials: int, train_trials: int, sweep_trials: int, disk_full_trials: int, only: tuple[str, ...],
         seed: int, shared_data: str, workdir: str, out: str) -> None:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    counts = {"harvest": harvest_trials, "train": train_trials, "sweep": sweep_trials, "disk_full": disk_full_trials}
    kinds = only or tuple(FAULTS)
    trials = [t for t in _previous_trials(work) if t.kind not in kinds]
    for kind in kinds:
        trials += run_trials(kind, counts[kind], work, Path(shared_data), seed)
    trials.sort(key=lambda t: list(FAULTS).index(t.kind))  # stable: each kind keeps its trial order
    previous = Path(out).read_text() if Path(out).exists() else ""
    block = existing_block(previous)  # the load curve of pipeline.bench.sweep_memory stays
    Path(out).write_text(markdown(trials, seed) + ("\n" + block if block else ""))
    (work / "reliability.json").write_text(json.dumps([t.__dict__ for t in trials], indent=2))
    for row in summary_rows(trials):
        click.echo(row)
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
