"""Peak memory of training and of harvesting, against the size of the data.

    python -m pipeline.bench.memory [--quick] [--source-cache data/harvests/anchor_wikitext]
        [--workdir data/bench/memory] [--train-steps 30] [--out rows.json]

Each figure is the peak resident set (``ru_maxrss``, MiB) of a fresh process that does only that
one job (a ``spawn`` child: nothing of the parent or of a previous job counts), so the figures of
different sizes are comparable. Memory is not a noisy rate, so each is measured once.

* case ``"memory_train"``: a TopK SAE (``pipeline.training.train``, same settings and the same
  number of steps for every size) trained from caches of ``sizes`` tokens. The goal (issues 6 and
  7): peak memory does not grow with the cache (under 10% from 200K to 2M tokens), since the loader
  holds a bounded shuffle buffer and reads chunk by chunk.
* case ``"memory_harvest"``: ``pipeline.harvest.harvest`` of ``harvest_tokens`` tokens. The goal:
  it is bounded by the model and its one-chunk write buffer, not by the dataset.

The larger size of each case references the smaller, so ``ratio`` is the growth. ``quality`` holds
the child's resident set before the job (imports only) and its tokens/s.

The training caches are built by tiling a real cache (SmolLM2-135M activations of 200K WikiText-2
tokens, ``data/harvests/anchor_wikitext``): chunk ``i`` of the tiled cache is full chunk
``i mod n`` of the source, with its token rows, and the source's statistics. Peak memory depends on
the cache's size and geometry (rows, width, dtype, chunking, compression), never on its values,
so tiling measures what a real 2M-token harvest would cost without ~17 minutes of model forward.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from pipeline.bench.harvest_speed import DEFAULT_DATASET, folder_bytes, print_rows
from pipeline.bench.measure import Row, add_ratios, peak_rss_mib
from pipeline.cache import ActivationCache, CacheWriter
from pipeline.config import HarvestConfig, TrainConfig
from pipeline.errors import CacheError

QUICK = {"sizes": (8_192, 32_768), "train_steps": 3, "harvest_tokens": (256, 1_024)}
# What the tiled cache keeps of its source's attributes (the rest is its own layout and progress).
SOURCE_METADATA = ("model_name", "model_source", "weights_fingerprint", "model_dtype", "prepend_bos",
                   "separator", "dataset_path", "dataset_name", "dataset_split", "dataset_fingerprint",
                   "tokenizer", "special_token_ids")


def memory_rows(*, source_cache: Path, workdir: Path, sizes: tuple[int, ...] = (200_000, 2_000_000),
                train_steps: int = 30, d_sae: int = 4608, k: int = 32,
                harvest_tokens: tuple[int, ...] = (8_192, 32_768), model_name: str = "smollm2-135m",
                dataset_path: str | Path = DEFAULT_DATASET) -> list[Row]:
    """Rows of cases ``memory_train`` and ``memory_harvest`` (see the module docstring).

    Tiled caches are kept in ``workdir/caches`` and reused when complete; SAEs and harvests go
    under ``workdir`` too.
    """
    workdir = Path(workdir)
    source = ActivationCache.open(source_cache)
    rows = []
    for size in sizes:
        cache = build_tiled_cache(source, size, workdir / "caches" / f"{size}")
        cfg = TrainConfig(cache_path=str(cache.path), architecture="topk", k=k, d_sae=d_sae,
                          train_batch_size_tokens=4096, training_tokens=train_steps * 4096,
                          output_path=str(workdir / "saes" / f"{size}"), overwrite=True)
        peak = in_fresh_process(_train_child, cfg.to_dict())
        config = {**cfg.to_dict(), "cache_n_tokens": cache.layout.n_tokens, "cache_n_chunks": cache.layout.n_chunks,
                  "cache_bytes": folder_bytes(cache.path), "train_steps": train_steps}
        rows.append(_row("memory_train", size, peak, config, rows))
    for size in harvest_tokens:
        cfg = HarvestConfig(model_name=model_name, dataset_path=str(dataset_path), n_tokens=size,
                            output_path=str(workdir / "harvests" / f"{size}"), overwrite=True)
        rows.append(_row("memory_harvest", size, in_fresh_process(_harvest_child, cfg.to_dict()),
                         cfg.to_dict(), rows))
    return add_ratios(rows)


def _row(case: str, size: int, peak: dict[str, float], config: dict[str, Any], earlier: list[Row]) -> Row:
    first = next((r for r in earlier if r.case == case), None)  # the smallest size: growth is the ratio
    return Row(case, f"{size} tokens", peak.pop("peak_rss_mib"), "MiB", quality=peak, config=config,
               reference=first.variant if first else None)


def build_tiled_cache(source: ActivationCache, n_tokens: int, out: Path) -> ActivationCache:
    """A cache of ``n_tokens`` (rounded down to whole sequences) whose chunk ``i`` is full chunk
    ``i mod n_full`` of ``source`` (activations and token rows; the last chunk possibly cut short),
    with ``source``'s chunking, dtype, holdout chunk count and statistics, and the default
    compression a harvest writes now. Reused if ``out`` already holds the complete same build (a
    2M-token tiled cache of SmolLM2 activations is about 2.3 GB).

    Raises:
        CacheError: ``source`` has no full chunk, or more than one hook (tile one hook at a time).
    """
    if len(source.hook_names) != 1:
        raise CacheError(f"{source.path} holds {len(source.hook_names)} hooks; tile a cache of one hook.")
    hook, lay = source.hook_names[0], source.layout
    n_full = lay.n_tokens // lay.chunk_tokens
    if n_full == 0:
        raise CacheError(f"{source.path} has no full chunk of {lay.chunk_tokens} rows to tile.")
    seqs_per_chunk = lay.chunk_tokens // lay.context_size
    n_seqs = n_tokens // lay.context_size
    source_seq = (np.arange(n_seqs) // seqs_per_chunk % n_full) * seqs_per_chunk + np.arange(n_seqs) % seqs_per_chunk
    tokens = np.asarray(source.tokens[:])[source_seq]
    tiled_from = {"path": str(source.path), "tokens_sha256": source.attrs["tokens_sha256"],
                  "n_full_chunks": n_full}
    try:
        done = ActivationCache.open(out)
        if done.attrs.get("tiled_from") == tiled_from and done.layout.n_seqs == n_seqs:
            return done
    except CacheError:
        pass
    metadata = {key: source.attrs[key] for key in SOURCE_METADATA if key in source.attrs}
    writer = CacheWriter.create_or_resume(
        out, metadata={**metadata, "tiled_from": tiled_from}, d_in={hook: source.d_in}, tokens=tokens,
        dtype=source.dtype, chunk_tokens=lay.chunk_tokens, chunks_per_shard=lay.chunks_per_shard,
        n_holdout_chunks=min(len(source.holdout_chunks), -(-n_seqs // seqs_per_chunk) - 1), overwrite=True)
    for i in range(writer.layout.n_chunks):
        start, stop = writer.layout.chunk_rows(i)
        src_start = (i % n_full) * lay.chunk_tokens
        # raw stored values (bfloat16 stays uint16 bits): a copy, not a conversion
        writer.write_chunk(i, {hook: np.asarray(source.array(hook)[src_start : src_start + stop - start])})
    return writer.finalize({hook: source.statistics(hook)})


def in_fresh_process(job: Callable[[dict[str, Any]], dict[str, float]], config: dict[str, Any]) -> dict[str, float]:
    """Run ``job(config)`` in a new ``spawn`` process and return what it reports."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(job, config).result()


