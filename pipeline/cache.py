"""The Zarr v3 activation cache: create, append chunk by chunk, resume, open, verify, statistics.

Layout of one harvest (a Zarr v3 group, ``data/harvests/<name>/``)::

    <hook_name>            [n_tokens, d_in]  float16 | float32 | bfloat16 (stored as uint16 bits)
    tokens                 [n_seqs, context_size] int32, the token id of every activation row
    zarr.json attributes   model, weights fingerprint, hooks, d_in, dtype, context size, BOS policy,
                           dataset + fingerprint, token count, version, per-hook statistics,
                           progress (``n_chunks_written``) and ``complete``

Activation rows are in token order (row ``r`` is token ``r % context_size`` of sequence
``r // context_size``). Arrays are chunked along tokens (``chunk_tokens`` rows, a whole number of
sequences) and grouped into shards (``chunks_per_shard`` chunks per file) by zarr's sharding codec;
each chunk is compressed with Blosc-Zstd and byte-shuffle. Measured on SmolLM2 residual
activations in float16 (4,096 × 576 chunk): byte-shuffle + zstd-3 stores 1/1.074 of the raw bytes
and decodes at ~610 MB/s per thread; bit-shuffle (zstd-3 or lz4) does not compress them at all
(ratio 1.000: float16 mantissas are noise); zstd-9 + bit-shuffle reaches 1.034 at 5 MB/s encode. Zarr's local store writes every file to a
temporary name and renames it, so a chunk write is atomic; the group's ``n_chunks_written``
attribute is advanced only after a chunk is on disk for every hook, so a killed harvest leaves a
group that says exactly how far it got and never one marked ``complete`` that is missing data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec

from pipeline.constants import CHECKSUMS_GROUP, COMPLETE_ATTR, LOCK_SUFFIX, TOKENS_ARRAY
from pipeline.errors import CacheError

FORMAT_VERSION = 2  # 2: per-chunk checksums
_NUMPY_STORAGE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def array_key(hook_name: str) -> str:
    """Zarr array name for a hook (hook names contain dots, which zarr keys allow)."""
    return hook_name


def to_storage(acts: torch.Tensor, dtype: str, hook_name: str) -> np.ndarray:
    """Cast activations ``[n, d_in]`` to the storage dtype as a numpy array.

    Raises:
        CacheError: if a finite activation overflows the storage dtype (float16 max 65504) or the
            model produced NaN/Inf; the message names the hook, the max |value| and the fix.
    """
    stored = acts.detach().to(TORCH_DTYPES[dtype])
    if not torch.isfinite(stored).all():
        max_abs = acts.detach().float().abs().nan_to_num(posinf=float("inf")).max().item()
        why = "the model produced NaN/Inf" if not torch.isfinite(acts).all() else f"{dtype} overflows"
        raise CacheError(
            f"activations at hook {hook_name!r} cannot be stored as {dtype}: {why} "
            f"(max |activation| {max_abs:.4g}). Re-run the harvest with dtype bfloat16 or float32 "
            "(e.g. --dtype bfloat16) and --overwrite."
        )
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def from_storage(block: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of :func:`to_storage`: a numpy block ``[n, d_in]`` → torch tensor in the stored dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(block.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(block)


@dataclass(frozen=True)
class CacheLayout:
    """Geometry shared by writer and reader (all counts in tokens = activation rows)."""

    n_seqs: int
    context_size: int
    chunk_tokens: int
    chunks_per_shard: int

    @property
    def n_tokens(self) -> int:
        return self.n_seqs * self.context_size

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_tokens / self.chunk_tokens)

    def chunk_rows(self, i: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of chunk ``i``."""
        start = i * self.chunk_tokens
        return start, min(start + self.chunk_tokens, self.n_tokens)


def chunk_tokens_for(context_size: int, target_tokens: int) -> int:
    """Round the wanted chunk size to a whole number of sequences (at least one)."""
    return max(1, round(target_tokens / context_size)) * context_size


