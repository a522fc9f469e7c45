"""The project's dvc.yaml in a scratch git + DVC repository, on tiny configs (a 2,048-token SmolLM2
harvest at blocks.0, SAEs of 64 latents): a second `dvc repro` does nothing, an edited sweep point
reruns alone, `dvc exp run -S` reruns what the parameter touches, a harvest change invalidates every
SAE, and a stale points file is refused."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
import yaml

from pipeline.cache import ActivationCache
from pipeline.dvc_points import check_dvc_points, write_dvc_points
from pipeline.errors import ConfigError
from pipeline.sae import SAE
from pipeline.sweep import load_sweep

pytestmark = pytest.mark.slow  # the harvest stage runs the real SmolLM2-135M

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if not (BIN / "dvc").exists():
    pytest.skip("dvc is not installed: pip install -e '.[dvc]'", allow_module_level=True)
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1"}

SWEEP_FILE = "configs/sweeps/default_small.yaml"
POINTS_FILE = "configs/sweeps/dvc/default_small.yaml"
SWEEP_DIR = "data/sweeps/default_small"
SMALL_TRAINING = {"lr": 0.001, "train_batch_size_tokens": 256, "training_tokens": 2048,
                  "shuffle_buffer_tokens": 1024, "seed": 0}
DEFAULT_CONFIG = {
    "harvest": {"model_name": "smollm2-135m", "hook_names": ["blocks.0.hook_resid_post"], "dataset_path": "shakespeare",
                "context_size": 64, "prepend_bos": False, "n_tokens": 2048, "holdout_tokens": 512,
                "dtype": "float16", "output_path": "data/harvests/default"},
    "train": {"cache_path": "data/harvests/default", "architecture": "topk", "d_sae": 64, "k": 4,
              **SMALL_TRAINING, "output_path": "data/saes/default"},
    "evaluate": {"sae_path": "data/saes/default", "ce_loss": False, "output_path": "data/eval/default/metrics.json"},
}
SWEEP = {"base": {"cache_path": "data/harvests/default", "d_sae": 64, **SMALL_TRAINING},
         "points": [{"architecture": "topk", "k": 4}, {"architecture": "standard", "l1_coefficient": 0.5}],
         "evaluate": {"ce_loss": False}}


@contextmanager
def inside(repo: Path) -> Iterator[None]:
    """Paths in the sweep and points files are relative to the DVC project, as dvc.yaml runs them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(repo)
        yield


def dvc(repo: Path, *args: str, stdout_only: bool = False) -> str:
    out = subprocess.run(["dvc", *args], cwd=repo, env=ENV, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout if stdout_only else out.stdout + out.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def point_ids(repo: Path) -> list[str]:
    with inside(repo):
        return [p.id for p in load_sweep(SWEEP_FILE).points]


def write_points(repo: Path) -> None:
    with inside(repo):
        write_dvc_points(load_sweep(SWEEP_FILE), POINTS_FILE)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git + DVC repository holding the project's dvc.yaml and pipeline/ (its stages' code deps)
    with tiny configs, after its first `dvc repro`; yields (repo, that repro's output)."""
    repo = tmp_path_factory.mktemp("dvc") / "project"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_yaml(repo / "configs/default.yaml", DEFAULT_CONFIG)
    write_yaml(repo / SWEEP_FILE, SWEEP)
    write_points(repo)
    (repo / ".gitignore").write_text("/data/*\n")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "tiny project"]):
        subprocess.run(cmd, cwd=repo, env=ENV, check=True, capture_output=True)
    yield repo, dvc(repo, "repro")


