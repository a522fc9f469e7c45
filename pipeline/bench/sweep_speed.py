"""Issue 4's figures: one harvest feeding a sweep of TopK SAEs, against the same points trained in
turn by us and by SAELens 6.54.12, measured side by side in one run.

    python -m pipeline.bench.sweep_speed [--tokens 100000] [--cache data/harvests/anchor_wikitext]
        [--ks 16,32,64,128] [--d-saes 2304,4608] [--workdir data/bench/sweep_speed]
        [--out data/bench/sweep_speed.json] [--no-saelens]

The points: a generated sweep file, ``base`` TopK with lr 4e-4, batch 4096, seed 42 and
``training_tokens = --tokens``, ``grid`` k × d_sae (8 points by default). Every point of every
method trains the same ``ceil(tokens / batch)`` steps. Each training job runs in a fresh ``spawn``
process (:func:`pipeline.bench.memory.in_fresh_process`) on this process's torch thread count, and
its wall time covers one library call (start-up and imports are not timed: a sweep pays them once,
separate commands once per point, so the times understate the fused sweep's advantage):

* ``fused sweep``: :func:`pipeline.sweep.run_sweep` on the file (``sae-pipeline sweep
  --no-report``), all points in one group: plan, cache identity, one loader pass feeding every
  SAE's trainer, saving.
* ``sequential train``: each point's TrainConfig through :func:`pipeline.training.train`
  (``sae-pipeline train``), one process after another; the row sums the calls.
* ``SAELens sequential``: each point trained by SAELens from its own activation cache, one process
  after another. Timed: building ``LanguageModelSAETrainingRunner`` (its ``ActivationsStore`` opens
  the cached dataset) and the steps of its ``run()`` with W&B, prefetching and resuming off:
  ``SAETrainer.fit`` (batches read through the store's mixing buffer) and ``save_final_sae``.
  Same SAE settings as ours (:func:`pipeline.bench.architectures.saelens_config`), lr, Adam betas,
  constant schedule, dead/sampling windows and special tokens excluded. Given, untimed: ``b_dec``
  initialised to the geometric median ours starts from (SAELens 6 starts at zero; ours computes it
  inside its timed call) and our activation scale, so ``fit`` skips its
  ``n_batches_for_norm_estimate``-batch estimate (both favour SAELens). It reads one training batch
  of rows per read (``store_batch_size_prompts = batch / context_size``) into a mixing buffer of
  two batches, half kept (its default fraction). Its model is never called (activations come from
  the cache; evaluations run only with W&B logging), so a placeholder stands in for it.

SAELens's cache is built once, untimed, by its ``CacheActivationsRunner``
(:func:`pipeline.bench.harvest_speed.saelens_cache`, on the cache's model loaded offline), float32,
from the training sequences of our cache in a seeded random order (as its pretokenizer shuffles).
SAELens reads its cache front to back, so only the first sequences of that order that cover what
a run consumes (steps · batch rows plus its buffer and one read) are cached: exactly the rows it
would read from a cache of them all. When a run needs more rows than the training set, every
training sequence is cached and it starts new epochs as it would anyway. The cache is kept in
``workdir`` and reused while its sequences are the same.

Rows (:class:`pipeline.bench.measure.Row`):

* ``sweep`` (seconds): the three wall times; quality: trained tokens/s (SAE-tokens: points ×
  tokens per point), how many times faster than the slower methods, peak memory of the largest job,
  mean held-out explained variance and L0.
* ``sweep_points`` (held-out explained variance of each point of each method, referencing
  SAELens's same point): L0, dead fraction, trained tokens, seconds of its own run; for the fused
  sweep whether its weights equal the sequential run's bit for bit. Held out: the cache's holdout
  chunks, special tokens excluded (:func:`pipeline.evaluate.reconstruction_metrics`).
* ``sweep_cache_reads`` (bytes/trained token): bytes the cache's Zarr store returned while each
  job ran (:class:`CountingStore`): the value counts the activation array's chunk data (compressed,
  with shard indexes), ``all_bytes_*`` also metadata, token ids and checksums. The fused sweep's
  ``activation_bytes_vs_sequential`` is its chunk bytes over all sequential runs' (issue 4: 1/8
  for 8 points).
* ``sweep_memory`` (MiB): peak resident memory (``VmHWM``) of the fused job and of the sequential
  job of the point with the largest estimate, beside the growth over the job's resident set after
  imports and the estimate of :func:`pipeline.sweep.group_memory_bytes`.
* ``sweep_stacking`` (tokens/s): the encoder product of the group's same-shaped SAEs as separate
  ``x @ W_g``, as one ``x @ W_cat`` of the concatenated weights, and as ``torch.bmm``
  (:func:`stacking_rows`), each referencing the separate products.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import click
import numpy as np
import torch
import yaml
import zarr
from zarr.storage import LocalStore, WrapperStore

from pipeline.bench.measure import Row, add_ratios, peak_rss_mib
from pipeline.bench.memory import _rss_mib, in_fresh_process
from pipeline.cache import TORCH_DTYPES, ActivationCache, array_key
from pipeline.chunk_files import ChunkFileReader
from pipeline.config import TrainConfig
from pipeline.constants import SAE_WEIGHTS_FILENAME
from pipeline.errors import SaePipelineError
from pipeline.evaluate import reconstruction_metrics
from pipeline.sae import SAE
from pipeline.sweep import POINT_FILENAME, Sweep, SweepPoint, group_memory_bytes, load_sweep, run_sweep
from pipeline.training import TrainingData, init_b_dec, train

FUSED, SEQUENTIAL, SAELENS = "fused sweep", "sequential train", "SAELens sequential"
SHORT = {SEQUENTIAL: "sequential", SAELENS: "saelens"}
ONE_GROUP_GB = 1024.0  # a budget every point fits in: the fused sweep is one group
SAELENS_FORWARD_BATCH = 16  # sequences per forward when building SAELens's cache


@dataclasses.dataclass
class SweepBench:
    """What to run: the points (k × d_sae), tokens per point and the shared training settings."""

    cache: str = "data/harvests/anchor_wikitext"
    tokens: int = 100_000
    ks: tuple[int, ...] = (16, 32, 64, 128)
    d_saes: tuple[int, ...] = (2304, 4608)
    batch_size: int = 4096
    lr: float = 4e-4
    seed: int = 42
    device: str = "cpu"
    saelens: bool = True
    stacking_repeats: int = 5
    workdir: Path = Path("data/bench/sweep_speed")


# ---------------------------------------------------------------------------------- cache reads
class CountingStore(WrapperStore):
    """A Zarr store that adds the length of every buffer it returns to ``counts[<first two parts of
    its key>]``: the bytes fetched from storage as stored (compressed). ``"<array>/c"`` counts an
    array's chunk data with the shard indexes (``"blocks.8.hook_resid_post/c"``, ``"tokens/c"``),
    ``"<array>/zarr.json"`` its metadata, ``"zarr.json"`` the group's."""

    def __init__(self, store, counts: dict[str, int]):
        super().__init__(store)
        self.counts = counts
        self._lock = threading.Lock()

    def _with_store(self, store):
        return type(self)(store, self.counts)

    def _add(self, key: str, buffer) -> None:
        if buffer is not None:
            with self._lock:
                kind = "/".join(key.split("/", 2)[:2])
                self.counts[kind] = self.counts.get(kind, 0) + len(buffer)

    async def get(self, key, prototype=None, byte_range=None):
        buffer = await self._store.get(key, prototype, byte_range)
        self._add(key, buffer)
        return buffer

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        buffers = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), buffer in zip(key_ranges, buffers):
            self._add(key, buffer)
        return buffers


