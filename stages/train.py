"""``sae-pipeline train``: stage 2, train one SAE from a cache."""

from __future__ import annotations

import json

import click

from pipeline.config import ARCHITECTURE_NAMES, TrainConfig
from pipeline.sae.registry import ALIASES
from pipeline.training import TrainResult, train
from stages.common import config_options, field_option, load_config, parse_sets


def run(cfg: TrainConfig) -> TrainResult:
    """Train, save in SAELens layout, print where it went and the last logged metrics."""
    result = train(cfg)
    last = result.state.history[-1] if result.state.history else {}
    click.echo(f"saved {cfg.architecture} SAE (d_sae {cfg.d_sae}) to {result.output_path}")
    click.echo(json.dumps({"tokens_per_second": round(result.tokens_per_second, 1),
                           **{k: round(v, 4) for k, v in last.items() if isinstance(v, float)}}))
    return result


def _opt(name: str, help: str = "", **kwargs):
    return field_option(TrainConfig, name, help, **kwargs)


@click.command("train")
@config_options
@_opt("cache_path", "Harvest folder (or fsspec URL, e.g. s3://bucket/harvest) to train from.")
@_opt("hook_name", "Cached hook to train on (default: the cache's only hook).")
@_opt("architecture", "SAE architecture.", type=click.Choice(ARCHITECTURE_NAMES + tuple(ALIASES)))
@_opt("d_sae", "Number of latents.")
@_opt("k", "Active latents per token (topk; average over the batch for batchtopk, matryoshka).", type=float)
@_opt("l1_coefficient", "Sparsity penalty λ (standard, gated).")
@_opt("l0_coefficient", "L0 penalty λ (jumprelu).")
@_opt("lr", "Adam learning rate.")
@_opt("training_tokens", "Tokens to train on (whole batches; epochs repeat if the cache is smaller).")
@_opt("train_batch_size_tokens", "Tokens per batch.")
@_opt("device", "torch device, e.g. cpu or cuda.")
@_opt("seed", "Seed for init and data order.")
@_opt("output_path", "Folder for the SAE (cfg.json, sae_weights.safetensors, ...).")
@_opt("n_checkpoints", "Checkpoints to save during training (into <output-path>/checkpoints).")
@click.option("--resume", "resume_from_checkpoint", flag_value="latest", default=None,
              help="Continue the run at output-path from its latest checkpoint (same config).")
@click.option("--log-to-wandb", "log_to_wandb", is_flag=True, default=None,
              help="Also log to Weights & Biases (offline when there is no network).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace an SAE (or unfinished run) at output-path.")
def command(config_path, sets, **flags):
    """Train an SAE from a Zarr activation cache with a shuffled, prefetching loader.

    Every other field (l1_warm_up_steps, lr_warm_up_steps, lr_decay_steps, dead_feature_window,
    use_ghost_grads, resample_dead_latents, matryoshka_widths, jumprelu_*, ...) is set with
    --set field=value or a --config file; names and meanings follow SAELens.
    """
    run(load_config(TrainConfig, "train", config_path, {**flags, **parse_sets(sets)}))
