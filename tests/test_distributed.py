"""Dask clusters: each fused group of a sweep is a task on a two-worker LocalCluster, the points land
in the same folders as a local run with bit-identical weights, and a bad scheduler is refused; a
harvest split into shard ranges over two worker processes stores the same cache as one process."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import yaml
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


def test_a_sweep_reading_its_cache_by_url_trains_on_the_cluster_as_from_the_folder(tmp_path):
    cache = low_rank_cache(tmp_path / "cache")
    grid = {"k": [2, 4]}  # one stream: one group, one task
    local = load_sweep(write_sweep(tmp_path, cache.path, name="local", grid=grid))
    run_sweep(local, progress=False)
    remote = load_sweep(write_sweep(tmp_path, cache.path.as_uri(), name="remote", grid=grid))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        result = run_sweep(remote, progress=False, scheduler=cluster.scheduler_address)
    assert len(result.trained) == 2 and not result.failed
    assert remote.points[0].cfg.cache_path.startswith("file:///")
    assert_same_sweep(local, remote)


# ------------------------------------------------------------------------------------- harvests
HOOKS = ["blocks.2.hook_resid_post", "blocks.5.hook_resid_post"]


def _harvest_fields(shared_data):
    """A tiny real harvest: 2,048 Tiny Shakespeare tokens through SmolLM2-135M, 16 chunks of 128
    rows, 2 chunks per shard file (8 shards), forward batches of 3 sequences."""
    return {"model_name": "smollm2-135m", "hook_names": HOOKS, "n_tokens": 2048, "context_size": 32,
            "dataset_path": str(shared_data / "tinyshakespeare" / "input.txt"), "holdout_tokens": 256,
            "chunk_tokens": 128, "chunks_per_shard": 2, "store_batch_size_prompts": 3}


def _harvest_cfg(shared_data, out):
    from pipeline.config import HarvestConfig

    return HarvestConfig.from_dict({**_harvest_fields(shared_data), "output_path": str(out)})


def assert_same_cache(a, b):
    """Every hook's array value by value, every token id, every chunk checksum and every attribute."""
    from pipeline.bench.reliability import cache_content

    ca, cb = cache_content(a), cache_content(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        if key == "attrs":
            assert json.loads(ca[key]) == json.loads(cb[key])
        else:
            assert ca[key].dtype == cb[key].dtype and np.array_equal(ca[key], cb[key]), key


@pytest.mark.slow
def test_a_harvest_split_over_two_workers_equals_a_single_process_harvest(smollm2, shared_data, tmp_path, monkeypatch):
    from pipeline.cache import ActivationCache, CacheWriter
    from pipeline.harvest import harvest

    harvest(_harvest_cfg(shared_data, tmp_path / "local"), model=smollm2)
    # a local harvest stopped after chunk 2, in the middle of shard 1, to be finished by the cluster
    original = CacheWriter.write_chunk

    def stops_at_three(self, i, blocks):
        if i == 3:
            raise KeyboardInterrupt
        original(self, i, blocks)

    monkeypatch.setattr(CacheWriter, "write_chunk", stops_at_three)
    with pytest.raises(KeyboardInterrupt):
        harvest(_harvest_cfg(shared_data, tmp_path / "resumed"), model=smollm2)
    monkeypatch.undo()
    assert ActivationCache.open(tmp_path / "resumed", require_complete=False).n_chunks_written == 3

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        (tmp_path / "harvest.yaml").write_text(yaml.safe_dump(_harvest_fields(shared_data)))
        out = CliRunner().invoke(cli, ["harvest", "--config", str(tmp_path / "harvest.yaml"), "--output-path",
                                       str(tmp_path / "cluster"), "--scheduler", cluster.scheduler_address])
        assert out.exit_code == 0, out.output
        assert "as 8 shard ranges" in out.output
        resumed = harvest(_harvest_cfg(shared_data, tmp_path / "resumed"), model=smollm2,
                          scheduler=cluster.scheduler_address)
        # both worker processes harvested ranges (each loaded the model once, for its first range)
        loaded = client.run(lambda: bool(importlib.import_module("pipeline.distributed")._WORKER_MODEL))
    assert sorted(loaded.values()) == [True, True]
    assert resumed.n_tokens_harvested == 2048 - 3 * 128
    assert_same_cache(tmp_path / "local", tmp_path / "cluster")
    assert_same_cache(tmp_path / "local", tmp_path / "resumed")