@contextlib.contextmanager
def counting_cache_reads() -> Iterator[dict[str, int]]:
    """While active, every cache opened for reading (``zarr.open_group(path, mode="r")``, how
    :meth:`pipeline.cache.ActivationCache.open` opens one) reads through a :class:`CountingStore`,
    and every chunk-file read of :mod:`pipeline.chunk_files` (the loader's path, which bypasses the
    store) is counted under the same ``"<array>/c"`` key; yields the ``counts``."""
    counts: dict[str, int] = {}
    original_open, original_read = zarr.open_group, ChunkFileReader._read_bytes
    lock = threading.Lock()

    def open_counting(store=None, *, mode="a", **kwargs):
        if mode == "r" and isinstance(store, (str, Path)):
            store = CountingStore(LocalStore(str(store), read_only=True), counts)
        return original_open(store, mode=mode, **kwargs)

    def read_counting(reader, path, offset, nbytes):
        raw = original_read(reader, path, offset, nbytes)
        with lock:
            counts[f"{reader.array.path}/c"] = counts.get(f"{reader.array.path}/c", 0) + len(raw)
        return raw

    with mock.patch.object(zarr, "open_group", open_counting), \
            mock.patch.object(ChunkFileReader, "_read_bytes", read_counting):
        yield counts


