"""Work on a Dask distributed cluster: a sweep's fused groups (``sae-pipeline sweep --scheduler``)
and a harvest's shard ranges (``sae-pipeline harvest --scheduler``).

**Sweeps.** Each group of :func:`pipeline.sweep.plan_groups` becomes one task,
:func:`train_group_task`: the group's TrainConfigs go to a worker, which reads the cache at
``cache_path``, writes each SAE to its ``output_path`` exactly as a local run does, and sends back
each point's outcome as plain data; the client writes ``point.json`` as each group returns.

**Harvests.** :func:`harvest_on_cluster` splits the chunks a cache still lacks into contiguous
ranges of whole shard files (:meth:`pipeline.cache.CacheLayout.shard_ranges`), about
``HARVEST_RANGES_PER_WORKER`` per worker, each a task, :func:`harvest_range_task`: the worker loads
the model once per process (checking its weights fingerprint against the cache's), runs it over its
own rows and stores its own chunks (:func:`pipeline.harvest.harvest_range`). No two tasks touch the
same shard file, and none touches the checksums or attributes: the client, which created the cache
and holds its writer lock, records each range as it returns and finalizes once all are done.
Several ranges per worker keep the workers evenly loaded and bound what a killed harvest redoes:
progress is recorded per finished range.

Every worker must see the same paths (one machine, or a filesystem shared at the same mount point)
and have this package installed; a sweep's workers may instead read the cache by fsspec URL
(``cache_path: s3://bucket/harvests/wiki``, see :meth:`pipeline.cache.ActivationCache.open`).

Same results as a local run: a task holds a process-wide lock, so one worker process runs one task
at a time (torch's global RNG, which seeds each SAE's initialisation, belongs to the process), and
it sets torch's CPU threads to ``torch_threads`` while it runs, because float reductions split
over another number of threads round differently. By default that is the client's own
``torch.get_num_threads()``: on the same kind of machine, a group trained on the cluster ends with
bit-identical weights to the same group trained by ``sae-pipeline sweep`` without ``--scheduler``,
and a harvest stores the same bits as ``sae-pipeline harvest`` without it.

``scheduler="local"`` starts a ``LocalCluster`` for the run (closed after it): ``min(tasks, CPU
cores)`` worker processes with one task thread each, so memory peaks at that many groups at once,
each within the sweep's ``--max-memory-gb`` (a harvest: that many copies of the model).
"""

from __future__ import annotations

import os
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from pipeline import models
from pipeline.cache import TORCH_DTYPES, CacheWriter
from pipeline.config import HarvestConfig, TrainConfig
from pipeline.errors import CacheError, ConfigError
from pipeline.harvest import harvest_range
from pipeline.sweep import train_points

LOCAL = "local"
CONNECT_TIMEOUT_S = 20
HARVEST_RANGES_PER_WORKER = 4

_ONE_TASK_AT_A_TIME = threading.Lock()
_WORKER_MODEL: dict[tuple, tuple[Any, str]] = {}  # this worker process's model and its fingerprint


