"""The memory-over-time curve of a long fused sweep (``pipeline.bench.sweep_memory``): its summary
figures and progress reading, on hand-made samples whose answers are known."""

from __future__ import annotations

import json

import click
import pytest

from pipeline.bench import sweep_memory


def _samples(rss_at, minutes=20.0, step=0.5):
    n = int(minutes / step) + 1
    return [{"minutes": i * step, "rss_mib": rss_at(i * step), "tokens": 4096 * i} for i in range(n)]


def test_a_flat_curve_after_the_warm_up_has_no_growth_and_no_slope():
    # start-up climbs to 1000 MiB in the first 2 minutes, then stays
    samples = _samples(lambda m: min(1000.0, 500.0 + 250.0 * m))
    s = sweep_memory.summarise(samples, warmup=3.0)
    assert s["growth"] == 0.0
    assert s["slope_mib_per_hour"] == pytest.approx(0.0, abs=1e-9)
    assert s["rss_first_window_mib"] == s["rss_last_window_mib"] == 1000.0
    assert s["rss_max_mib"] == 1000.0
    assert s["tokens_trained"] == 4096 * 40
    assert s["tokens_per_second"] == pytest.approx(4096 * 40 / (20 * 60))


def test_a_steady_leak_shows_as_slope_and_growth():
    # 1000 MiB + 60 MiB per hour (1 MiB a minute): slope exactly 60; the window medians sit at
    # minute 5.25 (samples 3.0..7.5) and 17.75 (15.5..20.0), so growth = 12.5 / 1005.25
    samples = _samples(lambda m: 1000.0 + m)
    s = sweep_memory.summarise(samples, warmup=3.0)
    assert s["slope_mib_per_hour"] == pytest.approx(60.0)
    assert s["rss_first_window_mib"] == pytest.approx(1000.0 + 5.25)
    assert s["rss_last_window_mib"] == pytest.approx(1000.0 + 17.75)
    assert s["growth"] == pytest.approx(12.5 / 1005.25)


def test_a_run_too_short_for_two_windows_is_refused():
    with pytest.raises(click.ClickException, match="only 12.0 minutes sampled; run at least 13"):
        sweep_memory.summarise(_samples(lambda m: 1.0, minutes=12.0), warmup=3.0)


def test_tokens_trained_reads_the_newest_complete_line(tmp_path):
    assert sweep_memory.tokens_trained(tmp_path) == 0
    point = tmp_path / "topk-k16-a1b2c3"
    point.mkdir()
    (point / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 40960}) + "\n"
                                         + json.dumps({"step": 20, "tokens": 81920}) + "\n")
    assert sweep_memory.tokens_trained(tmp_path) == 81920
    with open(point / "metrics.jsonl", "a") as f:
        f.write('{"step": 30, "tok')  # a line being written
    assert sweep_memory.tokens_trained(tmp_path) == 0


def test_the_report_block_replaces_itself_and_survives_a_reliability_rewrite():
    samples = _samples(lambda m: 1000.0, minutes=31.0)
    block = sweep_memory.report_block(sweep_memory.summarise(samples, 3.0), samples, threads=1)
    assert block.startswith(sweep_memory.BLOCK_START) and block.rstrip().endswith(sweep_memory.BLOCK_END)
    assert "| 31 | 1000 | 253,952 |" in block and "growth +0.00%" in block
    text = sweep_memory.with_block("# Reliability\n\ntrials\n", block)
    assert text == "# Reliability\n\ntrials\n\n" + block
    newer = block.replace("| 31 | 1000 |", "| 31 | 999 |")
    assert sweep_memory.with_block(text + "tail\n", newer) == "# Reliability\n\ntrials\n\n" + newer + "tail\n"
    assert sweep_memory.existing_block(text) == block
    assert sweep_memory.existing_block("# Reliability\n") == ""


def test_reliability_md_holds_a_30_minute_sweep_curve_without_growth():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "RELIABILITY.md").read_text()
    block = sweep_memory.existing_block(text)
    assert block, "RELIABILITY.md has no sweep memory curve; run python -m pipeline.bench.sweep_memory"
    minutes = float(re.search(r"for ([\d.]+) minutes", block).group(1))
    growth = float(re.search(r"growth ([+-][\d.]+)%", block).group(1))
    assert minutes >= 30 and abs(growth) < 5.0