class ActivationCache:
    """Read access to a harvest. Open with :meth:`open`; arrays are read lazily, chunk by chunk."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._checksums: dict[str, np.ndarray] = {}
        self.layout = CacheLayout(
            n_seqs=self.attrs["n_seqs"],
            context_size=self.attrs["context_size"],
            chunk_tokens=self.attrs["chunk_tokens"],
            chunks_per_shard=self.attrs["chunks_per_shard"],
        )

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> "ActivationCache":
        """Open a cache folder.

        Raises:
            CacheError: the folder is missing, is not a sae-pipeline cache, or (with
                ``require_complete``) its harvest did not finish — the message says how to resume.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise CacheError(
                f"no activation cache at {str(path)!r}: run `sae-pipeline harvest` first, or pass the "
                "folder that holds the harvest's zarr.json."
            )
        try:
            group = zarr.open_group(str(path), mode="r")
        except Exception as e:  # zarr raises several types for damaged metadata
            raise CacheError(f"{str(path)!r} is not a readable Zarr group ({e}); re-harvest it.") from e
        if group.attrs.get("format") != "sae-pipeline-activations":
            raise CacheError(f"{str(path)!r} is a Zarr group but not a sae-pipeline activation cache.")
        version = group.attrs.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"the cache at {str(path)!r} has format version {version}, this sae-pipeline reads version "
                f"{FORMAT_VERSION}; re-harvest it (same command with --overwrite)."
            )
        check_attributes(path, dict(group.attrs), group)
        cache = cls(path, group)
        if require_complete and not cache.complete:
            holder = _read_lock(lock_path(path))
            if holder and not _is_stale(holder):
                raise CacheError(
                    f"the cache at {str(path)!r} is still being written by pid {holder.get('pid')} on "
                    f"{holder.get('host')} ({cache.n_chunks_written}/{cache.layout.n_chunks} chunks so far); "
                    "wait for that harvest to finish."
                )
            raise CacheError(
                f"the cache at {str(path)!r} is incomplete ({cache.n_chunks_written}/{cache.layout.n_chunks} "
                "chunks written): its harvest was interrupted. Re-run the same `sae-pipeline harvest` "
                "command to resume it."
            )
        return cache

    # -- metadata --------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return bool(self.attrs.get(COMPLETE_ATTR, False))

    @property
    def n_chunks_written(self) -> int:
        return int(self.attrs.get("n_chunks_written", 0))

    @property
    def hook_names(self) -> list[str]:
        return list(self.attrs["hook_names"])

    @property
    def dtype(self) -> str:
        return self.attrs["dtype"]

    @property
    def d_in(self) -> int:
        """Width of the (first) hook; use :meth:`d_in_of` for multi-hook caches of mixed width."""
        return self.d_in_of(self.hook_names[0])

    def d_in_of(self, hook_name: str) -> int:
        return int(self.attrs["d_in"][self.resolve_hook(hook_name)])

    def resolve_hook(self, hook_name: str | None) -> str:
        """The cached hook to use: ``hook_name`` if cached, the only hook if ``None``.

        Raises:
            CacheError: the hook is not in this cache, or ``None`` is ambiguous.
        """
        if hook_name is None:
            if len(self.hook_names) > 1:
                raise CacheError(f"the cache holds several hooks {self.hook_names}; pass hook_name.")
            return self.hook_names[0]
        if hook_name not in self.hook_names:
            raise CacheError(
                f"hook {hook_name!r} is not in the cache at {str(self.path)!r}, which holds "
                f"{self.hook_names}; pick one of those or harvest that hook."
            )
        return hook_name

    @property
    def holdout_chunks(self) -> list[int]:
        """The chunk ids kept out of training (the last ones, in token order)."""
        n = int(self.attrs.get("n_holdout_chunks", 0))
        return list(range(self.layout.n_chunks - n, self.layout.n_chunks))

    @property
    def train_chunks(self) -> list[int]:
        n = int(self.attrs.get("n_holdout_chunks", 0))
        return list(range(self.layout.n_chunks - n))

    @property
    def special_token_ids(self) -> list[int]:
        return list(self.attrs.get("special_token_ids", []))

    # -- data ------------------------------------------------------------------------------------
    def array(self, hook_name: str) -> zarr.Array:
        return self.group[array_key(self.resolve_hook(hook_name))]

    @property
    def tokens(self) -> zarr.Array:
        """Token ids ``[n_seqs, context_size]`` int32."""
        return self.group[TOKENS_ARRAY]

    def read_chunk(self, hook_name: str, i: int, *, verify: bool = False) -> torch.Tensor:
        """Activations of chunk ``i``: ``[rows, d_in]`` in the stored dtype (CPU tensor).

        With ``verify`` the chunk's CRC-32 is checked against the one recorded when it was written.

        Raises:
            CacheError: the chunk cannot be decoded, or (``verify``) its checksum differs.
        """
        start, stop = self.layout.chunk_rows(i)
        try:
            block = self.array(hook_name)[start:stop]
        except Exception as e:  # codec and shard-index errors come in many types
            raise damaged_error(self, hook_name, [i], f"it cannot be decoded ({type(e).__name__})") from e
        if verify and chunk_checksum(block) != self.recorded_checksum(hook_name, i):
            raise damaged_error(self, hook_name, [i], "its checksum differs from the one written")
        return from_storage(block, self.dtype)

    def recorded_checksum(self, hook_name: str, i: int) -> int:
        """The CRC-32 recorded for chunk ``i`` (read once per hook: the hot path is the loader)."""
        hook = self.resolve_hook(hook_name)
        recorded = self._checksums.get(hook)
        if recorded is None:
            recorded = np.asarray(self.group[f"{CHECKSUMS_GROUP}/{array_key(hook)}"][:])
            if self.complete:  # a cache still being written gains checksums: keep re-reading it
                self._checksums[hook] = recorded
        return int(recorded[i])

    def read_rows(self, hook_name: str, start: int, stop: int) -> torch.Tensor:
        """Activations of rows ``[start, stop)``: ``[stop - start, d_in]`` in the stored dtype."""
        return from_storage(self.array(hook_name)[start:stop], self.dtype)

    def chunk_token_ids(self, i: int) -> np.ndarray:
        """Token id of every row of chunk ``i``: ``[rows]`` int32."""
        start, stop = self.layout.chunk_rows(i)
        ctx = self.layout.context_size
        return np.asarray(self.tokens[start // ctx : stop // ctx]).reshape(-1)

    def statistics(self, hook_name: str) -> dict[str, Any]:
        """Per-hook statistics recorded at harvest: ``mean`` [d_in] and ``mean_norm`` (L2, float)."""
        return self.attrs["statistics"][self.resolve_hook(hook_name)]

    def summary(self) -> str:
        a = self.attrs
        return (
            f"{self.path}: {a['n_tokens']:,} tokens of {a['model_name']} at {', '.join(self.hook_names)} "
            f"(d_in {', '.join(str(v) for v in a['d_in'].values())}, {self.dtype}, context {a['context_size']}, "
            f"{len(self.holdout_chunks)}/{self.layout.n_chunks} chunks held out)"
        )


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _attribute_problems(attrs: dict[str, Any]) -> list[str]:
    """What is wrong with a cache's attributes (types and ranges the reader relies on)."""
    problems = [f"{name} must be an integer ≥ {low}" for name, low in
                (("n_seqs", 1), ("context_size", 1), ("chunk_tokens", 1), ("chunks_per_shard", 1),
                 ("n_tokens", 1), ("n_holdout_chunks", 0), ("n_chunks_written", 0))
                if not _is_count(attrs.get(name), low)]
    hooks = attrs.get("hook_names")
    if not (isinstance(hooks, list) and hooks and all(isinstance(h, str) and h for h in hooks)):
        return problems + ["hook_names must be a non-empty list of hook names"]
    d_in = attrs.get("d_in")
    if not (isinstance(d_in, dict) and set(d_in) == set(hooks) and all(_is_count(v, 1) for v in d_in.values())):
        problems.append("d_in must map every hook name to a positive integer")
    if not isinstance(attrs.get("dtype"), str) or attrs["dtype"] not in _NUMPY_STORAGE:
        problems.append(f"dtype must be one of {sorted(_NUMPY_STORAGE)}")
    special = attrs.get("special_token_ids", [])
    if not (isinstance(special, list) and all(_is_count(t, 0) for t in special)):
        problems.append("special_token_ids must be a list of token ids")
    if not isinstance(attrs.get("model_name", ""), str):
        problems.append("model_name must be a string")
    if attrs.get(COMPLETE_ATTR):
        stats = attrs.get("statistics")
        if not (isinstance(stats, dict) and all(
                isinstance(stats.get(h), dict) and isinstance(stats[h].get("mean_norm"), (int, float))
                and not isinstance(stats[h].get("mean_norm"), bool) and math.isfinite(stats[h]["mean_norm"])
                and stats[h]["mean_norm"] > 0 for h in hooks)):
            problems.append("statistics must give every hook a finite positive mean_norm")
    return problems


def _array_problems(attrs: dict[str, Any], group: zarr.Group) -> list[str]:
    """Arrays missing or shaped unlike the attributes say (only when the attributes are sound)."""
    n_tokens = attrs["n_seqs"] * attrs["context_size"]
    expected = {array_key(h): (n_tokens, attrs["d_in"][h]) for h in attrs["hook_names"]}
    expected[TOKENS_ARRAY] = (attrs["n_seqs"], attrs["context_size"])
    problems = []
    for name, shape in expected.items():
        try:
            actual = tuple(group[name].shape)
        except Exception:  # zarr raises KeyError or its own errors for a missing or unreadable node
            problems.append(f"array {name!r} is missing or unreadable")
            continue
        if actual != shape:
            problems.append(f"array {name!r} has shape {list(actual)}, the attributes say {list(shape)}")
    if attrs["n_tokens"] != n_tokens:
        problems.append(f"n_tokens is {attrs['n_tokens']}, n_seqs × context_size is {n_tokens}")
    if attrs["n_holdout_chunks"] >= math.ceil(n_tokens / attrs["chunk_tokens"]) or attrs["chunk_tokens"] % attrs["context_size"]:
        problems.append("n_holdout_chunks must leave a training chunk and chunk_tokens must be whole sequences")
    return problems


def check_attributes(path: Path, attrs: dict[str, Any], group: zarr.Group) -> None:
    """Check a cache's attributes and arrays before anything reads them (files from elsewhere are
    untrusted: a damaged or hand-edited ``zarr.json`` must give a CacheError, not a deep traceback).

    Raises:
        CacheError: naming every problem found, with the fix (re-harvest).
    """
    problems = _attribute_problems(attrs)
    if not problems:
        problems = _array_problems(attrs, group)
    if problems:
        raise CacheError(
            f"the cache at {str(path)!r} has damaged metadata: {'; '.join(problems)}. It was not written "
            "by this sae-pipeline or was edited by hand; re-harvest it (same command with --overwrite)."
        )


def chunk_checksum(block: np.ndarray) -> int:
    """CRC-32 of a chunk's stored (uncompressed) bytes."""
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1))


