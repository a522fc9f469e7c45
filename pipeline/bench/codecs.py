"""Cache codec and chunk shape candidates, and the shuffled loader's throughput, on real activations.

For each candidate ``(compression, chunk_tokens, chunks_per_shard)`` the source cache's activations
and token ids are rewritten with :class:`pipeline.cache.CacheWriter` (so the files are exactly what
a harvest with those settings writes), then measured:

* ``bytes_per_token``: the whole folder on disk (activations, token ids, checksums, metadata)
  over the token count; ``compression_ratio``: raw activation bytes over stored activation bytes;
* ``encode_tokens_per_second``: writing every chunk (compress, checksum, file writes);
* ``decode_tokens_per_second``: :meth:`ActivationCache.read_chunk` (zarr read + decompress +
  checksum) over the training chunks in order, one thread;
* the row's value: tokens/s of :class:`pipeline.loader.ActivationLoader` alone (its defaults:
  2 reading threads, 262,144-row shuffle buffer, special tokens dropped, float32 batches of
  ``batch_size``) once it serves batches (after its first), median of ``repeats`` runs of
  ``n_batches`` after a warm-up run; beside it ``first_batch_seconds`` (filling the shuffle buffer
  before the first batch) and ``loader_tokens_per_second_with_fill`` (the whole run).
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.bench.measure import Row, median_rate
from pipeline.cache import ActivationCache, CacheWriter, chunk_tokens_for
from pipeline.loader import ActivationLoader

# (compression, chunk_tokens, chunks_per_shard); the first is the harvest default.
CANDIDATES: tuple[tuple[str, int, int], ...] = (
    ("lz4", 4096, 8), ("zstd", 4096, 8), ("none", 4096, 8),
    ("lz4", 16384, 1), ("zstd", 16384, 1), ("lz4", 4096, 1),
)


def rewrite_cache(source: ActivationCache, dest: Path, compression: str, chunk_tokens: int,
                  chunks_per_shard: int) -> tuple[ActivationCache, float]:
    """Copy ``source`` (all hooks, same rows, tokens, statistics and holdout tokens) to ``dest``
    with other storage settings. Returns ``(the new cache, seconds spent writing chunks)``."""
    lay = source.layout
    chunk_tokens = chunk_tokens_for(lay.context_size, chunk_tokens)
    holdout_rows = len(source.holdout_chunks) * lay.chunk_tokens
    attrs = source.attrs
    identity = {k: attrs[k] for k in ("model_name",) if k in attrs}
    tokens = np.asarray(source.group["tokens"][:])
    if dest.exists():
        shutil.rmtree(dest)
    writer = CacheWriter.create_or_resume(
        dest, metadata={**identity, "special_token_ids": source.special_token_ids},
        d_in={h: source.d_in_of(h) for h in source.hook_names}, tokens=tokens, dtype=source.dtype,
        chunk_tokens=chunk_tokens, chunks_per_shard=chunks_per_shard,
        n_holdout_chunks=-(-holdout_rows // chunk_tokens), compression=compression)
    arrays = {h: source.array(h)[:] for h in source.hook_names}
    t0 = time.perf_counter()
    for i in range(writer.layout.n_chunks):
        start, stop = writer.layout.chunk_rows(i)
        writer.write_chunk(i, {h: a[start:stop] for h, a in arrays.items()})
    seconds = time.perf_counter() - t0
    return writer.finalize({h: source.statistics(h) for h in source.hook_names}), seconds


def folder_bytes(path: Path, sub: str | None = None) -> int:
    """Bytes of the files under ``path`` (or its subfolder ``sub``)."""
    root = path / sub if sub else path
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def measure_cache(cache: ActivationCache, *, batch_size: int, n_batches: int, repeats: int) -> dict:
    """Decode-only and loader tokens/s of one cache (see the module docstring)."""
    hook = cache.hook_names[0]

    def decode() -> int:
        return sum(cache.read_chunk(hook, c, verify=True).shape[0] for c in cache.train_chunks)

    decode_rate, _ = median_rate(decode, repeats=repeats, warmup=1)
    runs = [_load(cache, hook, batch_size, n_batches) for _ in range(repeats + 1)][1:]  # the first warms up
    return {"decode": decode_rate, "loader": statistics.median(r["steady"] for r in runs),
            "samples": [r["steady"] for r in runs],
            "first_batch_seconds": statistics.median(r["first_batch_seconds"] for r in runs),
            "with_fill": statistics.median(r["with_fill"] for r in runs)}


def _load(cache: ActivationCache, hook: str, batch_size: int, n_batches: int) -> dict:
    """One run of the loader: tokens/s after its first batch (steady state), seconds to that first
    batch (reading enough chunks to fill the shuffle buffer) and tokens/s over the whole run."""
    loader = ActivationLoader(cache, hook, batch_size=batch_size, exclude_token_ids=cache.special_token_ids)
    t0 = time.perf_counter()
    rows = 0
    for i, b in enumerate(loader.batches(n_batches)):
        if i == 0:
            t_first = time.perf_counter()
        else:
            rows += b.shape[0]
    t_end = time.perf_counter()
    return {"steady": rows / (t_end - t_first), "first_batch_seconds": t_first - t0,
            "with_fill": (rows + batch_size) / (t_end - t0)}


def codec_rows(source_path: str | Path, workdir: Path, *, candidates: Iterable[tuple[str, int, int]] = CANDIDATES,
               batch_size: int = 4096, n_batches: int = 100, repeats: int = 3) -> list[Row]:
    """One row per candidate (case ``"codecs"``), each referencing the harvest default (the first)."""
    source = ActivationCache.open(source_path)
    candidates = list(candidates)
    default = _name(*candidates[0])
    rows = []
    for compression, chunk_tokens, per_shard in candidates:
        dest = Path(workdir) / f"cache_{compression}_{chunk_tokens}x{per_shard}"
        cache, write_s = rewrite_cache(source, dest, compression, chunk_tokens, per_shard)
        hook = cache.hook_names[0]
        n_tokens = cache.layout.n_tokens
        raw = n_tokens * cache.d_in_of(hook) * np.dtype(cache.array(hook).dtype).itemsize
        m = measure_cache(cache, batch_size=batch_size, n_batches=n_batches, repeats=repeats)
        quality = {"bytes_per_token": folder_bytes(dest) / n_tokens,
                   "compression_ratio": raw / folder_bytes(dest, hook),
                   "encode_tokens_per_second": n_tokens / write_s,
                   "decode_tokens_per_second": m["decode"],
                   "first_batch_seconds": m["first_batch_seconds"],
                   "loader_tokens_per_second_with_fill": m["with_fill"]}
        config = {"compression": compression, "chunk_tokens": cache.layout.chunk_tokens,
                  "chunks_per_shard": per_shard, "dtype": cache.dtype, "batch_size": batch_size,
                  "n_batches": n_batches, "source": str(source_path), "n_tokens": n_tokens}
        rows.append(Row("codecs", _name(compression, chunk_tokens, per_shard), m["loader"], "tokens/s",
                        m["samples"], quality, config, reference=default))
        shutil.rmtree(dest)
    return rows


def _name(compression: str, chunk_tokens: int, per_shard: int) -> str:
    return f"{compression}, chunk {chunk_tokens}, {per_shard}/shard"
