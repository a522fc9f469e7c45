"""``sae-pipeline sweep``: train a grid of SAEs in fused groups from one cache, then report."""

from __future__ import annotations

import click

from pipeline.dvc_points import write_dvc_points
from pipeline.errors import ConfigError, TrainingError
from pipeline.sweep import DEFAULT_MAX_MEMORY_GB, SweepResult, load_sweep, run_sweep
from stages import report
from stages.common import parse_sets


def run(config_path: str, *, base_overrides: dict | None = None, max_memory_gb: float = DEFAULT_MAX_MEMORY_GB,
        only: tuple[str, ...] = (), dry_run: bool = False, with_report: bool = True,
        ce_loss: bool | None = None, scheduler: str | None = None, torch_threads: int | None = None) -> SweepResult:
    """Load the sweep file, train what is new or changed (here or on a Dask cluster), then evaluate
    and report.

    Raises:
        TrainingError: a point failed (after the report of the others), or a point asked for by
            ``only`` is being trained by another run, so scripts, CI and per-point DVC stages see a
            non-zero exit.
    """
    sweep = load_sweep(config_path, base_overrides)
    result = run_sweep(sweep, max_memory_gb=max_memory_gb, only=only, dry_run=dry_run, scheduler=scheduler,
                       torch_threads=torch_threads)
    if with_report and not dry_run:
        report.run(sweep.output_path, ce_loss=ce_loss)
    if result.failed:
        raise TrainingError(f"point {', '.join(result.failed)} failed: {'; '.join(result.failed.values())}")
    if only and result.busy:  # a per-point DVC stage must not pass without its SAE
        raise TrainingError(f"point {', '.join(result.busy)} is being trained by another run (see the plan above); "
                            "wait for it to finish, then rerun this command.")
    return result


@click.command("sweep")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Sweep file: base training fields, grid and/or points (see configs/sweeps/).")
@click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
              help="Override a base training field for every point (repeatable), e.g. --set cache_path=...")
@click.option("--max-memory-gb", type=float, default=DEFAULT_MAX_MEMORY_GB, show_default=True,
              help="Memory budget of one group of SAEs trained together (GiB, estimated; see README).")
@click.option("--point", "only", multiple=True, metavar="POINT_ID",
              help="Train only this point (repeatable); the exit status is non-zero when it fails.")
@click.option("--dry-run", is_flag=True, help="Print each point's status and the grouping; train nothing.")
@click.option("--report/--no-report", "with_report", default=True, show_default=True,
              help="Evaluate the points and write <sweep>/report/ afterwards.")
@click.option("--ce-loss/--no-ce-loss", default=None,
              help="Measure CE loss recovered in the report's evaluation. [default: the sweep's evaluate: "
                   "section, else on]")
@click.option("--write-dvc-points", "dvc_points_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Write the sweep's points to FILE for dvc.yaml's per-point stages (e.g. "
                   "configs/sweeps/dvc/<name>.yaml) and train nothing.")
@click.option("--scheduler", default=None, metavar="ADDRESS|local",
              help="Run each group as a task on this Dask scheduler (e.g. tcp://host:8786), or on a LocalCluster "
                   "with 'local'; workers must see the same cache and output paths.")
@click.option("--torch-threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads per group on the cluster. [default: this machine's, so the weights equal a "
                   "local run's]")
def command(config_path, sets, max_memory_gb, only, dry_run, with_report, ce_loss, dvc_points_path, scheduler,
            torch_threads):
    """Train every point of a sweep grid, each batch read once for a whole group of SAEs.

    Re-running trains only new or changed points; finished ones are skipped. A point that fails
    (NaN loss, out of memory) is marked failed in its folder and the others continue.
    """
    if dvc_points_path:
        if sets:
            raise ConfigError("--write-dvc-points lists the sweep file as dvc.yaml runs it, without --set; put the "
                              "change in the sweep file instead.")
        sweep = load_sweep(config_path)
        click.echo(f"wrote {write_dvc_points(sweep, dvc_points_path)}: the {len(sweep.points)} points of "
                   f"{config_path}, for dvc.yaml's per-point stages")
        return
    run(config_path, base_overrides=parse_sets(sets), max_memory_gb=max_memory_gb, only=only, dry_run=dry_run,
        with_report=with_report, ce_loss=ce_loss, scheduler=scheduler, torch_threads=torch_threads)