# ------------------------------------------------------------------------------ training jobs
def _measured(run: Callable[[], dict[str, Any]], threads: int) -> dict[str, Any]:
    """``run()``'s report plus its wall seconds, the cache bytes it read and this process's memory."""
    torch.set_num_threads(threads)
    before = _rss_mib()
    with counting_cache_reads() as counts:
        t0 = time.perf_counter()
        report = run()
        seconds = time.perf_counter() - t0
    return {**report, "seconds": seconds, "bytes_read": dict(counts), "peak_rss_mib": peak_rss_mib(),
            "rss_before_mib": before}


def _fused_child(job: dict[str, Any]) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        result = run_sweep(load_sweep(job["sweep_file"]), max_memory_gb=ONE_GROUP_GB, progress=False)
        return {"groups": len(result.groups), "failed": result.failed}
    return _measured(run, job["threads"])


def _train_child(job: dict[str, Any]) -> dict[str, Any]:
    return _measured(lambda: {"tokens": train(TrainConfig.from_dict(job["cfg"]), progress=False).state.tokens_seen},
                     job["threads"])


def _saelens_child(job: dict[str, Any]) -> dict[str, Any]:
    """One point trained by SAELens from its cache (module docstring); ``b_dec`` and the scale are ours."""
    from datasets import Dataset
    from sae_lens.llm_sae_training_runner import LanguageModelSAETrainingRunner
    from sae_lens.registry import get_sae_training_class
    from sae_lens.training.sae_trainer import SAETrainer

    from pipeline.bench.architectures import SAELENS_NAMES, saelens_config

    cfg = TrainConfig.from_dict(job["cfg"])
    data = TrainingData(cfg)
    torch.manual_seed(cfg.seed)
    sae_class, _ = get_sae_training_class(SAELENS_NAMES[cfg.architecture])
    sae = sae_class(saelens_config(cfg, data.d_in, {"hook_name": data.hook, "context_size": job["context_size"],
                                                    "model_name": data.cache.attrs["model_name"]}))
    init_b_dec(sae, data.b_dec_sample, cfg.b_dec_init_method)
    rows = Dataset.from_dict({"input_ids": np.load(job["sequences"]).tolist()})
    runner_cfg = saelens_runner_config(cfg, sae.cfg, job, data.exclude)

    def run() -> dict[str, Any]:
        runner = LanguageModelSAETrainingRunner(runner_cfg, override_dataset=rows, override_model=torch.nn.Module(),
                                                override_sae=sae)
        # The body of runner.run() with W&B, prefetching and resuming off, and our scale given.
        runner._set_sae_metadata()
        trainer = SAETrainer(sae=runner.sae, data_provider=runner.activations_store, evaluator=runner.evaluator,
                             save_checkpoint_fn=runner.save_checkpoint, cfg=runner_cfg.to_sae_trainer_config())
        trainer.activation_scaler.scaling_factor = data.scale  # fit() then skips its own estimate
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trained = runner.run_trainer_with_interruption_handling(trainer)
        runner.save_final_sae(trained, runner_cfg.output_path, trainer.log_feature_sparsity)
        restarts = sum("exhausted" in str(w.message) for w in seen)
        return {"tokens": trainer.n_training_samples, "epochs_restarted": restarts}
    return _measured(run, job["threads"])


