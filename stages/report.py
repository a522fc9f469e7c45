"""``sae-pipeline report``: evaluate a sweep's points and write its summary table and plots."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.dvc_points import check_dvc_points, prune_metrics
from pipeline.errors import ConfigError
from pipeline.report import REPORT_DIRNAME, evaluate_points, summary_rows, to_markdown, write_report
from pipeline.sweep import write_index


def run(sweep_path: str | Path | None = None, *, dvc_points: str | Path | None = None, only: tuple[str, ...] = (),
        evaluate: bool = True, ce_loss: bool | None = None, device: str | None = None) -> dict[str, Path]:
    """Evaluate the points that lack metrics, then (unless ``only`` names points) write
    ``<sweep>/report/`` and print the table; returns the report files (none with ``only``).

    With ``dvc_points`` (a points file, :mod:`pipeline.dvc_points`) instead of ``sweep_path``: check
    the file is up to date, refresh ``sweep.json`` from the sweep file, and keep metrics in its
    ``metrics_path``, as ``dvc.yaml``'s stages do; the report deletes the metrics of points no
    longer in the sweep there (:func:`pipeline.dvc_points.prune_metrics`).

    Raises:
        ConfigError: neither or both of ``sweep_path`` and ``dvc_points``, a stale points file, or
            what :func:`pipeline.report.evaluate_points` raises.
    """
    if (sweep_path is None) == (dvc_points is None):
        raise ConfigError("pass one of --sweep (a sweep folder) and --dvc-points (the points file dvc.yaml reads).")
    metrics_dir = None
    if dvc_points is not None:
        sweep, view = check_dvc_points(dvc_points)
        write_index(sweep)
        sweep_path, metrics_dir = sweep.output_path, view.metrics_path
    if evaluate or only:
        evaluate_points(sweep_path, ce_loss=ce_loss, device=device, only=only, metrics_dir=metrics_dir)
    if only:
        return {}
    if dvc_points is not None:
        for stale in prune_metrics(view):
            click.echo(f"removed {stale}: its point is no longer in the sweep")
    files = write_report(sweep_path, metrics_dir)
    click.echo(to_markdown(summary_rows(sweep_path, metrics_dir)), nl=False)
    click.echo(f"report: {Path(sweep_path) / REPORT_DIRNAME} ({', '.join(files)})")
    return files


@click.command("report")
@click.option("--sweep", "sweep_path", type=click.Path(file_okay=False), default=None,
              help="Sweep folder written by `sae-pipeline sweep`, e.g. data/sweeps/<name>.")
@click.option("--dvc-points", type=click.Path(dir_okay=False), default=None,
              help="Instead of --sweep: the points file dvc.yaml iterates over (configs/sweeps/dvc/<name>.yaml); "
                   "metrics go to its metrics_path, and a stale file is refused.")
@click.option("--point", "only", multiple=True, metavar="POINT_ID",
              help="Only evaluate this point (repeatable) and write no report: dvc.yaml's per-point stage.")
@click.option("--evaluate/--no-evaluate", default=True, show_default=True,
              help="Evaluate points that lack metrics first (--no-evaluate: report what is on disk).")
@click.option("--ce-loss/--no-ce-loss", default=None,
              help="Measure CE loss recovered (reruns the model) when evaluating points. [default: the sweep's "
                   "evaluate: section, else on]")
@click.option("--device", default=None, help="torch device for evaluation, e.g. cpu or cuda.")
def command(sweep_path, dvc_points, only, evaluate, ce_loss, device):
    """Summary table (CSV, Markdown) and Pareto / feature-density plots of a sweep.

    Points without metrics.json are evaluated first on the cache's holdout slice.
    """
    run(sweep_path, dvc_points=dvc_points, only=only, evaluate=evaluate, ce_loss=ce_loss, device=device)
