"""``sae-pipeline harvest``: stage 1, model activations → Zarr cache."""

from __future__ import annotations

import json

import click

from pipeline.config import HarvestConfig
from pipeline.harvest import HarvestResult, describe, harvest
from stages.common import config_options, field_option, load_config, parse_sets


def run(cfg: HarvestConfig) -> HarvestResult:
    """Harvest (or resume) and print a one-line summary plus the figures as JSON."""
    result = harvest(cfg)
    click.echo(result.cache.summary())
    click.echo(json.dumps(describe(result)))
    return result


def _opt(name: str, help: str = "", **kwargs):
    return field_option(HarvestConfig, name, help, **kwargs)


@click.command("harvest")
@config_options
@_opt("model_name", "TransformerLens name, HF name or folder, .gguf file, or smollm2-135m.")
@_opt("hook_names", "Comma-separated hooks, e.g. blocks.8.hook_resid_post,blocks.4.hook_resid_post.")
@_opt("dataset_path", "HF dataset name, local .txt/.jsonl/.parquet file or folder, or 'shakespeare'.")
@_opt("text_column", "Text field of .jsonl/.parquet/HF datasets.")
@_opt("n_tokens", "Tokens to harvest (fewer if the dataset is shorter).")
@_opt("holdout_tokens", "Tokens kept out of training for evaluation (default: min(16384, n_tokens/10)).")
@_opt("context_size", "Tokens per sequence.")
@_opt("prepend_bos", "Start every sequence with BOS (true/false).")
@_opt("dtype", "Storage dtype.", type=click.Choice(["float16", "bfloat16", "float32"]))
@_opt("device", "torch device for the model, e.g. cpu or cuda.")
@_opt("output_path", "Cache folder (resumed if it holds the same, unfinished harvest).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different cache at output-path.")
@click.option("--break-lock", is_flag=True, default=None,
              help="Take over output-path from a harvest on another machine that no longer runs.")
def command(config_path, sets, **flags):
    """Run the model once over the dataset and store activations of every hook in a Zarr cache.

    Re-running an interrupted harvest with the same arguments resumes it.
    """
    run(load_config(HarvestConfig, "harvest", config_path, {**flags, **parse_sets(sets)}))