def train_on_cluster(groups: list[list[TrainConfig]], scheduler: str, *,
                     torch_threads: int | None = None) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Submit every group as a task and yield ``(group index, outcome records)`` as each finishes
    (records as :func:`pipeline.sweep.train_points` returns them, one per config).

    Args:
        scheduler: a Dask scheduler address such as ``tcp://10.0.0.5:8786``, or ``"local"``.
        torch_threads: torch CPU threads per task (default: ``torch.get_num_threads()`` here).

    Raises:
        ConfigError: ``distributed`` is not installed, the scheduler cannot be reached within
            ``CONNECT_TIMEOUT_S`` seconds, or ``torch_threads`` is below 1.
        ConfigError, CacheError: what training a whole group raises on the worker (the sweep stops).

    A group whose worker dies (killed for memory, say) is returned with every point failed.
    """
    threads = _threads(torch_threads)
    with _client(scheduler, len(groups)) as client:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        futures = {client.submit(train_group_task, cfgs, threads, key=f"sae-group-{i + 1}-{run}", pure=False): i
                   for i, cfgs in enumerate(groups)}
        for future in as_completed(futures):
            i = futures[future]
            yield i, _records(future, len(groups[i]))


def train_group_task(cfgs: list[TrainConfig], torch_threads: int) -> list[dict[str, Any]]:
    """What a worker runs for one group: :func:`pipeline.sweep.train_points` on ``cfgs`` with
    ``torch_threads`` CPU threads, one group per process at a time (module docstring)."""
    with _ONE_TASK_AT_A_TIME, _torch_threads(torch_threads):
        return train_points(cfgs, progress=False)


def harvest_on_cluster(cfg: HarvestConfig, writer: CacheWriter, scheduler: str, *,
                       torch_threads: int | None = None) -> None:
    """Compute the chunks the cache of ``writer`` still lacks (from ``writer.n_chunks_written``)
    as shard ranges on the cluster's workers, recording each range as it returns (module docstring).

    The caller created the cache, holds its writer lock, and finalizes it afterwards.

    Raises:
        ConfigError: as :func:`train_on_cluster` (scheduler unreachable, no ``distributed``).
        CacheError, CacheWriteError: what a worker raised (overflow, another model file, disk
            full); or a worker died. Ranges recorded before are kept: re-running resumes.
    """
    threads = _threads(torch_threads)
    layout, first = writer.layout, writer.n_chunks_written
    shards_left = len(layout.shard_ranges(first, layout.n_chunks))  # asking for a range per chunk gives one per shard
    with _client(scheduler, shards_left) as client:
        from distributed import as_completed

        ranges = layout.shard_ranges(first, max(1, len(client.nthreads())) * HARVEST_RANGES_PER_WORKER)
        print(f"harvesting chunks {first}-{layout.n_chunks - 1} as {len(ranges)} shard ranges on the Dask "
              f"scheduler {scheduler} ({len(client.nthreads())} workers)")
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(harvest_range_task, cfg, a, b, threads, key=f"harvest-{a}-{b}-{run}",
                                 pure=False): (a, b) for a, b in ranges}
        bar = tqdm(total=layout.n_tokens, initial=min(layout.n_tokens, first * layout.chunk_tokens), unit="tok",
                   unit_scale=True, desc="harvest", dynamic_ncols=True)
        try:
            for future in as_completed(futures):
                a, b = futures[future]
                writer.record_chunks(_range_result(future, a, b))
                bar.update(layout.chunk_rows(b - 1)[1] - layout.chunk_rows(a)[0])
        finally:
            bar.close()
            client.cancel(list(futures))  # after a failure, stop the other ranges; finished ones are recorded


def harvest_range_task(cfg: HarvestConfig, start: int, stop: int, torch_threads: int) -> dict[int, dict[str, int]]:
    """What a worker runs for chunks ``[start, stop)``: :func:`pipeline.harvest.harvest_range` with
    this process's copy of the model, ``torch_threads`` CPU threads, one task per process at a time."""
    with _ONE_TASK_AT_A_TIME, _torch_threads(torch_threads):
        model, fingerprint = _worker_model(cfg)
        return harvest_range(cfg, range(start, stop), model, fingerprint)


def _worker_model(cfg: HarvestConfig) -> tuple[Any, str]:
    """``cfg``'s model and weights fingerprint, loaded once per worker process (its later ranges reuse it)."""
    key = (cfg.model_name, cfg.device, cfg.model_dtype)
    if key not in _WORKER_MODEL:
        _WORKER_MODEL.clear()  # one model per process: a worker moving on to another harvest frees the last
        model = models.load_model(cfg.model_name, device=cfg.device, dtype=TORCH_DTYPES[cfg.model_dtype])
        _WORKER_MODEL[key] = (model, models.model_fingerprint(model))
    return _WORKER_MODEL[key]


def _range_result(future: Any, start: int, stop: int) -> dict[int, dict[str, int]]:
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as err:
        raise CacheError(f"the Dask worker harvesting chunks {start}-{stop - 1} died ({err}); the ranges recorded "
                         "before are kept. If it ran out of memory, give workers more (each holds a copy of the "
                         "model); then re-run the same command to resume.") from None


def _threads(torch_threads: int | None) -> int:
    threads = torch.get_num_threads() if torch_threads is None else torch_threads
    if threads < 1:
        raise ConfigError(f"torch_threads must be at least 1, got {threads}.")
    return threads


def _records(future: Any, n_points: int) -> list[dict[str, Any]]:
    from distributed.scheduler import KilledWorker

    try:
        return future.result()
    except KilledWorker as err:
        error = (f"the Dask worker training this group died ({err}); if it ran out of memory, lower "
                 "--max-memory-gb so groups are smaller")
        return [{"status": "failed", "error": error}] * n_points


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _client(scheduler: str, n_tasks: int) -> Iterator[Any]:
    """A Dask client of ``scheduler``; with ``"local"`` of a LocalCluster of ``min(n_tasks, CPU
    cores)`` workers started (and closed) here."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--scheduler needs Dask's distributed package: pip install 'dask[distributed]'.") from None
    if scheduler == LOCAL:
        n_workers = max(1, min(n_tasks, os.cpu_count() or 1))
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"cannot reach the Dask scheduler at {scheduler!r} ({err}). Start one (`dask scheduler`, "
                          "then `dask worker <its address>` on each machine) and pass its address, or pass "
                          "--scheduler local.") from None
    with client:
        yield client