def damaged_error(cache: ActivationCache, hook: str, chunks: list[int], why: str) -> CacheError:
    return CacheError(
        f"the cache at {str(cache.path)!r} is damaged: chunk(s) {chunks} of {hook!r} ({why}). "
        "Nothing was trained on them. Re-harvest into a new folder (or with --overwrite); "
        "`sae-pipeline cache verify` lists every damaged chunk."
    )


def verify(cache: ActivationCache, *, progress: bool = True) -> dict[str, list[int]]:
    """Check every written chunk of every hook against its recorded CRC-32, and the token ids.

    Returns ``{hook_name: [damaged chunk ids]}`` (``"tokens": [0]`` if the token ids changed);
    an empty dict means the cache is intact.
    """
    damaged: dict[str, list[int]] = {}
    n = cache.n_chunks_written
    bar = tqdm(total=n * len(cache.hook_names), desc="verify", unit="chunk", disable=not progress)
    with bar:
        for hook in cache.hook_names:
            for i in range(n):
                try:
                    cache.read_chunk(hook, i, verify=True)
                except CacheError:
                    damaged.setdefault(hook, []).append(i)
                bar.update()
    try:
        tokens_ok = _sha256(np.asarray(cache.tokens[:])) == cache.attrs.get("tokens_sha256")
    except Exception:  # undecodable token chunks
        tokens_ok = False
    if not tokens_ok:
        damaged["tokens"] = [0]
    return damaged


