"""``sae-pipeline evaluate``: holdout metrics and CE loss recovered; writes metrics.json."""

from __future__ import annotations

import json

import click

from pipeline.config import EvalConfig
from pipeline.evaluate import evaluate
from stages.common import config_options, field_option, load_config, parse_sets


def run(cfg: EvalConfig) -> dict:
    metrics = evaluate(cfg)
    click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}))
    return metrics


def _opt(name: str, help: str = "", **kwargs):
    return field_option(EvalConfig, name, help, **kwargs)


@click.command("evaluate")
@config_options
@_opt("sae_path", "SAE folder to evaluate.")
@_opt("cache_path", "Cache whose holdout slice to use (default: the one the SAE trained on).")
@click.option("--ce-loss/--no-ce-loss", default=None, help="Also measure CE loss recovered (reruns the model). [default: on]")
@_opt("n_ce_sequences", "Holdout sequences for CE loss recovered.")
@_opt("device", "torch device, e.g. cpu or cuda.")
@_opt("output_path", "Where to write metrics.json (default: inside the SAE folder).")
def command(config_path, sets, **flags):
    """Measure L0, MSE, explained variance, dead fraction and CE loss recovered on held-out data."""
    run(load_config(EvalConfig, "evaluate", config_path, {**flags, **parse_sets(sets)}))
