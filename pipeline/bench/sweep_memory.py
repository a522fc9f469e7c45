"""Resident memory of a long fused sweep over time: does it grow while 8 SAEs train?

    python -m pipeline.bench.sweep_memory [--minutes 30] [--cache data/harvests/anchor_wikitext]
        [--workdir data/bench/sweep_memory] [--interval 10] [--threads 1]

Issue 7 ("Load"): a fused sweep of 8 SAEs runs for at least 30 minutes without growth in resident
memory. This starts ``sae-pipeline sweep`` on the 8 TopK points of :mod:`pipeline.bench.sweep_speed`
(k 16/32/64/128 × d_sae 2304/4608, one group, batch 4096) with a token budget far beyond the
duration, samples the process's resident set (``VmRSS`` of ``/proc/<pid>/status``, MiB) and the
tokens trained so far (the ``tokens`` of the newest line of a point's ``metrics.jsonl``) every
``interval`` seconds, and stops it with SIGTERM after ``minutes``.

Growth is judged after a warm-up: at least ``warmup`` minutes (start-up, allocator pools) and until
the loader's shuffle buffer has filled once (``warmup_tokens``, its default 262,144 rows: until
then the buffer itself grows). ``growth`` = median RSS of the last 5 minutes / median RSS of the 5
minutes after the warm-up − 1, and ``slope`` is the least-squares slope of RSS against time over
the same span (MiB per hour). A leak of a few KiB per step would show in both.

Writes ``<workdir>/curve.json`` (settings, every sample, the summary), ``curve.csv`` and
``curve.png`` (RSS and tokens against minutes; needs matplotlib), prints the summary, and puts it
with the curve minute by minute in ``--report`` (``RELIABILITY.md``) between the markers of
:data:`BLOCK_START` / :data:`BLOCK_END`, which ``pipeline.bench.reliability`` keeps when it rewrites
the file.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from pipeline.bench.sweep_speed import SweepBench, write_sweep
from pipeline.cache import ActivationCache

GRID = {"k": list(SweepBench.ks), "d_sae": list(SweepBench.d_saes)}
WINDOW_MINUTES = 5.0
BLOCK_START, BLOCK_END = "<!-- sweep memory curve: pipeline.bench.sweep_memory -->", "<!-- end sweep memory curve -->"


def sweep_file(cache: str, workdir: Path, training_tokens: int) -> Path:
    """Write the 8-point TopK sweep of :mod:`pipeline.bench.sweep_speed` (one fused group, SAEs in
    ``workdir/fused``) with ``training_tokens`` per point under ``workdir``; return its path."""
    hook = ActivationCache.open(cache).resolve_hook(None)
    return Path(write_sweep(SweepBench(cache=cache, tokens=training_tokens, workdir=workdir), hook).source)


def rss_mib(pid: int) -> float | None:
    """``VmRSS`` of process ``pid`` in MiB, or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def tokens_trained(sweep_dir: Path) -> int:
    """Tokens trained so far by the sweep's first point (all points of a group step together)."""
    logs = sorted(sweep_dir.glob("*/metrics.jsonl"))
    if not logs:
        return 0
    lines = logs[0].read_bytes().rstrip().splitlines()
    try:
        return int(json.loads(lines[-1])["tokens"]) if lines else 0
    except (ValueError, KeyError):
        return 0  # the line being written


def sample(proc: subprocess.Popen, sweep_dir: Path, minutes: float, interval: float) -> list[dict[str, float]]:
    """Sample ``proc`` every ``interval`` s until it exits or ``minutes`` pass."""
    samples, t0 = [], time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < minutes * 60:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append({"minutes": (time.monotonic() - t0) / 60, "rss_mib": rss,
                            "tokens": tokens_trained(sweep_dir)})
        time.sleep(interval)
    return samples


