"""A sweep's fused groups as tasks on a Dask distributed cluster (``sae-pipeline sweep --scheduler``).

Each group of :func:`pipeline.sweep.plan_groups` becomes one task, :func:`train_group_task`: the
group's TrainConfigs go to a worker, which reads the cache at ``cache_path``, writes each SAE to
its ``output_path`` exactly as a local run does, and sends back each point's outcome as plain data;
the client writes ``point.json`` as each group returns. So every worker must see the same paths
(one machine, or a filesystem shared at the same mount point) and have this package installed.

Same weights as a local run: a task holds a process-wide lock, so one worker process trains one
group at a time (torch's global RNG, which seeds each SAE's initialisation, belongs to the process),
and it sets torch's CPU threads to ``torch_threads`` while it trains, because float reductions split
over another number of threads round differently. By default that is the client's own
``torch.get_num_threads()``: on the same kind of machine, a group trained on the cluster ends with
bit-identical weights to the same group trained by ``sae-pipeline sweep`` without ``--scheduler``.

``scheduler="local"`` starts a ``LocalCluster`` for the sweep (closed after it): ``min(groups, CPU
cores)`` worker processes with one task thread each, so memory peaks at that many groups at once,
each within the sweep's ``--max-memory-gb``.
"""

from __future__ import annotations

import os
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from pipeline.config import TrainConfig
from pipeline.errors import ConfigError
from pipeline.sweep import train_points

LOCAL = "local"
CONNECT_TIMEOUT_S = 20

_ONE_GROUP_AT_A_TIME = threading.Lock()


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
    threads = torch.get_num_threads() if torch_threads is None else torch_threads
    if threads < 1:
        raise ConfigError(f"torch_threads must be at least 1, got {threads}.")
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
    with _ONE_GROUP_AT_A_TIME, _torch_threads(torch_threads):
        return train_points(cfgs, progress=False)


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
def _client(scheduler: str, n_groups: int) -> Iterator[Any]:
    """A Dask client of ``scheduler``; with ``"local"`` of a LocalCluster started (and closed) here."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--scheduler needs Dask's distributed package: pip install 'dask[distributed]'.") from None
    if scheduler == LOCAL:
        n_workers = max(1, min(n_groups, os.cpu_count() or 1))
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
