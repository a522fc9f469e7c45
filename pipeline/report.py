"""A sweep's report: every point evaluated, a summary table, Pareto plots and feature densities.

Written to ``<sweep>/report/`` (each file through a temporary name and a rename):

- ``summary.csv`` / ``summary.md``: one row per point of the sweep (``sweep.json``): id, status,
  the fields the point sets, then ``l0`` (active latents per token), ``explained_variance``,
  ``ce_loss_recovered``, ``dead_fraction`` (latents silent on all holdout tokens), ``dense_fraction``
  and ``mse``, copied from the point's ``metrics.json``. The CSV keeps full float precision.
- ``pareto_explained_variance.png`` and ``pareto_ce_loss_recovered.png``: metric against L0 (log
  x), one colour per architecture, each architecture's Pareto frontier (points no other point of
  that architecture beats on both lower L0 and higher metric) drawn as a line.
- ``feature_density.png``: per SAE, the histogram of ``log10`` feature density from its
  ``sparsity.safetensors`` (never-firing latents sit at -10).

Evaluation (:func:`evaluate_points`) runs :func:`pipeline.evaluate.evaluate` on every finished
point that has no ``metrics.json`` yet (or lacks CE loss recovered when it is asked for), with the
sweep's ``evaluate:`` settings, and adds ``dense_fraction``: the fraction of latents whose training
density (the last ``feature_sampling_window``, from ``sparsity.safetensors``) exceeds the point's
``dense_feature_threshold``.

Every function that reads or writes metrics takes ``metrics_dir``: None keeps each point's
evaluation in ``<point>/metrics.json``; a folder keeps it as ``<metrics_dir>/<point id>.json``
instead, which is how ``dvc.yaml`` runs it (:mod:`pipeline.dvc_points`), because there the
training stage owns the point folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from pipeline.cache import ActivationCache
from pipeline.config import EvalConfig, read_yaml_mapping
from pipeline.errors import ConfigError
from pipeline.constants import METRICS_FILENAME, TRAIN_CONFIG_FILENAME
from pipeline.sae.io import atomic_write, load_sparsity
from pipeline.sweep import POINT_FILENAME, read_index, read_point_record

REPORT_DIRNAME = "report"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
PARETO_PLOTS = {"explained_variance": "pareto_explained_variance.png",
                "ce_loss_recovered": "pareto_ce_loss_recovered.png"}
DENSITY_PLOT = "feature_density.png"
METRIC_COLUMNS = ("l0", "explained_variance", "ce_loss_recovered", "dead_fraction", "dense_fraction", "mse")
_METRIC_LABELS = {"explained_variance": "explained variance", "ce_loss_recovered": "CE loss recovered"}


# ------------------------------------------------------------------------------------- evaluation
def evaluate_points(sweep_path: str | Path, *, ce_loss: bool | None = None, device: str | None = None,
                    models: dict[str, Any] | None = None, only: Sequence[str] = (),
                    metrics_dir: str | Path | None = None) -> list[str]:
    """Evaluate each finished point lacking ``metrics.json`` (or its CE loss, when asked for);
    returns the ids evaluated. ``ce_loss`` / ``device`` override the sweep's ``evaluate:`` settings;
    ``models`` maps a cache path to its already loaded language model (others load on demand);
    ``only`` limits it to those point ids; ``metrics_dir``: see the module docstring.

    Raises:
        ConfigError: ``sweep_path`` is not a sweep folder, ``only`` names a point it does not list, or
            the evaluate settings are invalid.
        CacheError, SAEFormatError: a point's cache or SAE is missing or mismatched.
    """
    root = Path(sweep_path)
    index = read_index(root)
    _check_listed(index, only)
    overrides = {k: v for k, v in {"ce_loss": ce_loss, "device": device}.items() if v is not None}
    settings = {**index.get("evaluate", {}), **overrides}
    wants_ce = EvalConfig.from_dict(settings).ce_loss
    models = dict(models or {})
    done = []
    for entry in index["points"]:
        folder, target = root / entry["id"], metrics_path(root, entry["id"], metrics_dir)
        if (only and entry["id"] not in only) or read_point_record(folder).get("status") != "finished":
            continue
        metrics = _read_metrics(target)
        if metrics is not None and (not wants_ce or "ce_loss_recovered" in metrics):
            continue
        print(f"evaluate {entry['id']}")
        evaluate_point(folder, settings, models, target=target)
        done.append(entry["id"])
    return done


def metrics_path(sweep_path: str | Path, point_id: str, metrics_dir: str | Path | None = None) -> Path:
    """Where a point's evaluation lives: ``<sweep>/<id>/metrics.json``, or ``<metrics_dir>/<id>.json``."""
    if metrics_dir is None:
        return Path(sweep_path) / point_id / METRICS_FILENAME
    return Path(metrics_dir) / f"{point_id}.json"


