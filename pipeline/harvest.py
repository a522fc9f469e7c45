"""Stage 1 in the library: run a model over token sequences once and fill the activation cache.

All hooks are captured in one forward pass that stops after the last hooked block. Token
sequences are fixed before any forward pass (they are small next to the activations) so the
harvest is deterministic and a resumed harvest continues at the exact chunk where it stopped.
With a Dask scheduler the chunks still to do are split into ranges of whole shard files, each
computed and stored by a worker (:func:`harvest_range`), while this process holds the writer
lock, records what returns and finalizes: the cache is identical to a single-process harvest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import __version__, allocator, models, text
from pipeline.cache import (TORCH_DTYPES, ActivationCache, CacheLayout, CacheWriter, check_output_folder,
                            chunk_tokens_for, compute_statistics, is_cache_folder, to_storage, writer_lock)
from pipeline.config import HarvestConfig
from pipeline.errors import CacheError, ConfigError, DatasetError

@dataclass
class HarvestResult:
    cache: ActivationCache
    tokens_per_second: float  # forward + write throughput of this run (0 when nothing was left to do)
    bytes_per_token: float  # stored bytes on disk / n_tokens, all hooks together
    n_tokens_harvested: int  # tokens harvested by this run (less than the total on a resume)


def tokenize_dataset(cfg: HarvestConfig, tokenizer) -> np.ndarray:
    """The harvest's token ids ``[n_seqs, context_size]`` int32, ``n_seqs = n_tokens // context_size``.

    Raises:
        DatasetError: the dataset yields fewer tokens than one sequence.
    """
    max_seqs = cfg.n_tokens // cfg.context_size
    docs = text.iter_documents(cfg.dataset_path, text_column=cfg.text_column, split=cfg.dataset_split,
                               name=cfg.dataset_name)
    rows = list(text.tokenize_to_sequences(docs, tokenizer, cfg.context_size, prepend_bos=cfg.prepend_bos,
                                           separator=cfg.separator, max_sequences=max_seqs))
    if not rows:
        raise DatasetError(
            f"dataset {cfg.dataset_path!r} yielded no full sequence of context_size {cfg.context_size}; "
            "use a longer dataset or a smaller context_size."
        )
    if len(rows) < max_seqs:
        print(f"note: dataset holds {len(rows) * cfg.context_size:,} tokens, fewer than n_tokens "
              f"{cfg.n_tokens:,}; harvesting all of it.")
    return np.stack(rows).astype(np.int32)


def harvest(cfg: HarvestConfig, model=None, *, scheduler: str | None = None,
            torch_threads: int | None = None) -> HarvestResult:
    """Run stage 1: tokenize, run the model, write (or resume) the cache at ``cfg.output_path``.

    Only one harvest writes a cache at a time (see :func:`pipeline.cache.writer_lock`).

    Args:
        model: the loaded model (else loaded from ``cfg.model_name``); with ``scheduler`` it
            only supplies the metadata, as every worker loads its own copy by name.
        scheduler: split the chunks still to harvest into shard-aligned ranges computed by the
            workers of this Dask scheduler (``tcp://host:8786``), or of a ``LocalCluster`` with
            ``"local"`` (:func:`pipeline.distributed.harvest_on_cluster`); the cache is the same
            as without it. None runs every forward pass here.
        torch_threads: torch CPU threads per worker task (default: this process's).

    Raises:
        ModelError, HookNameError, DatasetError, ConfigError, CacheError: bad input, before any
            activation is written; CacheError on float16 overflow (names hook and max value), or
            when another harvest is writing the same output path.
        CacheWriteError: the disk is full or the output is not writable; what was written before
            is kept, and re-running the same command after fixing it resumes.
    """
    allocator.bound_heap()  # before the model and zarr's threads take their heaps
    with writer_lock(cfg.output_path, break_lock=cfg.break_lock):
        return _harvest_locked(cfg, model, scheduler, torch_threads)


def _harvest_locked(cfg: HarvestConfig, model, scheduler: str | None, torch_threads: int | None) -> HarvestResult:
    check_output_folder(Path(cfg.output_path), cfg.overwrite)
    finished = _finished_identical(cfg)
    if finished is not None:
        print(f"{cfg.output_path!r} already holds this harvest, complete; reusing it "
              "(`sae-pipeline harvest --overwrite` redoes it).")
        return HarvestResult(finished, 0.0, _disk_bytes(finished.path) / finished.layout.n_tokens, 0)
    source = models.resolve_model(cfg.model_name)
    model = model if model is not None else models.load_model(cfg.model_name, device=cfg.device,
                                                             dtype=TORCH_DTYPES[cfg.model_dtype])
    models.validate_hook_names(model, cfg.hook_names)
    if cfg.context_size > model.cfg.n_ctx:
        raise ConfigError(
            f"context_size {cfg.context_size} exceeds the model's context length n_ctx {model.cfg.n_ctx}; "
            "lower context_size."
        )
    tokens = tokenize_dataset(cfg, model.tokenizer)
    chunk_tokens, n_holdout = _chunk_plan(cfg, tokens.shape[0])
    d_in = {hook: models.d_in_of(model, hook) for hook in cfg.hook_names}
    special = models.special_token_ids(model.tokenizer)
    metadata = _metadata(cfg, source, model, special)
    writer = CacheWriter.create_or_resume(
        cfg.output_path, metadata=metadata, d_in=d_in, tokens=tokens, dtype=cfg.dtype,
        chunk_tokens=chunk_tokens, chunks_per_shard=cfg.chunks_per_shard, n_holdout_chunks=n_holdout,
        compression=cfg.compression, compression_level=cfg.compression_level, overwrite=cfg.overwrite,
    )
    return _fill(model, tokens, writer, cfg, special, scheduler, torch_threads)


def _fill(model, tokens: np.ndarray, writer: CacheWriter, cfg: HarvestConfig, special: list[int],
          scheduler: str | None, torch_threads: int | None) -> HarvestResult:
    """Run the forward passes the cache still lacks, then record statistics and mark it complete."""
    layout = writer.layout
    start_chunk = writer.n_chunks_written
    if start_chunk:
        print(f"resuming harvest at chunk {start_chunk}/{layout.n_chunks} ({str(cfg.output_path)!r})")
    t0 = time.perf_counter()
    if scheduler is not None and start_chunk < layout.n_chunks:
        from pipeline.distributed import harvest_on_cluster  # dask is needed only here

        harvest_on_cluster(cfg, writer, scheduler, torch_threads=torch_threads)
    else:
        for i, blocks in forward_chunks(model, tokens, layout, cfg, range(start_chunk, layout.n_chunks)):
            writer.write_chunk(i, blocks)
    elapsed = time.perf_counter() - t0
    n_new = tokens.size - min(tokens.size, start_chunk * writer.layout.chunk_tokens)
    if writer.cache.complete:
        cache = ActivationCache.open(cfg.output_path)
    else:
        stats = {h: compute_statistics(writer.cache, h, exclude_token_ids=special) for h in cfg.hook_names}
        cache = writer.finalize(stats, {"sae_pipeline_version": __version__, "torch_version": torch.__version__})
    return HarvestResult(cache, n_new / elapsed if n_new and elapsed > 0 else 0.0,
                         _disk_bytes(Path(cfg.output_path)) / tokens.size, n_new)


def _chunk_plan(cfg: HarvestConfig, n_seqs: int) -> tuple[int, int]:
    """``(chunk_tokens, n_holdout_chunks)``: whole-sequence chunks and the chunks held out.

    A small harvest gets smaller chunks, so its holdout is a whole chunk and not the whole cache.

    Raises:
        ConfigError: a holdout is asked for but the dataset gave a single sequence.
    """
    holdout = cfg.resolved_holdout_tokens
    chunk_tokens = chunk_tokens_for(cfg.context_size, min(cfg.chunk_tokens, holdout or cfg.chunk_tokens))
    n_chunks = -(-n_seqs * cfg.context_size // chunk_tokens)
    n_holdout = min(n_chunks - 1, -(-holdout // chunk_tokens)) if holdout else 0
    if holdout and n_holdout == 0:
        raise ConfigError(
            f"a holdout of {holdout} tokens needs at least two sequences of context_size {cfg.context_size}, "
            f"but the dataset gave {n_seqs}; use more text, or set holdout_tokens: 0."
        )
    return chunk_tokens, n_holdout


def _metadata(cfg: HarvestConfig, source: models.ModelSource, model, special: list[int]) -> dict[str, Any]:
    """Everything that identifies the harvest, recorded in (and compared against) the cache."""
    return {
        "harvest_config": _identity_config(cfg),
        "model_name": models.model_display_name(source),
        "model_source": {"kind": source.kind, "name": source.name},
        "weights_fingerprint": models.model_fingerprint(model),
        "model_dtype": cfg.model_dtype,
        "prepend_bos": cfg.prepend_bos,
        "separator": cfg.separator,
        "dataset_path": cfg.dataset_path,
        "dataset_name": cfg.dataset_name,
        "dataset_split": cfg.dataset_split,
        "dataset_fingerprint": text.dataset_fingerprint(cfg.dataset_path, text_column=cfg.text_column,
                                                        split=cfg.dataset_split, name=cfg.dataset_name),
        "tokenizer": type(model.tokenizer).__name__ + ":" + str(getattr(model.tokenizer, "name_or_path", "")),
        "special_token_ids": special,
    }


def _identity_config(cfg: HarvestConfig) -> dict[str, Any]:
    """The config fields that decide a harvest's content (not where or how fast it runs)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("overwrite", "break_lock", "device", "output_path")}


def _finished_identical(cfg: HarvestConfig) -> ActivationCache | None:
    """The complete cache at ``cfg.output_path`` if it was made with this config, else None."""
    if cfg.overwrite or not is_cache_folder(Path(cfg.output_path)):
        return None
    cache = ActivationCache.open(cfg.output_path, require_complete=False)
    same = cache.attrs.get("harvest_config") == json.loads(json.dumps(_identity_config(cfg)))
    return cache if cache.complete and same else None


def forward_chunks(model, tokens: np.ndarray, layout: CacheLayout, cfg: HarvestConfig, chunks: range, *,
                   progress: bool = True) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Run ``model`` over the sequences of ``chunks`` and yield each chunk as soon as it is whole:
    ``(i, {hook: [rows of chunk i, d_in]})`` in the storage dtype (:func:`pipeline.cache.to_storage`).

    ``tokens`` is the harvest's ``[n_seqs, context_size]`` token ids. Forward batches of up to
    ``store_batch_size_prompts`` sequences start at each chunk's first sequence and never straddle
    a chunk boundary, so a chunk is computed from the same batches whichever range it belongs to
    (a resume, a worker's shard range), and so holds the same values. Memory stays flat over the
    chunks: the free pages of glibc's heap are released once each chunk has been consumed, and
    :func:`harvest` and :func:`harvest_range` bound the heap before they load anything
    (:mod:`pipeline.allocator`).

    Raises:
        CacheError: float16 overflow or NaN/Inf activations (names the hook and max value).
    """
    seqs_per_chunk = layout.chunk_tokens // layout.context_size
    stop_at = models.stop_at_layer_for(cfg.hook_names)
    first, last = chunks.start * seqs_per_chunk, min(chunks.stop * seqs_per_chunk, tokens.shape[0])
    bar = tqdm(total=tokens.size, initial=min(first * layout.context_size, tokens.size), unit="tok",
               unit_scale=True, desc="harvest", dynamic_ncols=True, disable=not progress)
    with bar, torch.no_grad():
        for i in chunks:
            buffers: dict[str, list[np.ndarray]] = {h: [] for h in cfg.hook_names}
            end = min((i + 1) * seqs_per_chunk, last)
            for s in range(i * seqs_per_chunk, end, cfg.store_batch_size_prompts):
                e = min(s + cfg.store_batch_size_prompts, end)
                batch = torch.from_numpy(tokens[s:e].astype(np.int64)).to(cfg.device)
                _, act_cache = model.run_with_cache(batch, names_filter=list(cfg.hook_names), stop_at_layer=stop_at)
                for hook in cfg.hook_names:
                    act = act_cache[hook]  # [batch, pos, ...]; e.g. hook_z's heads flatten into d_in
                    acts = act.reshape(act.shape[0] * act.shape[1], -1).cpu()
                    buffers[hook].append(to_storage(acts, cfg.dtype, hook))
                bar.update((e - s) * layout.context_size)
            yield i, {h: np.concatenate(b) for h, b in buffers.items()}
            allocator.release_free_heap()  # the chunk is written: its buffers and zarr's are free


def harvest_range(cfg: HarvestConfig, chunks: range, model, weights_fingerprint: str) -> dict[int, dict[str, int]]:
    """A worker's part of a distributed harvest: compute ``chunks`` (whole shard files, see
    :meth:`pipeline.cache.CacheLayout.shard_ranges`) of the cache the coordinator created at
    ``cfg.output_path`` and store their activations; returns ``{chunk: {hook: checksum}}`` for
    the coordinator to record (:meth:`pipeline.cache.CacheWriter.record_chunks`).

    ``weights_fingerprint`` is :func:`pipeline.models.model_fingerprint` of ``model``.

    Raises:
        CacheError: the cache records other weights than ``model``'s (a worker that resolved
            ``model_name`` to another file), or an activation overflows the storage dtype.
        CacheWriteError: the OS refused a write.
    """
    allocator.bound_heap()
    writer = CacheWriter.open_existing(cfg.output_path)
    recorded = writer.cache.attrs.get("weights_fingerprint")
    if weights_fingerprint != recorded:
        raise CacheError(
            f"this worker's {cfg.model_name!r} has weights fingerprint {weights_fingerprint}, but the cache at "
            f"{cfg.output_path!r} was started with {recorded}: every worker must load the same model file. "
            "Install the same model on every machine of the cluster, then re-run the same command."
        )
    tokens = np.asarray(writer.cache.tokens[:])
    return {i: writer.write_chunk_data(i, blocks)
            for i, blocks in forward_chunks(model, tokens, writer.layout, cfg, chunks, progress=False)}


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def describe(result: HarvestResult) -> dict[str, Any]:
    """The figures a harvest prints: tokens/s, bytes/token, token count."""
    return {
        "n_tokens": result.cache.layout.n_tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "bytes_per_token": round(result.bytes_per_token, 1),
        "path": str(result.cache.path),
    }