def saelens_runner_config(cfg: TrainConfig, sae_cfg, job: dict[str, Any], exclude: list[int]):
    """SAELens's runner config for ``cfg`` reading the cached activations at ``job["cache"]``."""
    from sae_lens.config import LanguageModelSAERunnerConfig, LoggingConfig

    context = job["context_size"]
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg, model_name=job["model_name"], hook_name=sae_cfg.metadata.hook_name, dataset_path=job["cache"],
        is_dataset_tokenized=True, streaming=False, context_size=context, use_cached_activations=True,
        cached_activations_path=job["cache"], store_batch_size_prompts=max(1, cfg.train_batch_size_tokens // context),
        n_batches_in_buffer=max(1, 2 * cfg.train_batch_size_tokens // context),  # a buffer of two batches
        training_tokens=cfg.total_steps * cfg.train_batch_size_tokens,
        train_batch_size_tokens=cfg.train_batch_size_tokens, device=cfg.device, seed=cfg.seed, dtype="float32",
        prepend_bos=False, lr=cfg.lr, lr_end=cfg.lr / 10, lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps, lr_decay_steps=cfg.lr_decay_steps, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=cfg.feature_sampling_window, exclude_special_tokens=list(exclude) or False,
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=job["output_path"], verbose=False)


# ------------------------------------------------------------------------------- SAELens cache
def saelens_sequences(cache: ActivationCache, n_rows: int, seed: int) -> np.ndarray:
    """``[m, context_size]`` token ids: the training sequences of ``cache`` in a seeded random
    order, the fewest whose non-special tokens reach ``n_rows`` rounded up to whole forward batches
    of :data:`SAELENS_FORWARD_BATCH` (every whole batch of them when they never reach it)."""
    lay = cache.layout
    train_rows = lay.chunk_rows(cache.train_chunks[-1])[1]
    sequences = np.asarray(cache.tokens[: train_rows // lay.context_size])
    shuffled = sequences[np.random.default_rng(seed).permutation(len(sequences))]
    kept = (~np.isin(shuffled, cache.special_token_ids)).sum(1).cumsum()
    batch = min(SAELENS_FORWARD_BATCH, len(shuffled))
    m = -(-(int(np.searchsorted(kept, n_rows)) + 1) // batch) * batch
    return shuffled[: min(m, len(shuffled) // batch * batch)]


def build_saelens_cache(cache: ActivationCache, hook: str, sequences: np.ndarray, out: Path,
                        model=None) -> dict[str, Any]:
    """SAELens's cache of ``sequences`` at ``hook`` in ``out``, reused when ``out.json`` says it
    holds them; ``model`` (the cache's model) is loaded offline when one must be built. Returns
    what ``out.json`` records (sequences' SHA-256, count, seconds of the build)."""
    from pipeline.bench.harvest_speed import saelens_cache
    from pipeline.evaluate import load_cache_model

    marker = out.with_suffix(".json")
    want = {"source": str(cache.path), "hook": hook, "n_sequences": len(sequences),
            "sequences_sha256": hashlib.sha256(sequences.tobytes()).hexdigest()}
    if marker.is_file() and out.is_dir():
        done = json.loads(marker.read_text())
        if {k: done.get(k) for k in want} == want:
            return done
    marker.unlink(missing_ok=True)
    model = model if model is not None else load_cache_model(cache, "cpu")
    seconds, _ = saelens_cache(model, sequences, out, hook=hook, model_name=cache.attrs["model_name"],
                               dataset_path=str(cache.attrs.get("dataset_path", "")),
                               batch_prompts=min(SAELENS_FORWARD_BATCH, len(sequences)))
    marker.write_text(json.dumps({**want, "build_seconds": seconds}))
    return {**want, "build_seconds": seconds}


# ------------------------------------------------------------------------------------ running
def write_sweep(bench: SweepBench, hook: str) -> Sweep:
    """The benchmark's sweep file (``workdir/sweep.yaml``, output ``workdir/fused``), loaded."""
    bench.workdir.mkdir(parents=True, exist_ok=True)
    base = {"cache_path": bench.cache, "hook_name": hook, "architecture": "topk", "lr": bench.lr,
            "train_batch_size_tokens": bench.batch_size, "training_tokens": bench.tokens, "seed": bench.seed,
            "device": bench.device}
    spec = {"name": "sweep_speed", "output_path": str(bench.workdir / "fused"), "base": base,
            "grid": {"k": list(bench.ks), "d_sae": list(bench.d_saes)}}
    path = bench.workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_sweep(path)


def sweep_rows(bench: SweepBench, *, model=None) -> list[Row]:
    """Every row of the module docstring; ``model``: the cache's model, if already loaded (only
    needed to build SAELens's cache)."""
    cache = ActivationCache.open(bench.cache)
    hook = cache.resolve_hook(None)
    sweep = write_sweep(bench, hook)
    threads = torch.get_num_threads()
    shutil.rmtree(sweep.output_path, ignore_errors=True)  # a rerun must train, not skip finished points
    jobs = {FUSED: [in_fresh_process(_fused_child, {"sweep_file": sweep.source, "threads": threads})]}
    if jobs[FUSED][0]["groups"] != 1 or jobs[FUSED][0]["failed"]:
        raise RuntimeError(f"the fused sweep did not train as one group: {jobs[FUSED][0]}")
    folders = {FUSED: [sweep.folder(p) for p in sweep.points],
               SEQUENTIAL: [bench.workdir / "sequential" / p.id for p in sweep.points]}
    jobs[SEQUENTIAL] = [in_fresh_process(_train_child, {"cfg": _moved(p, folder).to_dict(), "threads": threads})
                        for p, folder in zip(sweep.points, folders[SEQUENTIAL])]
    tokens = {FUSED: [json.loads((f / POINT_FILENAME).read_text())["tokens"] for f in folders[FUSED]],
              SEQUENTIAL: [j["tokens"] for j in jobs[SEQUENTIAL]]}
    saelens_info = {}
    if bench.saelens:
        folders[SAELENS] = [bench.workdir / "saelens" / p.id for p in sweep.points]
        jobs[SAELENS], saelens_info = run_saelens(bench, cache, sweep.points, folders[SAELENS], threads, model)
        tokens[SAELENS] = [j["tokens"] for j in jobs[SAELENS]]
    quality = {m: [held_out(f, cache, hook) for f in fs] for m, fs in folders.items()}
    identical = [same_weights(a, b) for a, b in zip(folders[FUSED], folders[SEQUENTIAL])]
    d_in = cache.d_in_of(hook)
    return add_ratios(_speed_rows(jobs, tokens, quality, saelens_info)
                      + _point_rows(sweep.points, jobs, tokens, quality, identical)
                      + _read_rows(jobs, tokens, f"{array_key(hook)}/c")
                      + _memory_rows(sweep, jobs, d_in, TORCH_DTYPES[cache.dtype].itemsize)
                      + stacking_rows(d_in, bench.d_saes, len(bench.ks) * len(bench.d_saes), bench.batch_size,
                                      repeats=bench.stacking_repeats))


def _moved(point: SweepPoint, folder: Path) -> TrainConfig:
    return dataclasses.replace(point.cfg, output_path=str(folder))


def run_saelens(bench: SweepBench, cache: ActivationCache, points: list[SweepPoint], folders: list[Path],
                threads: int, model=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Build (or reuse) SAELens's cache, then train each point with SAELens in a fresh process.

    Raises:
        RuntimeError: a run read past a cache holding only part of the training sequences (it would
            then have trained on other rows than a full cache gives it).
    """
    cfg = points[0].cfg
    rows_needed = (cfg.total_steps + 4) * cfg.train_batch_size_tokens  # steps, its 2-batch buffer, 1 read, slack
    sequences = saelens_sequences(cache, rows_needed, bench.seed)
    out = bench.workdir / "saelens_cache"
    info = build_saelens_cache(cache, cfg.hook_name, sequences, out, model)
    np.save(bench.workdir / "saelens_sequences.npy", sequences)
    partial = len(sequences) < cache.layout.chunk_rows(cache.train_chunks[-1])[1] // cache.layout.context_size
    base = {"cache": str(out), "sequences": str(bench.workdir / "saelens_sequences.npy"), "threads": threads,
            "context_size": cache.layout.context_size, "model_name": cache.attrs["model_name"]}
    jobs = []
    for point, folder in zip(points, folders):
        jobs.append(in_fresh_process(_saelens_child, {**base, "cfg": point.cfg.to_dict(), "output_path": str(folder)}))
        if partial and jobs[-1]["epochs_restarted"]:
            raise RuntimeError(f"SAELens ran out of its {len(sequences)} cached sequences training {point.id}.")
    return jobs, info


def held_out(folder: Path, cache: ActivationCache, hook: str) -> dict[str, float]:
    """Held-out explained variance, L0, dead fraction and MSE of the SAE saved in ``folder``."""
    m = reconstruction_metrics(SAE.load(folder), cache, hook, exclude_token_ids=cache.special_token_ids)
    return {k: float(m[k]) for k in ("explained_variance", "l0", "dead_fraction", "mse")}


def same_weights(a: Path, b: Path) -> bool:
    """True when the SAE folders ``a`` and ``b`` hold bit-identical tensors."""
    from safetensors.torch import load_file

    x, y = (load_file(str(Path(f) / SAE_WEIGHTS_FILENAME)) for f in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --------------------------------------------------------------------------------------- rows
def _speed_rows(jobs: dict[str, list[dict]], tokens: dict[str, list[int]], quality: dict[str, list[dict]],
                saelens_info: dict[str, Any]) -> list[Row]:
    seconds = {m: sum(j["seconds"] for j in js) for m, js in jobs.items()}
    methods = list(jobs)
    rows = []
    for i, m in enumerate(methods):
        q = {"trained_tokens_per_second": sum(tokens[m]) / seconds[m], "trained_tokens": sum(tokens[m]),
             **{f"x_faster_than_{SHORT[o]}": seconds[o] / seconds[m] for o in methods[i + 1:]},
             "peak_rss_mib": max(j["peak_rss_mib"] for j in jobs[m]),
             "mean_explained_variance": statistics.mean(p["explained_variance"] for p in quality[m]),
             "mean_l0": statistics.mean(p["l0"] for p in quality[m])}
        rows.append(Row("sweep", m, seconds[m], "s", [j["seconds"] for j in jobs[m]], q,
                        {"threads": torch.get_num_threads(), **(saelens_info if m == SAELENS else {})},
                        reference=methods[i + 1] if i + 1 < len(methods) else None))
    return rows


def _point_rows(points: list[SweepPoint], jobs: dict[str, list[dict]], tokens: dict[str, list[int]],
                quality: dict[str, list[dict]], identical: list[bool]) -> list[Row]:
    rows = []
    for m in jobs:
        for i, point in enumerate(points):
            q = {k: v for k, v in quality[m][i].items() if k != "explained_variance"}
            q["tokens"] = tokens[m][i]
            if m == FUSED:
                q["weights_identical_to_sequential"] = float(identical[i])
            else:
                q["seconds"] = jobs[m][i]["seconds"]
            rows.append(Row("sweep_points", f"{m}: {point.id}", quality[m][i]["explained_variance"],
                            "explained variance", quality=q, config=point.params,
                            reference=f"{SAELENS}: {point.id}" if SAELENS in jobs and m != SAELENS else None))
    return rows


def _read_rows(jobs: dict[str, list[dict]], tokens: dict[str, list[int]], activations_key: str) -> list[Row]:
    """Cache bytes read per trained token; the value counts ``activations_key`` (the activation
    array's chunk data, :class:`CountingStore`), ``all_bytes_*`` every key."""
    activation_bytes = {m: sum(j["bytes_read"].get(activations_key, 0) for j in jobs[m]) for m in (FUSED, SEQUENTIAL)}
    rows = []
    for m in (FUSED, SEQUENTIAL):
        trained, every = sum(tokens[m]), sum(sum(j["bytes_read"].values()) for j in jobs[m])
        q = {"activation_bytes_read": activation_bytes[m], "all_bytes_read": every,
             "all_bytes_per_trained_token": every / trained, "trained_tokens": trained}
        if m == FUSED:
            q["activation_bytes_vs_sequential"] = activation_bytes[FUSED] / activation_bytes[SEQUENTIAL]
        rows.append(Row("sweep_cache_reads", m, activation_bytes[m] / trained, "bytes/token",
                        [j["bytes_read"].get(activations_key, 0) for j in jobs[m]], q,
                        reference=SEQUENTIAL if m == FUSED else None))
    return rows


def _memory_rows(sweep: Sweep, jobs: dict[str, list[dict]], d_in: int, storage_bytes: int) -> list[Row]:
    train_rows = TrainingData(sweep.points[0].cfg).rows_per_epoch

    def estimate(points: list[SweepPoint]) -> int:
        return group_memory_bytes([p.cfg for p in points], d_in, storage_bytes, train_rows)

    largest = max(range(len(sweep.points)), key=lambda i: estimate([sweep.points[i]]))
    one = _memory_row("one SAE alone", jobs[SEQUENTIAL][largest], estimate([sweep.points[largest]]),
                      {"point": sweep.points[largest].id})
    fused = _memory_row("fused group", jobs[FUSED][0], estimate(sweep.points),
                        {"points": [p.id for p in sweep.points]}, reference=one.variant)
    return [one, fused]


def _memory_row(variant: str, job: dict[str, Any], estimate: int, config: dict[str, Any],
                reference: str | None = None) -> Row:
    growth = job["peak_rss_mib"] - job["rss_before_mib"]
    q = {"rss_before_mib": job["rss_before_mib"], "growth_mib": growth, "estimate_mib": estimate / 2**20,
         "growth_over_estimate": growth / (estimate / 2**20)}
    return Row("sweep_memory", variant, job["peak_rss_mib"], "MiB", quality=q, config=config, reference=reference)


# ----------------------------------------------------------------------------------- stacking
def stacking_rows(d_in: int, d_saes: tuple[int, ...], n_saes: int, batch_size: int, *, repeats: int = 5,
                  seed: int = 0) -> list[Row]:
    """The encoder product ``x @ W_enc`` of ``n_saes`` SAEs of each width in ``d_saes``, three ways,
    on random float32 ``x: [batch_size, d_in]``: ``separate`` (one ``x @ W_g`` per SAE, contiguous
    ``W_g: [d_in, d_sae]``), ``concatenated`` (one ``x @ W_cat``, ``W_cat: [d_in, n_saes · d_sae]``
    whose column blocks are the SAEs' weights, each SAE's scores a strided view of the result) and
    ``bmm`` (``torch.bmm`` over ``[n_saes, d_in, d_sae]``). Each is timed ``repeats`` times after one
    untimed call, the three interleaved so a load change hits all alike; the value is the median's
    tokens/s (batch rows through every SAE's product), ``quality`` its GFLOP/s and the fastest
    call's tokens/s (on a shared machine, the least disturbed).

    Raises:
        RuntimeError: the three ways disagree (beyond float32 summation-order rounding).
    """
    rows = []
    for d_sae in d_saes:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, d_in, generator=gen)
        W_cat = torch.randn(d_in, n_saes * d_sae, generator=gen)
        separate = [W_cat[:, g * d_sae : (g + 1) * d_sae].contiguous() for g in range(n_saes)]
        stacked = torch.stack(separate)
        ways = {"separate": lambda: [x @ w for w in separate], "concatenated": lambda: x @ W_cat,
                "bmm": lambda: torch.bmm(x.expand(n_saes, -1, -1), stacked)}
        if not _same_products({name: run() for name, run in ways.items()}, d_sae):  # also the untimed call
            raise RuntimeError("the stacked encoder products disagree with the separate ones.")
        times = _interleaved(ways, repeats)
        flops = 2 * batch_size * d_in * d_sae * n_saes
        for name, samples in times.items():
            median = statistics.median(samples)
            rows.append(Row("sweep_stacking", f"{name}, d_sae {d_sae}", batch_size / median, "tokens/s",
                            [batch_size / s for s in samples],
                            {"gflops": flops / median / 1e9, "fastest_tokens_per_second": batch_size / min(samples)},
                            {"d_in": d_in, "d_sae": d_sae, "n_saes": n_saes, "batch_size": batch_size,
                             "threads": torch.get_num_threads()},
                            reference=None if name == "separate" else f"separate, d_sae {d_sae}"))
    return rows


def _same_products(outputs: dict[str, Any], d_sae: int) -> bool:
    """Each SAE's ``[batch, d_sae]`` scores agree across the three ways of :func:`stacking_rows`."""
    concatenated = outputs["concatenated"].split(d_sae, dim=1)
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) and torch.allclose(a, c, rtol=1e-4, atol=1e-3)
               for a, b, c in zip(outputs["separate"], concatenated, outputs["bmm"]))


def _interleaved(ways: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each way, taken in turns."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------- CLI
def _ints(ctx: click.Context | None, param: click.Parameter | None, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected comma-separated positive integers such as 16,32, got {text!r}.")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help="""\
Time a TopK sweep (k x d_sae points) trained as one fused `sae-pipeline sweep`, as one `train` run
per point, and by SAELens per point; report held-out EV and L0 per point, cache bytes read, peak
memory of the group against its estimate, and stacked vs separate encoder products. Each job runs
in a fresh process. With the defaults (8 points of 100K tokens) it takes 10-15 minutes on 2 CPU
cores; `--tokens 4096 --ks 8,16 --d-saes 256 --batch-size 1024` is a quick check.""")
@click.option("--tokens", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Training tokens per point.")
@click.option("--cache", default="data/harvests/anchor_wikitext", show_default=True,
              type=click.Path(exists=True, file_okay=False),
              help="Activation cache every point trains from (`sae-pipeline harvest --config "
                   "configs/anchor_wikitext.yaml`).")
@click.option("--ks", default="16,32,64,128", show_default=True, callback=_ints,
              help="TopK k values of the grid (comma-separated).")
@click.option("--d-saes", default="2304,4608", show_default=True, callback=_ints,
              help="d_sae values of the grid (comma-separated).")
@click.option("--batch-size", default=4096, show_default=True, type=click.IntRange(min=1),
              help="train_batch_size_tokens of every point.")
@click.option("--workdir", default="data/bench/sweep_speed", show_default=True,
              help="Folder for the sweep file, the trained SAEs and SAELens's cache.")
@click.option("--out", default="data/bench/sweep_speed.json", show_default=True,
              help="JSON of the rows (Markdown beside it, .md).")
@click.option("--saelens/--no-saelens", default=True, show_default=True,
              help="Also train every point with SAELens (needs sae-lens: the `bench` extra).")
@click.option("--stacking-repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed calls of each encoder-product variant (sweep_stacking rows).")
def main(tokens: int, cache: str, ks: tuple[int, ...], d_saes: tuple[int, ...], batch_size: int, workdir: str,
         out: str, saelens: bool, stacking_repeats: int) -> None:
    from pipeline.bench.harvest_speed import print_rows
    from pipeline.bench.suite import new_result, save_result

    bench = SweepBench(cache=cache, tokens=tokens, ks=ks, d_saes=d_saes, batch_size=batch_size,
                       saelens=saelens, stacking_repeats=stacking_repeats, workdir=Path(workdir))
    result = new_result({**dataclasses.asdict(bench), "workdir": workdir})
    try:
        rows = sweep_rows(bench)
    except SaePipelineError as e:  # a grid the sweep refuses (k above d_sae, ...): one line, as the CLI prints it
        raise click.ClickException(str(e)) from None
    print_rows(rows)
    save_result(result, rows, Path(out))
    click.echo(f"wrote {out} and {Path(out).with_suffix('.md')}")


if __name__ == "__main__":
    main()