def _train_child(config: dict[str, Any]) -> dict[str, float]:
    from pipeline.training import train

    before = _rss_mib()
    result = train(TrainConfig.from_dict(config), progress=False)
    last = result.state.history[-1] if result.state.history else {}
    return {"peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
            "tokens_per_second": result.tokens_per_second,
            **{f"train_{k}": float(last[k]) for k in ("explained_variance", "l0") if k in last}}


def _harvest_child(config: dict[str, Any]) -> dict[str, float]:
    from pipeline.harvest import harvest

    before = _rss_mib()
    result = harvest(HarvestConfig.from_dict(config))
    return {"peak_rss_mib": peak_rss_mib(), "rss_before_mib": before, "tokens_per_second": result.tokens_per_second}


def _rss_mib() -> float:
    """Resident set now (MiB), from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@click.command()
@click.option("--quick", is_flag=True, help=f"Tiny run (sizes {QUICK}) to check the case works.")
@click.option("--source-cache", default="data/harvests/anchor_wikitext", show_default=True,
              type=click.Path(exists=True, file_okay=False))
@click.option("--workdir", default="data/bench/memory", show_default=True)
@click.option("--train-steps", default=30, show_default=True, type=int)
@click.option("--out", default=None, help="Also write the rows as JSON here.")
def main(quick: bool, source_cache: str, workdir: str, train_steps: int, out: str | None) -> None:
    sizes = QUICK if quick else {"train_steps": train_steps}
    rows = memory_rows(source_cache=Path(source_cache), workdir=Path(workdir), **sizes)
    print_rows(rows)
    if out:
        Path(out).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