def compute_statistics(cache: ActivationCache, hook_name: str, *, exclude_token_ids=()) -> dict[str, Any]:
    """Mean activation ``[d_in]`` and mean L2 norm over the cache with dask, out of core.

    Rows whose token id is in ``exclude_token_ids`` (BOS/EOS/padding, whose activations are
    outliers) are left out. Returns ``{"mean": list[float], "mean_norm": float, "n_rows": int}``.
    """
    import dask.array as da

    arr = da.from_zarr(cache.array(hook_name))
    if cache.dtype == "bfloat16":
        arr = arr.map_blocks(lambda b: from_storage(b, "bfloat16").float().numpy(), dtype=np.float32)
    arr = arr.astype(np.float64)
    tokens = np.asarray(cache.tokens[:]).reshape(-1)
    keep = ~np.isin(tokens, np.asarray(list(exclude_token_ids), dtype=np.int64))
    keep_da = da.from_array(keep, chunks=(arr.chunks[0],))
    n = int(keep.sum())
    if n == 0:
        raise CacheError("every row of the cache is a special token; nothing to compute statistics on.")
    masked = arr * keep_da[:, None]
    total, norm_total = da.compute(masked.sum(axis=0), (da.sqrt((arr**2).sum(axis=1)) * keep_da).sum())
    return {"mean": (total / n).tolist(), "mean_norm": float(norm_total / n), "n_rows": n}


