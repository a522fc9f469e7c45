"""The sweep as dvc.yaml's per-point stages see it, without DVC: the points file, the refusal of a
stale one, per-point evaluation beside the point folders, and a failing point failing its stage."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from click.testing import CliRunner

from pipeline.dvc_points import check_dvc_points, dvc_key, read_dvc_points, write_dvc_points
from pipeline.errors import ConfigError, TrainingError
from pipeline.report import evaluate_point
from pipeline.sweep import load_sweep
from stages.cli import cli
from tests.test_sweep import SMALL, low_rank_cache

POINTS = [{"architecture": "topk", "k": 2}, {"architecture": "standard", "l1_coefficient": 0.5}]
BASE = {k: v for k, v in SMALL.items() if k != "k"}  # k only where the architecture reads it


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A folder with a synthetic cache and a two-point sweep file (paths relative to it), as cwd."""
    low_rank_cache(tmp_path / "cache")
    write_sweep_file(tmp_path, POINTS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_sweep_file(folder, points, **base):
    data = {"name": "tiny.v1", "base": {"cache_path": "cache", **BASE, **base}, "grid": {"d_sae": [32]},
            "points": points, "evaluate": {"ce_loss": False}}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_points_file_lists_every_point_and_a_stale_one_is_refused(project):
    sweep = load_sweep("sweep.yaml")
    write_dvc_points(sweep, "dvc/points.yaml")
    raw = yaml.safe_load((project / "dvc/points.yaml").read_text())
    assert list(raw) == ["tiny_v1"] == [dvc_key(sweep.name)]
    assert raw["tiny_v1"] == {
        "config": "sweep.yaml", "output_path": "data/sweeps/tiny.v1", "metrics_path": "data/sweeps/tiny.v1/metrics",
        "points": {p.id: {"cache_path": "cache", "params": p.params} for p in sweep.points}}
    assert check_dvc_points("dvc/points.yaml")[0].points[1].id == sweep.points[1].id

    write_sweep_file(project, [POINTS[0], {**POINTS[1], "l1_coefficient": 1}])  # one value edited
    new_id = load_sweep("sweep.yaml").points[1].id
    with pytest.raises(ConfigError, match=rf"'dvc/points.yaml' is out of date with 'sweep.yaml' \(new points: {new_id}; "
                                          rf"points no longer in the sweep: {sweep.points[1].id}\); run `sae-pipeline "
                                          r"sweep --config sweep.yaml --write-dvc-points dvc/points.yaml`"):
        check_dvc_points("dvc/points.yaml")
    write_sweep_file(project, POINTS, cache_path="elsewhere")  # same ids, other activations
    with pytest.raises(ConfigError, match=r"changed cache_path: " + sweep.points[0].id):
        check_dvc_points("dvc/points.yaml")
    (project / "other.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="is not a DVC points file"):
        read_dvc_points("other.yaml")


def test_per_point_evaluation_writes_beside_the_point_folders_and_the_report_reads_it(project):
    runner = CliRunner()
    out = runner.invoke(cli, ["sweep", "--config", "sweep.yaml", "--write-dvc-points", "dvc/points.yaml"])
    assert out.exit_code == 0, out.output
    sweep = load_sweep("sweep.yaml")
    ids = [p.id for p in sweep.points]
    for pid in ids:  # what dvc.yaml's sweep@<id> and sweep_evaluate@<id> stages run
        assert runner.invoke(cli, ["sweep", "--config", "sweep.yaml", "--point", pid, "--no-report"]).exit_code == 0
        out = runner.invoke(cli, ["report", "--dvc-points", "dvc/points.yaml", "--point", pid])
        assert out.exit_code == 0, out.output
    metrics_dir = project / "data/sweeps/tiny.v1/metrics"
    assert sorted(p.name for p in metrics_dir.iterdir()) == sorted(f"{pid}.json" for pid in ids)
    assert not (project / "data/sweeps/tiny.v1/report").exists()
    (metrics_dir / "dropped-point-abcdef.json").write_text("{}")  # a point gone from the sweep

    out = runner.invoke(cli, ["report", "--dvc-points", "dvc/points.yaml", "--no-evaluate"])  # sweep_report
    assert out.exit_code == 0, out.output
    assert not (metrics_dir / "dropped-point-abcdef.json").exists()
    with open(project / "data/sweeps/tiny.v1/report/summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["point_id"] for r in rows] == ids
    for row, point in zip(rows, sweep.points):
        folder = sweep.folder(point)
        assert not (folder / "metrics.json").exists()
        # independently: the same SAE evaluated the plain way, into its own folder
        expected = evaluate_point(folder, {"ce_loss": False})
        assert json.loads((metrics_dir / f"{point.id}.json").read_text()) == expected
        assert float(row["l0"]) == expected["l0"] and float(row["dense_fraction"]) == expected["dense_fraction"]


def test_a_failing_point_fails_its_stage_and_the_report_needs_one_source(project):
    write_sweep_file(project, [{"architecture": "topk", "k": 2, "lr": 1e30}])
    pid = load_sweep("sweep.yaml").points[0].id
    out = CliRunner().invoke(cli, ["sweep", "--config", "sweep.yaml", "--point", pid, "--no-report"])
    assert out.exit_code != 0 and isinstance(out.exception, TrainingError)
    assert f"point {pid} failed" in str(out.exception) and "loss became" in str(out.exception)
    out = CliRunner().invoke(cli, ["report"])
    assert isinstance(out.exception, ConfigError) and "pass one of --sweep" in str(out.exception)