def _check_listed(index: dict[str, Any], only: Sequence[str]) -> None:
    ids = {p["id"] for p in index["points"]}
    missing = [pid for pid in only if pid not in ids]
    if missing:
        raise ConfigError(f"the sweep {index.get('name')!r} has no point {missing[0]!r}; list its points with "
                          "`sae-pipeline sweep --config <sweep file> --dry-run`.")


def evaluate_point(folder: Path, settings: dict[str, Any], models: dict[str, Any] | None = None, *,
                   target: Path | None = None) -> dict[str, Any]:
    """Evaluate the SAE in ``folder`` with EvalConfig ``settings``, add ``dense_fraction`` and write
    the metrics atomically to ``target`` (default ``folder/metrics.json``); returns them. ``models``
    caches the language model per cache path (CE loss loads it once for all points of that cache)."""
    # imported here: the evaluation imports transformer_lens (seconds), which writing a report from
    # metrics already on disk never needs
    from pipeline.evaluate import load_cache_model, evaluate

    target = folder / METRICS_FILENAME if target is None else target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.eval.json")
    cfg = EvalConfig.from_dict({**settings, "sae_path": str(folder), "output_path": str(scratch)})
    model = None
    if cfg.ce_loss:
        cache_path = cfg.cache_path or read_yaml_mapping(folder / TRAIN_CONFIG_FILENAME)["cache_path"]
        models = {} if models is None else models
        if cache_path not in models:
            models[cache_path] = load_cache_model(ActivationCache.open(cache_path), cfg.device)
        model = models[cache_path]
    metrics = evaluate(cfg, model=model)
    scratch.unlink(missing_ok=True)
    metrics["dense_fraction"] = dense_fraction(folder)
    atomic_write(target, lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"))
    return metrics


def dense_fraction(folder: Path) -> float | None:
    """Fraction of latents with ``10**sparsity > dense_feature_threshold`` (the point's training
    config; 0.1 by default), or None without ``sparsity.safetensors``."""
    sparsity = load_sparsity(folder)
    if sparsity is None:
        return None
    threshold = read_yaml_mapping(folder / TRAIN_CONFIG_FILENAME).get("dense_feature_threshold", 0.1)
    return float((torch.pow(10.0, sparsity.double()) > threshold).double().mean())


def _read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------- table
def summary_rows(sweep_path: str | Path, metrics_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per point of ``sweep.json``, in sweep order: ``point_id``, ``status`` (finished,
    failed, not trained), ``architecture``, every field any point sets, ``METRIC_COLUMNS`` from its
    ``metrics.json`` (None where absent; ``metrics_dir``: see the module docstring), and ``error``
    for failed points."""
    root = Path(sweep_path)
    points = read_index(root)["points"]
    fields = list(dict.fromkeys(k for p in points for k in p["params"] if k != "architecture"))
    rows = []
    for p in points:
        folder = root / p["id"]
        record = read_point_record(folder)
        metrics = _read_metrics(metrics_path(root, p["id"], metrics_dir)) or {}
        row = {"point_id": p["id"], "status": record.get("status", "not trained"),
               "architecture": p["params"]["architecture"], **{k: p["params"].get(k) for k in fields},
               **{k: metrics.get(k) for k in METRIC_COLUMNS}, "error": record.get("error")}
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of ``rows`` (full float precision; None as an empty cell; lists as JSON)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["point_id"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return out.getvalue()


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` with numbers to 4 significant digits, ``–`` where absent."""
    if not rows:
        return "(no points)\n"
    columns = [c for c in rows[0] if c != "error" or any(r.get("error") for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


# ------------------------------------------------------------------------------------- plots
def pareto_front(l0: Sequence[float], score: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both lower ``l0`` and higher ``score``, by
    increasing ``l0`` (ties in ``l0`` keep the higher score)."""
    front, best = [], -math.inf
    for i in sorted(range(len(l0)), key=lambda i: (l0[i], -score[i])):
        if score[i] > best:
            front.append(i)
            best = score[i]
    return front


def plot_pareto(rows: list[dict[str, Any]], metric: str, title: str) -> Figure:
    """``metric`` against L0 (log x) for rows that have both, coloured by architecture, with each
    architecture's Pareto frontier as a line."""
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    usable = [r for r in rows if _finite(r.get("l0")) and r["l0"] > 0 and _finite(r.get(metric))]
    architectures = sorted({r["architecture"] for r in usable})
    for n, arch in enumerate(architectures):
        pts = [r for r in usable if r["architecture"] == arch]
        l0, score = [r["l0"] for r in pts], [r[metric] for r in pts]
        color = f"C{n % 10}"
        ax.scatter(l0, score, color=color, alpha=0.45, s=28)
        front = pareto_front(l0, score)
        ax.plot([l0[i] for i in front], [score[i] for i in front], "-o", color=color, label=arch, markersize=5)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100: legible over any range
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (holdout)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if usable:
        ax.legend(title="architecture")
    else:
        ax.text(0.5, 0.5, f"no point has {metric} yet", transform=ax.transAxes, ha="center", va="center")
    return fig


def plot_feature_density(densities: list[tuple[str, torch.Tensor]]) -> Figure:
    """Small multiples: one histogram of ``log10`` feature density ``[d_sae]`` per ``(id, density)``."""
    n = max(1, len(densities))
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.4 * ncols, 2.6 * nrows), layout="constrained")
    for i, (pid, density) in enumerate(densities):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.hist(density.double().clamp(-10, 0).numpy(), bins=50, range=(-10, 0), color="C0")
        ax.set_title(pid, fontsize=7)
        ax.set_xlabel("log10 feature density", fontsize=8)
        ax.set_ylabel("latents", fontsize=8)
        ax.tick_params(labelsize=7)
    if not densities:
        fig.add_subplot().text(0.5, 0.5, "no trained SAE yet", ha="center", va="center")
    return fig


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------------- writing
def write_report(sweep_path: str | Path, metrics_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the summary table and plots (module docstring) into ``<sweep>/report/``; returns the
    files by name. Reads only what is on disk (run :func:`evaluate_points` first).

    Raises:
        ConfigError: ``sweep_path`` is not a sweep folder.
    """
    root = Path(sweep_path)
    name = read_index(root).get("name", root.name)
    rows = summary_rows(root, metrics_dir)
    out = root / REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    files = {SUMMARY_CSV: out / SUMMARY_CSV, SUMMARY_MD: out / SUMMARY_MD}
    atomic_write(files[SUMMARY_CSV], lambda p: p.write_text(to_csv(rows)))
    atomic_write(files[SUMMARY_MD], lambda p: p.write_text(f"# Sweep {name}\n\n" + to_markdown(rows)))
    for metric, filename in PARETO_PLOTS.items():
        files[filename] = _save_png(plot_pareto(rows, metric, f"{name}: L0 vs {_METRIC_LABELS[metric]}"),
                                    out / filename)
    densities = [(r["point_id"], s) for r in rows
                 if r["status"] == "finished" and (s := load_sparsity(root / r["point_id"])) is not None]
    files[DENSITY_PLOT] = _save_png(plot_feature_density(densities), out / DENSITY_PLOT)
    _note_orphans(root, {r["point_id"] for r in rows})
    return files


def _save_png(fig: Figure, target: Path) -> Path:
    atomic_write(target, lambda p: fig.savefig(p, format="png", dpi=120))
    return target


def _note_orphans(root: Path, current: set[str]) -> None:
    """Name point folders the sweep no longer lists (an edited grid keeps them; the report skips them)."""
    orphans = sorted(p.name for p in root.iterdir() if (p / POINT_FILENAME).is_file() and p.name not in current)
    if orphans:
        print(f"note: {len(orphans)} point folder(s) not in the sweep's current grid are left out of the report "
              f"and kept on disk: {', '.join(orphans)}")
