"""``sae-pipeline evaluate``: holdout metrics and CE loss recovered; writes metrics.json."""

from __future__ import annotations

import json

import click

from pipeline.config import EvalConfig
from pipeline.evaluate import evaluate
from stages.common import config_options, load_config, parse_sets


def run(cfg: EvalConfig) -> dict:
    metrics = evaluate(cfg)
    click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return metrics


@click.command("evaluate")
@config_options
@click.option("--sae-path", help="SAE folder to evaluate.")
@click.option("--cache-path", help="Cache whose holdout slice to use (default: the one it trained on).")
@click.option("--ce-loss/--no-ce-loss", default=None, help="Also measure CE loss recovered (reruns the model).")
@click.option("--n-ce-sequences", type=int, help="Holdout sequences for CE loss recovered.")
@click.option("--device")
@click.option("--output-path", help="Where to write metrics.json (default: inside the SAE folder).")
def command(config_path, sets, **flags):
    """Measure L0, MSE, explained variance, dead fraction and CE loss recovered on held-out data."""
    run(load_config(EvalConfig, "evaluate", config_path, {**flags, **parse_sets(sets)}))
