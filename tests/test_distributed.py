"""Sweeps on a Dask cluster: each fused group is a task on a two-worker LocalCluster, the points land
in the same folders as a local run with bit-identical weights, and a bad scheduler is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.errors import ConfigError
from pipeline.sweep import POINT_FILENAME, load_sweep, run_sweep
from stages.cli import cli
from tests.test_sweep import assert_same_sae, low_rank_cache, write_sweep

distributed = pytest.importorskip("distributed")

# seed fixes the batch stream, so the two seeds make two groups of two SAEs: one task per worker
GRID = {"seed": [0, 1], "k": [2, 4]}


def trained_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def assert_same_sweep(local, remote):
    """Same points, same files in each folder, same weights, densities and logs; point.json alike
    but for the measured throughput."""
    assert [p.id for p in local.points] == [p.id for p in remote.points]
    for point in local.points:
        a, b = local.folder(point), remote.folder(point)
        assert trained_files(a) == trained_files(b)
        assert_same_sae(a, b)
        ra, rb = (json.loads((f / POINT_FILENAME).read_text()) for f in (a, b))
        assert ra.pop("tokens_per_second") > 0 and rb.pop("tokens_per_second") > 0
        assert ra == rb and ra["status"] == "finished"


def test_groups_run_as_tasks_on_a_cluster_address_with_the_weights_of_a_local_run(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    local = load_sweep(write_sweep(tmp_path, cache.path, name="local", grid=GRID))
    local_result = run_sweep(local, progress=False)
    assert len(local_result.groups) == 2 and len(local_result.trained) == 4

    remote = load_sweep(write_sweep(tmp_path, cache.path, name="remote", grid=GRID))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        result = run_sweep(remote, progress=False, scheduler=cluster.scheduler_address)
        assert sorted(result.trained) == sorted(local_result.trained) and not result.failed
        assert_same_sweep(local, remote)
        # a rerun on the cluster finds every point finished and submits nothing
        again = run_sweep(remote, progress=False, scheduler=cluster.scheduler_address)
    assert again.groups == [] and sorted(again.skipped) == sorted(p.id for p in remote.points)


def test_sweep_cli_on_a_local_cluster_of_two_worker_processes_matches_a_local_run(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    local = load_sweep(write_sweep(tmp_path, cache.path, name="local", grid=GRID))
    run_sweep(local, progress=False)
    path = write_sweep(tmp_path, cache.path, name="cluster", grid=GRID)
    out = CliRunner().invoke(cli, ["sweep", "--config", str(path), "--scheduler", "local", "--no-report"])
    assert out.exit_code == 0, out.output
    assert "4 trained, 0 skipped (finished), 0 failed" in out.output
    assert_same_sweep(local, load_sweep(path))


def test_an_unreachable_scheduler_is_refused_naming_the_address(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    sweep = load_sweep(write_sweep(tmp_path, cache.path, grid={"k": [2]}))
    with pytest.raises(ConfigError, match=r"cannot reach the Dask scheduler at 'nonsense'.*--scheduler local"):
        run_sweep(sweep, progress=False, scheduler="nonsense")
    assert not (sweep.folder(sweep.points[0]) / POINT_FILENAME).exists()