class CacheWriter:
    """Creates or resumes a harvest and appends it chunk by chunk (see the module docstring)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.cache = ActivationCache(path, group)

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        *,
        metadata: dict[str, Any],
        d_in: dict[str, int],
        tokens: np.ndarray,
        dtype: str,
        chunk_tokens: int,
        chunks_per_shard: int,
        n_holdout_chunks: int,
        compression_level: int = 3,
        overwrite: bool = False,
    ) -> "CacheWriter":
        """Open ``path`` for writing: create it, or resume it if it holds the same harvest.

        ``metadata`` must hold everything that identifies the harvest (model, weights fingerprint,
        hooks, dataset fingerprint, ...); a resume is refused unless it matches exactly.

        Raises:
            CacheError: ``path`` is a file or a folder of something else than a cache (never
                deleted, even with ``overwrite``), or holds a different harvest and ``overwrite``
                is False; nothing is touched.
        """
        path = Path(path)
        identity = {**metadata, "hook_names": list(d_in), "d_in": d_in, "dtype": dtype, "chunk_tokens": chunk_tokens,
                    "chunks_per_shard": chunks_per_shard, "n_seqs": int(tokens.shape[0]),
                    "context_size": int(tokens.shape[1]), "n_holdout_chunks": n_holdout_chunks,
                    "tokens_sha256": _sha256(tokens)}
        identity = json.loads(json.dumps(identity))  # normalise tuples etc. as JSON stores them
        check_output_folder(path, overwrite)
        if is_cache_folder(path) and not overwrite:
            existing = _read_attributes(path)
            diff = sorted(k for k in identity if existing.get(k) != identity[k])
            if diff:
                raise CacheError(
                    f"{str(path)!r} already holds a different harvest (differs in: {', '.join(diff)}). "
                    "Nothing was changed. Pass --overwrite to replace it, or choose another output_path."
                )
            _remove_partial_files(path)
            return cls(path, zarr.open_group(str(path), mode="r+"))
        if path.exists():
            shutil.rmtree(path)
        group = zarr.open_group(str(path), mode="w")
        layout = CacheLayout(int(tokens.shape[0]), int(tokens.shape[1]), chunk_tokens, chunks_per_shard)
        for hook, width in d_in.items():
            group.create_array(
                array_key(hook),
                shape=(layout.n_tokens, width),
                chunks=(chunk_tokens, width),
                shards=(chunk_tokens * chunks_per_shard, width),
                dtype=_NUMPY_STORAGE[dtype],
                compressors=BloscCodec(cname="zstd", clevel=compression_level, shuffle="shuffle"),
                fill_value=0,
            )
            group.create_array(f"{CHECKSUMS_GROUP}/{array_key(hook)}", shape=(layout.n_chunks,), dtype="uint32",
                               chunks=(min(layout.n_chunks, 4096),), fill_value=0, compressors=None)
        seqs_per_chunk = chunk_tokens // tokens.shape[1]
        tok = group.create_array(TOKENS_ARRAY, shape=tokens.shape, dtype="int32",
                                 chunks=(seqs_per_chunk, tokens.shape[1]),
                                 compressors=BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"))
        tok[:] = tokens.astype(np.int32)
        group.attrs.update({"format": "sae-pipeline-activations", "format_version": FORMAT_VERSION,
                            **identity, "n_tokens": layout.n_tokens,
                            "n_chunks_written": 0, COMPLETE_ATTR: False})
        return cls(path, group)

    @property
    def layout(self) -> CacheLayout:
        return self.cache.layout

    @property
    def n_chunks_written(self) -> int:
        return int(self.group.attrs.get("n_chunks_written", 0))

    def write_chunk(self, i: int, blocks: dict[str, np.ndarray]) -> None:
        """Write chunk ``i`` for every hook, then advance the progress attribute.

        Chunks must be written in order; ``blocks[hook]`` is ``[rows_of_chunk_i, d_in]`` in the
        storage dtype (see :func:`to_storage`).
        """
        if i != self.n_chunks_written:
            raise CacheError(f"chunk {i} written out of order (expected {self.n_chunks_written}).")
        start, stop = self.layout.chunk_rows(i)
        for hook, block in blocks.items():
            if block.shape[0] != stop - start:
                raise CacheError(f"chunk {i} of {hook!r} has {block.shape[0]} rows, expected {stop - start}.")
            self.group[array_key(hook)][start:stop] = block
            self.group[f"{CHECKSUMS_GROUP}/{array_key(hook)}"][i] = chunk_checksum(block)
        self.group.attrs["n_chunks_written"] = i + 1

    def finalize(self, statistics: dict[str, Any], extra: dict[str, Any] | None = None) -> ActivationCache:
        """Record statistics and mark the harvest complete (the last write of a harvest)."""
        if self.n_chunks_written != self.layout.n_chunks:
            raise CacheError(
                f"cannot finalize: {self.n_chunks_written}/{self.layout.n_chunks} chunks written."
            )
        self.group.attrs.update({"statistics": statistics, **(extra or {})})
        self.group.attrs[COMPLETE_ATTR] = True
        return ActivationCache.open(self.path)


def is_cache_folder(path: Path) -> bool:
    """Whether ``path`` holds a sae-pipeline activation cache (complete or not)."""
    return _read_attributes(path).get("format") == "sae-pipeline-activations"


def check_output_folder(path: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not a cache.

    ``--overwrite`` only ever replaces a cache: a folder of anything else is never deleted.

    Raises:
        CacheError: naming what is there and the fix.
    """
    if path.exists() and not path.is_dir():
        raise CacheError(f"output_path {str(path)!r} is a file; choose a folder path for the cache.")
    if path.is_dir() and any(path.iterdir()) and not is_cache_folder(path):
        raise CacheError(
            f"output_path {str(path)!r} holds files that are not an activation cache; nothing was changed "
            f"{'(--overwrite only replaces caches)' if overwrite else ''}. Choose an empty or new folder."
        )


