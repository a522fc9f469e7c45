"""``sae-pipeline harvest``: stage 1, model activations → Zarr cache."""

from __future__ import annotations

import json

import click

from pipeline.config import HarvestConfig
from pipeline.harvest import HarvestResult, describe, harvest
from stages.common import config_options, field_option, load_config, parse_sets


def run(cfg: HarvestConfig, *, scheduler: str | None = None, torch_threads: int | None = None) -> HarvestResult:
    """Harvest (or resume; on a Dask cluster with ``scheduler``) and print a one-line summary plus
    the figures as JSON."""
    result = harvest(cfg, scheduler=scheduler, torch_threads=torch_threads)
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
@_opt("compression", "Activation codec: lz4 (fast reads), zstd (7% smaller float16), none.",
      type=click.Choice(["lz4", "zstd", "none"]))
@_opt("device", "torch device for the model, e.g. cpu or cuda.")
@_opt("output_path", "Cache folder (resumed if it holds the same, unfinished harvest).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a different cache at output-path.")
@click.option("--break-lock", is_flag=True, default=None,
              help="Take over output-path from a harvest on another machine that no longer runs.")
@click.option("--scheduler", default=None, metavar="ADDRESS|local",
              help="Split the chunks into shard ranges harvested by the workers of this Dask scheduler (e.g. "
                   "tcp://host:8786), or of a LocalCluster with 'local'; workers must see output-path and the "
                   "model at the same paths. The cache is the same as without it.")
@click.option("--torch-threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads per worker task. [default: this machine's, so the activations equal a "
                   "local run's bit for bit]")
def command(config_path, sets, scheduler, torch_threads, **flags):
    """Run the model once over the dataset and store activations of every hook in a Zarr cache.

    Re-running an interrupted harvest with the same arguments resumes it (also after a full disk
    has been given space).
    """
    run(load_config(HarvestConfig, "harvest", config_path, {**flags, **parse_sets(sets)}), scheduler=scheduler,
        torch_threads=torch_threads)
