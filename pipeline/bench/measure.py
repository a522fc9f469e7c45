"""Measuring for the benchmark suite: medians after warm-up, the machine, peak memory, result rows.

Every figure of ``sae-pipeline bench`` is a :class:`Row`: one case (``"train_topk"``), one variant
(``"ours fp32"``, ``"SAELens"``), the median of ``repeats`` timed runs after ``warmup`` untimed
ones, and the quality figures measured on the same run beside it (explained variance, L0, ...),
so a speed figure never hides a quality loss.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable

import torch

PACKAGES = ("torch", "transformer-lens", "zarr", "numcodecs", "sae-lens", "transformers", "numpy")


@dataclasses.dataclass
class Row:
    """One measured figure of the suite.

    ``value`` is in ``unit`` (``"tokens/s"``, ``"bytes/token"``, ``"MiB"``, ...), the median of
    ``samples``; ``reference`` names the row of the same case it is compared with (``ratio`` is
    ``value / reference value``, filled in by :func:`add_ratios`); ``quality`` holds the figures of
    the same run that say the work was done well (``explained_variance``, ``l0``, ``cosine``...);
    ``config`` the exact settings.
    """

    case: str
    variant: str
    value: float
    unit: str
    samples: list[float] = dataclasses.field(default_factory=list)
    quality: dict[str, float] = dataclasses.field(default_factory=dict)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: str | None = None
    ratio: float | None = None
    note: str = ""


def median_rate(run: Callable[[], float], *, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median of ``repeats`` rates, each ``units / seconds`` for one call of ``run``.

    ``run()`` does the work and returns how many units (tokens, rows) it processed; it is called
    ``warmup`` times untimed first (allocator, thread pools, page cache).

    Returns:
        ``(median units/s, [units/s of each repeat])``.
    """
    rates = interleaved_calls({"run": run}, repeats=repeats, warmup=warmup)["run"]
    return statistics.median(rates), rates


def interleaved_calls(runs: dict[str, Callable[[], float]], *, repeats: int = 3, warmup: int = 1
                      ) -> dict[str, list[float]]:
    """``units / seconds`` of each call of each of ``runs``, the runs taking turns call by call.

    Every run is first called ``warmup`` times untimed, then ``repeats`` rounds call each run once
    in order. Calls of one round see the same machine (a shared machine drifts by 30% within
    minutes), so ratios within a round are steadier than ratios of medians timed minutes apart.

    Returns:
        ``{name: [units/s of its call in each round]}``.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            units = run()
            rates[name].append(units / (time.perf_counter() - t0))
    return rates


def paired_ratio(rates: list[float], reference: list[float]) -> float:
    """Median over rounds of ``rates[i] / reference[i]`` (both from :func:`interleaved_calls` or
    another timing in rounds): a ratio that the machine's drift between rounds leaves alone."""
    return statistics.median(a / b for a, b in zip(rates, reference, strict=True))


def add_ratios(rows: list[Row]) -> list[Row]:
    """Fill ``ratio`` of each row whose ``reference`` names another variant of its case."""
    by_key = {(r.case, r.variant): r for r in rows}
    for r in rows:
        ref = by_key.get((r.case, r.reference)) if r.reference else None
        if ref is not None and ref.value:
            r.ratio = r.value / ref.value
    return rows


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    Linux's ``VmHWM`` where there is one: ``ru_maxrss`` survives ``exec``, so a freshly spawned
    child would report its parent's peak at the fork. Elsewhere ``ru_maxrss`` (KiB on Linux).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, threads, memory, accelerator, versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": list(os.getloadavg()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "packages": {},
    }
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