def test_a_second_repro_does_nothing_and_an_edited_point_reruns_alone(project, tmp_path):
    repo, first = project
    ids = point_ids(repo)
    assert ran(first) == {"harvest", "train", "evaluate", "sweep_report",
                          *(f"sweep@{i}" for i in ids), *(f"sweep_evaluate@{i}" for i in ids)}
    rows = check_report(repo, ids)
    plots = json.loads(dvc(repo, "plots", "show", "--json", "-o", str(tmp_path / "plots"), stdout_only=True))["data"]
    scatter = plots["default_small L0 vs explained variance"][0]["content"]["data"]["values"]
    assert [(v["point_id"], v["l0"], v["explained_variance"]) for v in scatter] == [
        (r["point_id"], r["l0"], r["explained_variance"]) for r in rows]
    assert {f"{SWEEP_DIR}/report/{name}" for name in ("pareto_explained_variance.png", "feature_density.png")} <= set(plots)

    second = dvc(repo, "repro")
    assert ran(second) == set() and "Data and pipelines are up to date" in second

    sweep = yaml.safe_load((repo / SWEEP_FILE).read_text())
    sweep["points"][1]["l1_coefficient"] = 1.0
    write_yaml(repo / SWEEP_FILE, sweep)
    new_ids = point_ids(repo)
    assert new_ids[0] == ids[0] and new_ids[1] != ids[1]
    with inside(repo), pytest.raises(ConfigError, match=rf"out of date .*new points: {new_ids[1]}; points no longer "
                                                        rf"in the sweep: {ids[1]}\).*--write-dvc-points {POINTS_FILE}"):
        check_dvc_points(POINTS_FILE)
    write_points(repo)
    third = dvc(repo, "repro")
    assert ran(third) == {f"sweep@{new_ids[1]}", f"sweep_evaluate@{new_ids[1]}", "sweep_report"}
    check_report(repo, new_ids)
    # the dropped point's metrics left with its stage; its SAE folder is kept, as a sweep keeps it
    assert sorted(f.stem for f in (repo / SWEEP_DIR / "metrics").glob("*.json")) == sorted(new_ids)
    assert (repo / SWEEP_DIR / ids[1] / "cfg.json").is_file()
    assert ran(dvc(repo, "repro")) == set()


def check_report(repo: Path, ids: list[str]) -> list[dict[str, str]]:
    """The summary lists the sweep's points with their metrics files' values; each L0 equals the
    mean count of active latents over the holdout rows, recomputed here from the SAE and the cache.
    Returns the summary's rows."""
    with open(repo / SWEEP_DIR / "report/summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["point_id"] for r in rows] == ids
    cache = ActivationCache.open(repo / "data/harvests/default")
    x = torch.cat([holdout_rows(cache, c) for c in cache.holdout_chunks])
    for row in rows:
        metrics = json.loads((repo / SWEEP_DIR / "metrics" / f"{row['point_id']}.json").read_text())
        assert row["status"] == "finished" and float(row["l0"]) == metrics["l0"]
        assert float(row["explained_variance"]) == metrics["explained_variance"]
        sae = SAE.load(repo / SWEEP_DIR / row["point_id"])
        with torch.no_grad():
            assert metrics["l0"] == pytest.approx((sae.encode(x) != 0).sum(1).double().mean().item(), rel=1e-6)
    assert not (repo / SWEEP_DIR / ids[0] / "metrics.json").exists()  # the training stage's folder is left alone
    return rows


def holdout_rows(cache: ActivationCache, chunk: int) -> torch.Tensor:
    keep = ~np.isin(cache.chunk_token_ids(chunk), np.asarray(cache.special_token_ids, dtype=np.int64))
    return cache.read_chunk(cache.hook_names[0], chunk).float()[torch.from_numpy(keep)]


def test_exp_run_set_param_and_a_harvest_change_rerun_what_they_touch(project):
    repo, _ = project
    out = dvc(repo, "exp", "run", "-S", "configs/default.yaml:train.k=2")
    assert ran(out) == {"train", "evaluate"}
    assert yaml.safe_load((repo / "configs/default.yaml").read_text())["train"]["k"] == 2
    assert json.loads((repo / "data/eval/default/metrics.json").read_text())["l0"] <= 2

    config = yaml.safe_load((repo / "configs/default.yaml").read_text())
    config["harvest"]["n_tokens"] = 2560
    write_yaml(repo / "configs/default.yaml", config)
    assert ran(dvc(repo, "repro", "harvest")) == {"harvest"}
    assert ActivationCache.open(repo / "data/harvests/default").attrs["n_tokens"] == 2560
    status = json.loads(dvc(repo, "status", "--json", stdout_only=True))
    ids = point_ids(repo)
    # every SAE now trains on other activations: DVC holds all of them, and only them, out of date
    assert set(status) == {"train", "evaluate", *(f"sweep@{i}" for i in ids), *(f"sweep_evaluate@{i}" for i in ids)}
    assert all({"changed deps": {"data/harvests/default": "modified"}} in status[f"sweep@{i}"] for i in ids)
