"""``sae-pipeline bench``: the performance suite against SAELens (see :mod:`pipeline.bench.suite`)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.bench.suite import CASES, parse_cases, run_suite
from pipeline.config import check_device
from pipeline.errors import ConfigError


@click.command("bench")
@click.option("--cases", default="all", show_default=True,
              help=f"Comma-separated cases to run: {', '.join(CASES)}, or all.")
@click.option("--cache", default="data/harvests/anchor_wikitext", show_default=True, type=click.Path(file_okay=False),
              help="A real activation cache to train and load from (make it with "
                   "`sae-pipeline harvest --config configs/anchor_wikitext.yaml`).")
@click.option("--out", default="data/bench/suite", show_default=True, type=click.Path(file_okay=False),
              help="Folder for bench.json, bench.md and the work files.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu or cuda: where the trainers, the sweep and the harvest's model run.")
@click.option("--quick", is_flag=True, help="Tiny sizes: checks the machinery, the figures mean nothing.")
@click.option("--no-saelens", is_flag=True,
              help="Skip the SAELens side (for an install without the `bench` extra, which brings sae-lens).")
def command(cases: str, cache: str, out: str, device: str, quick: bool, no_saelens: bool) -> None:
    """Measure training, loader, harvest, memory and scaling side by side with SAELens; print the
    tables and write them as JSON and Markdown. Takes about 25-40 minutes on 2 CPU cores."""
    chosen = parse_cases(cases)
    check_device(device)
    if set(chosen) - {"harvest"} and not Path(cache).is_dir():
        raise ConfigError(
            f"no activation cache at {cache!r}, which the {', '.join(c for c in chosen if c != 'harvest')} case(s) "
            "train and load from: make it with `sae-pipeline harvest --config configs/anchor_wikitext.yaml` "
            "(about 2 minutes on 2 cores), or pass --cache <folder of a harvest>.")
    result = run_suite(chosen, cache=cache, out=Path(out), device=device, quick=quick,
                       saelens=not no_saelens, echo=click.echo)
    click.echo(f"bench: wrote {Path(out) / 'bench.json'} and {Path(out) / 'bench.md'}")
    if result["errors"]:
        raise click.ClickException(f"cases failed: {', '.join(result['errors'])} (their errors are in bench.json)")
