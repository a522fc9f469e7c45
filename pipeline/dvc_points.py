"""A sweep's points as DVC reads them: the ``vars`` file behind ``dvc.yaml``'s per-point stages.

DVC resolves ``foreach`` when it parses ``dvc.yaml``, before any stage runs, so the list of points
has to exist as a file: ``sae-pipeline sweep --config configs/sweeps/<name>.yaml --write-dvc-points
configs/sweeps/dvc/<name>.yaml`` writes it (kept in git beside the sweep file), and ``dvc.yaml``
loads it with ``vars:`` and iterates ``foreach: ${<key>.points}``::

    default_small:                             # <key>: the sweep's name, '.' and '-' made '_'
      config: configs/sweeps/default_small.yaml
      output_path: data/sweeps/default_small
      metrics_path: data/sweeps/default_small/metrics
      points:
        topk-k32-dsae1152-4c1d2e:              # the point id: stage sweep@<id>, folder <output_path>/<id>
          cache_path: data/harvests/default
          params: {architecture: topk, k: 32, d_sae: 1152}

A point's id hashes its own fields, so editing one grid value gives that point a new id: DVC sees one
new stage (and one gone) and reruns nothing else. ``metrics_path`` holds each point's evaluation as
``<id>.json``: under DVC the point folder belongs to the training stage, so the evaluation stage
writes beside it instead of into it.

The file is derived, never edited by hand. :func:`check_dvc_points` (run by every ``sae-pipeline
report --dvc-points`` stage) refuses a file that no longer matches its sweep file, naming the
command that rewrites it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.cache import is_url
from pipeline.config import read_yaml_mapping
from pipeline.errors import ConfigError
from pipeline.sae.io import atomic_write
from pipeline.sweep import Sweep, load_sweep

DVC_METRICS_DIRNAME = "metrics"


@dataclass
class DvcPoints:
    """A read points file: its path, the sweep file it was written from, the sweep's folder, the
    folder of per-point metrics and the points (id → ``{"cache_path", "params"}``)."""

    path: Path
    config: str
    output_path: Path
    metrics_path: Path
    points: dict[str, dict[str, Any]]


def dvc_key(sweep_name: str) -> str:
    """The top-level key of a sweep's points file: its name with every character DVC's ``${...}``
    would misread (``.``, ``-``) made ``_``."""
    return re.sub(r"\W", "_", sweep_name)


def dvc_points(sweep: Sweep) -> dict[str, Any]:
    """The points file's content for ``sweep`` (module docstring); ``config`` is ``sweep.source``,
    the sweep file's path as it was given (relative to the DVC project, as ``dvc.yaml``'s are)."""
    output = Path(sweep.output_path)
    return {dvc_key(sweep.name): {
        "config": Path(sweep.source).as_posix(),
        "output_path": output.as_posix(),
        "metrics_path": (output / DVC_METRICS_DIRNAME).as_posix(),
        "points": {p.id: {"cache_path": _posix(p.cfg.cache_path), "params": p.params} for p in sweep.points},
    }}


def write_dvc_points(sweep: Sweep, path: str | Path) -> Path:
    """Write ``sweep``'s points file to ``path`` (through a temporary file and a rename); returns the path."""
    path = Path(path)
    header = (f"# The points of {sweep.source}, for dvc.yaml's per-point stages (its vars: and foreach:).\n"
              f"# Written by `{_write_command(sweep.source, path)}`;\n"
              "# do not edit: change the sweep file and run that command again.\n")
    text = header + yaml.safe_dump(dvc_points(sweep), sort_keys=False, default_flow_style=None, width=120)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(text))
    return path


def read_dvc_points(path: str | Path) -> DvcPoints:
    """Read a points file written by :func:`write_dvc_points`.

    Raises:
        ConfigError: the file is missing, not YAML, or not one ``<key>: {config, output_path,
            metrics_path, points}`` mapping.
    """
    raw = read_yaml_mapping(path)
    body = next(iter(raw.values())) if len(raw) == 1 else None
    keys = ("config", "output_path", "metrics_path", "points")
    if not isinstance(body, dict) or any(k not in body for k in keys) or not isinstance(body["points"], dict):
        raise ConfigError(f"{str(path)!r} is not a DVC points file (one key holding {', '.join(keys)}); write it with "
                          "`sae-pipeline sweep --config <sweep file> --write-dvc-points <this path>`.")
    return DvcPoints(Path(path), str(body["config"]), Path(body["output_path"]), Path(body["metrics_path"]),
                     body["points"])


def check_dvc_points(path: str | Path) -> tuple[Sweep, DvcPoints]:
    """Load the sweep file the points file at ``path`` names and check the file still lists exactly
    that sweep's points (ids, caches and folders); returns both.

    Raises:
        ConfigError: the points file is unreadable, the sweep file is invalid, or they disagree
            (the message names the points added, removed or changed, and the command that rewrites
            the points file; DVC needs it rewritten before its stages can follow the sweep).
    """
    view = read_dvc_points(path)
    sweep = load_sweep(view.config)
    expected = dvc_points(sweep)
    if {dvc_key(sweep.name): _as_written(view)} != expected:
        current = next(iter(expected.values()))
        raise ConfigError(f"{str(path)!r} is out of date with {view.config!r} ({_differences(view, current)}); run "
                          f"`{_write_command(view.config, path)}`, then `dvc repro` again.")
    return sweep, view


def prune_metrics(view: DvcPoints) -> list[Path]:
    """Delete the ``<metrics_path>/<id>.json`` of points the file no longer lists; returns them.

    Their stages left ``dvc.yaml`` with the points, so no stage owns them any more; kept, they would
    sit in the report stage's dependency (the whole metrics folder) until something else removed
    them (``dvc exp run`` does), and the report would rerun for nothing then.
    """
    stale = sorted(f for f in view.metrics_path.glob("*.json") if f.stem not in view.points)
    for f in stale:
        f.unlink()
    return stale


def _as_written(view: DvcPoints) -> dict[str, Any]:
    return {"config": view.config, "output_path": view.output_path.as_posix(),
            "metrics_path": view.metrics_path.as_posix(), "points": view.points}


def _differences(view: DvcPoints, current: dict[str, Any]) -> str:
    old, new = view.points, current["points"]
    parts = [f"{label}: {', '.join(ids)}" for label, ids in (
        ("new points", [i for i in new if i not in old]),
        ("points no longer in the sweep", [i for i in old if i not in new]),
        ("changed cache_path", [i for i in new if i in old and old[i] != new[i]]),
    ) if ids]
    if view.output_path.as_posix() != current["output_path"]:
        parts.append(f"output_path {view.output_path.as_posix()} → {current['output_path']}")
    return "; ".join(parts) or "the sweep's name or file path changed"


def _write_command(config: str | Path, path: str | Path) -> str:
    return f"sae-pipeline sweep --config {Path(config).as_posix()} --write-dvc-points {Path(path).as_posix()}"


def _posix(cache_path: str) -> str:
    """A local cache path with forward slashes; a URL as written (``Path`` would drop a slash of ``//``)."""
    return cache_path if is_url(cache_path) else Path(cache_path).as_posix()
