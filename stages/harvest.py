"""``sae-pipeline harvest``: stage 1, model activations → Zarr cache."""

from __future__ import annotations

import json

import click

from pipeline.config import HarvestConfig
from pipeline.harvest import HarvestResult, describe, harvest
from stages.common import config_options, load_config, parse_sets


def run(cfg: HarvestConfig) -> HarvestResult:
    """Harvest (or resume) and print a one-line summary plus the figures as JSON."""
    result = harvest(cfg)
    click.echo(result.cache.summary())
    click.echo(json.dumps(describe(result)))
    return result


@click.command("harvest")
@config_options
@click.option("--model-name", help="TransformerLens name, HF name/folder, .gguf file, or smollm2-135m.")
@click.option("--hook-names", help="Comma-separated hooks, e.g. blocks.8.hook_resid_post,blocks.4.hook_resid_post.")
@click.option("--dataset-path", help="HF dataset name, local .txt/.jsonl/.parquet file or folder, or 'shakespeare'.")
@click.option("--n-tokens", type=int, help="Tokens to harvest.")
@click.option("--context-size", type=int, help="Tokens per sequence.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), help="Storage dtype.")
@click.option("--device", help="torch device for the model, e.g. cpu or cuda.")
@click.option("--output-path", help="Cache folder to write (resumed if it holds the same harvest).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different harvest at output-path.")
def command(config_path, sets, **flags):
    """Run the model once over the dataset and store activations of every hook in a Zarr cache."""
    run(load_config(HarvestConfig, "harvest", config_path, {**flags, **parse_sets(sets)}))