def summarise(samples: list[dict[str, float]], warmup: float, warmup_tokens: int = 0) -> dict[str, Any]:
    """Growth and slope after the warm-up: ``warmup`` minutes and ``warmup_tokens`` tokens trained
    (see the module docstring).

    Raises:
        click.ClickException: fewer than two windows of samples after the warm-up.
    """
    filled = [s["minutes"] for s in samples if s["tokens"] >= warmup_tokens]
    warmup = max(warmup, filled[0] if filled else float("inf"))
    late = [s for s in samples if s["minutes"] >= warmup]
    end = samples[-1]["minutes"]
    if end - warmup < 2 * WINDOW_MINUTES:
        raise click.ClickException(f"only {end:.1f} minutes sampled; run at least {warmup + 2 * WINDOW_MINUTES:g} "
                                   "(--minutes) after the warm-up.")
    first = [s["rss_mib"] for s in late if s["minutes"] < warmup + WINDOW_MINUTES]
    last = [s["rss_mib"] for s in late if s["minutes"] > end - WINDOW_MINUTES]
    t = [s["minutes"] / 60 for s in late]
    r = [s["rss_mib"] for s in late]
    slope = statistics.linear_regression(t, r).slope
    return {"minutes_sampled": samples[-1]["minutes"], "warmup_minutes": warmup,
            "rss_first_window_mib": statistics.median(first), "rss_last_window_mib": statistics.median(last),
            "growth": statistics.median(last) / statistics.median(first) - 1, "slope_mib_per_hour": slope,
            "rss_max_mib": max(s["rss_mib"] for s in samples), "tokens_trained": samples[-1]["tokens"],
            "tokens_per_second": samples[-1]["tokens"] / (samples[-1]["minutes"] * 60)}


def report_block(summary: dict[str, Any], samples: list[dict[str, float]], threads: int) -> str:
    """The Markdown section of ``RELIABILITY.md``: the summary, then the curve minute by minute."""
    s = summary
    lines = [BLOCK_START, "## Load: resident memory of a fused sweep of 8 SAEs over time", "",
             f"`python -m pipeline.bench.sweep_memory`: 8 TopK SAEs (k {GRID['k']} × d_sae {GRID['d_sae']}) in "
             f"one fused group on the anchor cache (SmolLM2-135M, d_in 576), batch 4096, {threads} torch "
             f"thread(s); resident set (VmRSS) every few seconds for {s['minutes_sampled']:.1f} minutes, "
             f"{s['tokens_trained']:,} tokens per SAE. After the warm-up ({s['warmup_minutes']:.1f} minutes, until "
             "the shuffle buffer had filled): "
             f"median {s['rss_first_window_mib']:.0f} MiB over the first {WINDOW_MINUTES:g} minutes, "
             f"{s['rss_last_window_mib']:.0f} MiB over the last {WINDOW_MINUTES:g} (growth {s['growth']:+.2%}); "
             f"least-squares slope {s['slope_mib_per_hour']:+.1f} MiB per hour; peak {s['rss_max_mib']:.0f} MiB.",
             "", "| minute | resident MiB | tokens per SAE |", "| ---: | ---: | ---: |"]
    for minute in range(int(samples[-1]["minutes"]) + 1):
        near = min(samples, key=lambda x: abs(x["minutes"] - minute))
        lines.append(f"| {minute} | {near['rss_mib']:.0f} | {near['tokens']:,} |")
    return "\n".join(lines + [BLOCK_END]) + "\n"


def with_block(text: str, block: str) -> str:
    """``text`` with its sweep-memory block replaced by ``block`` (appended when it has none)."""
    start, end = text.find(BLOCK_START), text.find(BLOCK_END)
    if start < 0 or end < 0:
        return text.rstrip("\n") + "\n\n" + block
    return text[:start] + block + text[end + len(BLOCK_END):].lstrip("\n")