@contextlib.contextmanager
def writer_lock(path: str | Path, *, break_lock: bool = False) -> Iterator[None]:
    """Hold the exclusive writer lock of the cache at ``path`` (a ``<path>.lock`` file beside it).

    The lock records host, pid and start time. A lock left by a process of this host that no
    longer runs (a killed harvest) is stale and is removed with a note; a live holder, or a holder
    on another host (which cannot be checked), is refused unless ``break_lock``.

    Raises:
        CacheError: another writer holds the lock; the message names it and the fix.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            holder = _read_lock(lock)
            if not (break_lock or _is_stale(holder)):
                raise CacheError(
                    f"{str(path)!r} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(since {holder.get('started')}). Wait for it to finish; if that process is gone, "
                    "re-run with --break-lock."
                ) from None
            print(f"note: removing the lock of pid {holder.get('pid')} on {holder.get('host')}, "
                  f"{'as asked' if break_lock else 'which no longer runs'}")
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def lock_path(path: str | Path) -> Path:
    """The writer lock of the cache at ``path``: ``<path>.lock`` beside it, outside the Zarr group."""
    return Path(str(Path(path)) + LOCK_SUFFIX)


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # missing, or half-written by a writer killed while locking (treated as stale)


def _is_stale(holder: dict[str, Any]) -> bool:
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # cannot tell whether a process on another machine still runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError):
        return False
    return False


def _sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def _read_attributes(path: Path) -> dict[str, Any]:
    """The group attributes of whatever is at ``path`` ({} when it is not a Zarr group)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}


def _remove_partial_files(path: Path) -> None:
    """Drop leftovers of a write that was killed before its rename (zarr's ``*.partial`` files)."""
    for leftover in path.rglob("*.partial"):
        leftover.unlink(missing_ok=True)
