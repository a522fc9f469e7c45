"""``sae-pipeline train``: stage 2, train one SAE from a cache."""

from __future__ import annotations

import json

import click

from pipeline.config import TrainConfig
from pipeline.training import TrainResult, train
from stages.common import config_options, load_config, parse_sets


def run(cfg: TrainConfig) -> TrainResult:
    """Train, save in SAELens layout, print where it went and the last logged metrics."""
    result = train(cfg)
    last = result.state.history[-1] if result.state.history else {}
    click.echo(f"saved {cfg.architecture} SAE (d_sae {cfg.d_sae}) to {result.output_path}")
    click.echo(json.dumps({"tokens_per_second": round(result.tokens_per_second, 1),
                           **{k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}))
    return result


@click.command("train")
@config_options
@click.option("--cache-path", help="Harvest folder to train from.")
@click.option("--hook-name", help="Cached hook to train on (default: the cache's only hook).")
@click.option("--architecture", type=click.Choice(["standard", "topk"]))
@click.option("--d-sae", type=int)
@click.option("--k", type=int, help="Active latents per token (topk).")
@click.option("--l1-coefficient", type=float, help="Sparsity penalty (standard).")
@click.option("--lr", type=float)
@click.option("--training-tokens", type=int)
@click.option("--train-batch-size-tokens", type=int)
@click.option("--device")
@click.option("--seed", type=int)
@click.option("--output-path", help="Folder for the SAE (cfg.json, sae_weights.safetensors, ...).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an existing SAE folder.")
def command(config_path, sets, **flags):
    """Train an SAE from a Zarr activation cache with a shuffled, prefetching loader."""
    run(load_config(TrainConfig, "train", config_path, {**flags, **parse_sets(sets)}))