def existing_block(text: str) -> str:
    """The sweep-memory block of ``text`` with its markers, or ``""``."""
    start, end = text.find(BLOCK_START), text.find(BLOCK_END)
    return text[start:end + len(BLOCK_END)] + "\n" if start >= 0 and end >= 0 else ""


def plot(samples: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s["minutes"] for s in samples], [s["rss_mib"] for s in samples], color="tab:blue")
    ax.set_xlabel("minutes")
    ax.set_ylabel("resident memory (MiB)", color="tab:blue")
    ax.set_ylim(bottom=0)
    ax2 = ax.twinx()
    ax2.plot([s["minutes"] for s in samples], [s["tokens"] / 1e6 for s in samples], color="tab:gray", ls="--")
    ax2.set_ylabel("tokens trained per SAE (M)", color="tab:gray")
    ax.set_title("fused sweep of 8 TopK SAEs: resident memory over time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help="""\
Run a fused sweep of 8 TopK SAEs for --minutes, sample its resident memory every --interval
seconds, and judge growth after the warm-up; writes <workdir>/curve.json, curve.csv and curve.png
and replaces the sweep-memory block of the --report file (RELIABILITY.md by default: pass another
file, or /dev/null, to leave the repository's copy alone).""")
@click.option("--minutes", default=30.0, show_default=True, type=click.FloatRange(min=1),
              help="How long the sweep runs before it is stopped (at least 1).")
@click.option("--cache", default="data/harvests/anchor_wikitext", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Activation cache the sweep trains from.")
@click.option("--workdir", default="data/bench/sweep_memory", show_default=True,
              help="Folder for the sweep, its log and the curve files.")
@click.option("--interval", default=10.0, show_default=True, type=click.FloatRange(min=0.5), help="Seconds.")
@click.option("--warmup", default=3.0, show_default=True, type=click.FloatRange(min=0), help="Minutes.")
@click.option("--warmup-tokens", default=262_144, show_default=True, type=click.IntRange(min=0),
              help="Tokens per SAE before growth is judged (the loader's shuffle buffer filling).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1), help="torch threads.")
@click.option("--report", default="RELIABILITY.md", show_default=True, help="Markdown file to put the curve in.")
@click.option("--from-json", is_flag=True, help="Rewrite --report from <workdir>/curve.json; run nothing.")
def main(minutes: float, cache: str, workdir: str, interval: float, warmup: float, warmup_tokens: int,
         threads: int, report: str, from_json: bool) -> None:
    work = Path(workdir)
    if from_json:
        saved = json.loads((work / "curve.json").read_text())
        summary = summarise(saved["samples"], warmup, warmup_tokens)
        print(json.dumps(summary, indent=1))
        _write_report(report, summary, saved["samples"], saved["settings"]["torch_threads"])
        return
    work.mkdir(parents=True, exist_ok=True)
    config = sweep_file(cache, work, training_tokens=4096 * 1_000_000)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "stages", "sweep", "--config", str(config), "--no-report"]
    with open(work / "sweep.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            samples = sample(proc, work / "fused", minutes, interval)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait()
    if not samples:
        raise click.ClickException(f"the sweep exited before the first sample; see {work / 'sweep.log'}.")
    summary = summarise(samples, warmup, warmup_tokens)
    settings = {"grid": GRID, "cache": cache, "interval_s": interval, "torch_threads": threads, "command": cmd}
    (work / "curve.json").write_text(json.dumps({"settings": settings, "summary": summary, "samples": samples},
                                                indent=1))
    with open(work / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)
    plot(samples, work / "curve.png")
    print(json.dumps(summary, indent=1))
    _write_report(report, summary, samples, threads)


def _write_report(report: str, summary: dict[str, Any], samples: list[dict[str, float]], threads: int) -> None:
    path = Path(report)
    path.write_text(with_block(path.read_text() if path.exists() else "", report_block(summary, samples, threads)))
    print(f"wrote the curve into {path}")


if __name__ == "__main__":
    main()
