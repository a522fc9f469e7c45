"""Sweep reports: the summary table carries each point's metrics.json, the Pareto frontier, the
plots, and (slow) a real sweep on SmolLM2 activations with CE loss recovered."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.constants import METRICS_FILENAME
from pipeline.report import (DENSITY_PLOT, METRIC_COLUMNS, PARETO_PLOTS, REPORT_DIRNAME, SUMMARY_CSV, SUMMARY_MD,
                             evaluate_points, pareto_front, write_report)
from pipeline.sae import SAE
from pipeline.sae.io import load_sparsity
from pipeline.sweep import load_sweep, run_sweep
from stages.cli import cli
from tests.test_sweep import low_rank_cache, write_sweep


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    l0 = [10, 20, 30, 40, 15, 20]
    score = [0.5, 0.7, 0.6, 0.9, 0.4, 0.65]
    # by L0: 10 (0.5) kept; 15 (0.4) beaten by 10; 20 (0.7) kept, 20 (0.65) tied L0 but lower;
    # 30 (0.6) beaten by 20; 40 (0.9) kept
    assert pareto_front(l0, score) == [0, 1, 3]
    assert pareto_front([], []) == []


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_report_table_equals_each_points_metrics(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    path = write_sweep(tmp_path, cache.path, grid={"d_sae": [32, 64]}, evaluate={"ce_loss": False},
                       points=[{"architecture": "topk", "k": 2}, {"architecture": "standard", "l1_coefficient": 0.5}])
    out = CliRunner().invoke(cli, ["sweep", "--config", str(path)])
    assert out.exit_code == 0, out.output
    sweep = load_sweep(path)
    report = sweep.output_path / REPORT_DIRNAME
    rows = read_csv(report / SUMMARY_CSV)
    assert [r["point_id"] for r in rows] == [p.id for p in sweep.points]
    for row, point in zip(rows, sweep.points):
        folder = sweep.folder(point)
        metrics = json.loads((folder / METRICS_FILENAME).read_text())
        assert row["status"] == "finished" and row["architecture"] == point.cfg.architecture
        assert int(row["d_sae"]) == point.cfg.d_sae
        for column in METRIC_COLUMNS:
            if column == "ce_loss_recovered":
                assert row[column] == "" and column not in metrics
            else:
                assert float(row[column]) == metrics[column], column
        # independently: dense fraction from sparsity.safetensors, L0 on the raw holdout rows
        density = 10.0 ** load_sparsity(folder).double()
        assert metrics["dense_fraction"] == float((density > 0.1).double().mean())
        sae = SAE.load(folder)
        x = torch.cat([cache.read_chunk(cache.hook_names[0], c).float() for c in cache.holdout_chunks])
        with torch.no_grad():
            l0 = (sae.encode(x) != 0).sum(1).double().mean().item()
        assert metrics["l0"] == pytest.approx(l0, rel=1e-9)
        assert point.id in (report / SUMMARY_MD).read_text()
    for name in (*PARETO_PLOTS.values(), DENSITY_PLOT):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not list(report.glob(".*.tmp"))


def test_report_lists_failed_and_untrained_points_and_refuses_other_folders(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    path = write_sweep(tmp_path, cache.path, grid={"lr": [3e-3, 1e30]}, evaluate={"ce_loss": False})
    ran = CliRunner().invoke(cli, ["sweep", "--config", str(path)])
    assert ran.exit_code != 0 and "failed: loss became" in str(ran.exception)  # scripts see the failure
    sweep = load_sweep(path)  # ... after the report of every point was written
    rows = read_csv(sweep.output_path / REPORT_DIRNAME / SUMMARY_CSV)
    assert [r["status"] for r in rows] == ["finished", "failed"]
    assert rows[1]["l0"] == "" and "loss became" in rows[1]["error"]
    # a grown grid: the new point shows as not trained until the sweep trains it
    grown = write_sweep(tmp_path, cache.path, grid={"lr": [3e-3, 1e30, 1e-3]}, evaluate={"ce_loss": False})
    assert CliRunner().invoke(cli, ["sweep", "--config", str(grown), "--dry-run"]).exit_code == 0
    out = CliRunner().invoke(cli, ["report", "--sweep", str(sweep.output_path)])
    assert out.exit_code == 0, out.output
    assert [r["status"] for r in read_csv(sweep.output_path / REPORT_DIRNAME / SUMMARY_CSV)] == ["finished", "failed"]
    from stages.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--sweep", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_real_sweep_reports_ce_loss_recovered(real_cache, smollm2, tmp_path):
    """Two TopK SAEs on SmolLM2-135M activations, fused, evaluated with the model spliced in."""
    path = write_sweep(tmp_path, real_cache.path, grid={"k": [16, 64]}, evaluate={"n_ce_sequences": 4},
                       d_sae=1152, train_batch_size_tokens=1024, training_tokens=1024 * 30,
                       shuffle_buffer_tokens=16_384)
    sweep = load_sweep(path)
    assert run_sweep(sweep, progress=False).trained == [p.id for p in sweep.points]
    evaluate_points(sweep.output_path, models={str(real_cache.path): smollm2})  # the session's model, not a reload
    write_report(sweep.output_path)
    rows = read_csv(sweep.output_path / REPORT_DIRNAME / SUMMARY_CSV)
    metrics = [json.loads((sweep.folder(p) / METRICS_FILENAME).read_text()) for p in sweep.points]
    assert [float(r["ce_loss_recovered"]) for r in rows] == [m["ce_loss_recovered"] for m in metrics]
    # more active latents reconstruct better; both recover most of the CE loss the zero ablation loses
    assert metrics[1]["explained_variance"] > metrics[0]["explained_variance"] > 0.3
    assert all(0.5 < m["ce_loss_recovered"] <= 1.01 for m in metrics)
    assert np.isclose(metrics[0]["l0"], 16, atol=0.01)
