"""The end-to-end anchor run of issue 2: harvest → train → evaluate on the ANCHORS.md setup.

    python -m pipeline.bench.anchor [--config configs/anchor_wikitext.yaml] [--out bench.json]

Prints harvest tokens/s, stored bytes/token, training tokens/s and the held-out explained variance,
L0, CE loss recovered and dead fraction, beside SAELens 6.54.12's figures for the same setup as
recorded in ../shared/ANCHORS.md (a 2-core machine like CI's; compare ratios, machines are noisy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from pipeline.config import EvalConfig, HarvestConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.harvest import harvest
from pipeline.training import train

# ../shared/ANCHORS.md, "End-to-end with SAELens" (SAELens 6.54.12, 2 cores, torch 2.13 CPU).
SAELENS_REFERENCE = {
    "harvest_tokens_per_second": 2100.0,
    "bytes_per_token": 2312.0,
    "train_tokens_per_second": 3100.0,
    "explained_variance": 0.812,
    "l0": 32.0,
    "ce_loss_recovered": 0.881,
}


def batch_mixing(cache, batch_size: int, shuffle_buffer_tokens: int, n_batches: int = 20) -> dict:
    """Distinct sequences per batch from our loader vs a uniform shuffle of the same training rows.

    Runs the loader over a float32 cache of the same geometry (rows, context size, chunks,
    holdout) whose rows hold their own row index, so each batch's sequences can be counted.
    The uniform expectation for ``B`` draws over ``S`` sequences is ``S · (1 - (1 - 1/S)^B)``.
    """
    import tempfile

    import numpy as np
    import torch

    from pipeline.cache import CacheWriter, to_storage
    from pipeline.loader import ActivationLoader

    lay = cache.layout
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter.create_or_resume(
            tmp, metadata={"model_name": "ids"}, d_in={"ids": 1},
            tokens=np.zeros((lay.n_seqs, lay.context_size), np.int32), dtype="float32",
            chunk_tokens=lay.chunk_tokens, chunks_per_shard=lay.chunks_per_shard,
            n_holdout_chunks=len(cache.holdout_chunks))
        for i in range(lay.n_chunks):
            start, stop = lay.chunk_rows(i)
            writer.write_chunk(i, {"ids": to_storage(torch.arange(start, stop, dtype=torch.float32)[:, None], "float32", "ids")})
        ids = writer.finalize({"ids": {"mean": [0.0], "mean_norm": 1.0}})
        loader = ActivationLoader(ids, "ids", batch_size=batch_size, shuffle_buffer_tokens=shuffle_buffer_tokens)
        distinct = [len(np.unique(b[:, 0].long().numpy() // lay.context_size)) for b in loader.batches(n_batches)]
    n_train_seqs = len(ids.train_chunks) * lay.chunk_tokens // lay.context_size
    uniform = n_train_seqs * (1 - (1 - 1 / n_train_seqs) ** batch_size)
    return {"distinct_sequences_per_batch": float(np.mean(distinct)), "uniform_shuffle_expectation": uniform}


def loader_throughput(cache, batch_size: int, shuffle_buffer_tokens: int, n_batches: int = 100) -> dict:
    """Tokens/s of the shuffled loader alone, and of decompressing the training chunks in order."""
    from pipeline.loader import ActivationLoader

    hook = cache.hook_names[0]
    t0 = time.perf_counter()
    rows = sum(cache.read_chunk(hook, c, verify=True).shape[0] for c in cache.train_chunks)
    decompress = rows / (time.perf_counter() - t0)
    loader = ActivationLoader(cache, hook, batch_size=batch_size, shuffle_buffer_tokens=shuffle_buffer_tokens,
                              exclude_token_ids=cache.special_token_ids)
    t0 = time.perf_counter()
    served = sum(b.shape[0] for b in loader.batches(n_batches))
    return {"loader_tokens_per_second": served / (time.perf_counter() - t0),
            "decompress_tokens_per_second": decompress}


def _section(path: str, name: str) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text())[name]


@click.command()
@click.option("--config", "config_path", default="configs/anchor_wikitext.yaml", show_default=True)
@click.option("--out", default=None, help="Also write the figures as JSON here.")
def main(config_path: str, out: str | None) -> None:
    h_cfg = HarvestConfig.from_dict({**_section(config_path, "harvest"), "overwrite": True})
    t_cfg = TrainConfig.from_dict({**_section(config_path, "train"), "overwrite": True})
    e_cfg = EvalConfig.from_dict(_section(config_path, "evaluate"))
    t0 = time.perf_counter()
    h = harvest(h_cfg)
    t = train(t_cfg)
    m = evaluate(e_cfg)
    ours = {
        "harvest_tokens_per_second": h.tokens_per_second,
        "bytes_per_token": h.bytes_per_token,
        "train_tokens_per_second": t.tokens_per_second,
        **{k: m[k] for k in ("explained_variance", "l0", "ce_loss_recovered", "dead_fraction",
                             "ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation") if k in m},
        "wall_seconds": time.perf_counter() - t0,
        **batch_mixing(h.cache, t_cfg.train_batch_size_tokens, t_cfg.shuffle_buffer_tokens),
        **loader_throughput(h.cache, t_cfg.train_batch_size_tokens, t_cfg.shuffle_buffer_tokens),
    }
    click.echo(f"{'figure':<28}{'sae-pipeline':>14}{'SAELens (ANCHORS.md)':>24}")
    for key, value in ours.items():
        ref = SAELENS_REFERENCE.get(key)
        click.echo(f"{key:<28}{value:>14.4g}{'' if ref is None else f'{ref:>24.4g}'}")
    if out:
        Path(out).write_text(json.dumps({"sae_pipeline": ours, "saelens_reference": SAELENS_REFERENCE}, indent=2))


if __name__ == "__main__":
    main()
