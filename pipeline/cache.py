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
each chunk is compressed with byte-shuffled Blosc, LZ4 by default (see :data:`COMPRESSIONS`; float16
activations are close to incompressible: Zstd saves ~7% at ~10x the decode time, bit-shuffle saves
nothing, measured by ``sae-pipeline bench --cases codecs``). Zarr's local store writes every file to a
temporary name and renames it, so a chunk write is atomic; the group's ``n_chunks_written``
attribute is advanced only after a chunk is on disk for every hook, so a killed harvest leaves a
group that says exactly how far it got and never one marked ``complete`` that is missing data.
A write the OS refuses (disk full, read-only, permissions) stops the harvest with a
:class:`~pipeline.errors.CacheWriteError` and leaves the same resumable state.

Several processes may fill one cache at once (a distributed harvest): each stores the chunks of
its own shard files (:meth:`CacheLayout.shard_ranges`, :meth:`CacheWriter.write_chunk_data`) and
one process, the holder of the writer lock, records checksums and progress
(:meth:`CacheWriter.record_chunks`) and finalizes.

A harvest writes a local folder; readers open it by path or, read-only, by fsspec URL
(:meth:`ActivationCache.open`, :func:`is_url`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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

import fsspec.core
import google_crc32c  # installed with zarr, whose crc32c codec uses it
import numpy as np
import torch
import zarr
from fsspec.registry import known_implementations
from tqdm.auto import tqdm
from zarr.codecs import BloscCodec
from zarr.storage import FsspecStore

from pipeline.chunk_files import ChunkFileReader
from pipeline.constants import CHECKSUMS_GROUP, COMPLETE_ATTR, LOCK_SUFFIX, TOKENS_ARRAY
from pipeline.errors import CacheError, CacheWriteError

FORMAT_VERSION = 3  # 2: per-chunk CRC-32 checksums; 3: CRC-32C (hardware-accelerated, ~2.5x faster)
# Checksum of each format version this sae-pipeline reads (crc32c is what zarr's own codec uses).
CHECKSUM_ALGORITHMS = {2: "crc32", 3: "crc32c"}
_NUMPY_STORAGE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
LOCK_RETRIES = 5  # 20 ms apart: a reader's flock probe lasts microseconds
BUILDING_SUFFIX = ".creating"  # <cache>.creating: a new cache being laid out, renamed into place when whole


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

    def shard_ranges(self, first_chunk: int, n_ranges: int) -> list[tuple[int, int]]:
        """Chunks ``[first_chunk, n_chunks)`` as at most ``n_ranges`` contiguous ranges
        ``[start, stop)`` of whole shards (the first may start inside one), shards dealt out evenly.

        Zarr stores a chunk by rewriting its whole shard file (read, modify, write), so processes
        writing at once must never share a shard: ranges that meet only at shard boundaries don't.
        """
        per = self.chunks_per_shard
        first_shard, n_shards = first_chunk // per, math.ceil(self.n_chunks / per)
        left = n_shards - first_shard
        if left <= 0 or first_chunk >= self.n_chunks:
            return []
        n = max(1, min(n_ranges, left))
        bounds = [first_shard + left * j // n for j in range(n + 1)]
        return [(max(first_chunk, a * per), min(self.n_chunks, b * per)) for a, b in zip(bounds, bounds[1:])]


def chunk_tokens_for(context_size: int, target_tokens: int) -> int:
    """Round the wanted chunk size to a whole number of sequences (at least one)."""
    return max(1, round(target_tokens / context_size)) * context_size


class ActivationCache:
    """Read access to a harvest. Open with :meth:`open`; arrays are read lazily, chunk by chunk.

    ``path`` is the local folder (a :class:`~pathlib.Path`) or the fsspec URL (a ``str``) it was
    opened from.
    """

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path: Path | str = path if is_url(path) else Path(path)
        self.group = group
        self.attrs: dict[str, Any] = dict(group.attrs)
        self._checksums: dict[str, np.ndarray] = {}
        self._readers: dict[str, ChunkFileReader | None] = {}
        self.layout = CacheLayout(
            n_seqs=self.attrs["n_seqs"],
            context_size=self.attrs["context_size"],
            chunk_tokens=self.attrs["chunk_tokens"],
            chunks_per_shard=self.attrs["chunks_per_shard"],
        )

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, *, require_complete: bool = True) -> "ActivationCache":
        """Open a cache: a local folder, or read-only an fsspec URL (``file:///abs/cache``,
        ``s3://bucket/cache``, ``gcs://...``, ``https://...``: any protocol whose fsspec backend is
        installed; credentials come from the backend's usual environment variables and config files).

        Raises:
            CacheError: the cache is missing or unreachable, the URL's fsspec backend is not
                installed (the message names the package), its server ignores byte-range requests
                (shards are read by range), it is not a sae-pipeline cache, or (with
                ``require_complete``) its harvest did not finish — the message says how to resume.
        """
        location = path if is_url(path) else Path(path)
        try:
            group = _open_remote(location) if is_url(location) else _open_local(location)
        except CacheError:
            raise
        except Exception as e:  # zarr raises several types for damaged metadata
            raise CacheError(f"{str(location)!r} is not a readable Zarr group ({e}); re-harvest it.") from e
        if group.attrs.get("format") != "sae-pipeline-activations":
            raise CacheError(f"{str(location)!r} is a Zarr group but not a sae-pipeline activation cache.")
        version = group.attrs.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version not in CHECKSUM_ALGORITHMS:
            raise CacheError(
                f"the cache at {str(location)!r} has format version {version}, this sae-pipeline reads versions "
                f"{sorted(CHECKSUM_ALGORITHMS)}; re-harvest it (same command with --overwrite)."
            )
        check_attributes(location, dict(group.attrs), group)
        cache = cls(location, group)
        if require_complete and not cache.complete:
            raise _incomplete_error(cache)
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

    def read_chunk(self, hook_name: str, i: int, *, verify: bool = False, out: np.ndarray | None = None) -> torch.Tensor:
        """Activations of chunk ``i``: ``[rows, d_in]`` in the stored dtype (CPU tensor).

        With ``verify`` the chunk's CRC-32 is checked against the one recorded when it was written.
        ``out`` (from :meth:`chunk_buffer`) is filled and returned as a view instead of a new array.

        Raises:
            CacheError: the chunk cannot be decoded, or (``verify``) its checksum differs.
        """
        start, stop = self.layout.chunk_rows(i)
        hook = self.resolve_hook(hook_name)
        try:
            reader = self._reader(array_key(hook))
            if reader is not None:
                block = reader.read(i, out)
            elif out is not None:
                block = out[: stop - start]
                block[:] = self.array(hook)[start:stop]
            else:
                block = self.array(hook)[start:stop]
        except Exception as e:  # codec and shard-index errors come in many types
            raise damaged_error(self, hook_name, [i], f"it cannot be decoded ({type(e).__name__})") from e
        if verify and chunk_checksum(block, self.checksum_algorithm) != self.recorded_checksum(hook_name, i):
            raise damaged_error(self, hook_name, [i], "its checksum differs from the one written")
        return from_storage(block, self.dtype)

    def read_kept_rows(self, hook_name: str, i: int, exclude_token_ids=(), *, verify: bool = False) -> torch.Tensor:
        """Chunk ``i``'s rows whose token id is not in ``exclude_token_ids``: ``[kept, d_in]`` in the
        stored dtype. Raises CacheError as :meth:`read_chunk` and :meth:`chunk_token_ids` do."""
        rows = self.read_chunk(hook_name, i, verify=verify)
        exclude = np.asarray(list(exclude_token_ids), dtype=np.int64)
        return rows[torch.from_numpy(~np.isin(self.chunk_token_ids(i), exclude))] if exclude.size else rows

    def chunk_buffer(self, hook_name: str) -> np.ndarray:
        """An empty ``[chunk_tokens, d_in]`` array in the storage dtype, for ``read_chunk(out=...)``."""
        return np.empty((self.layout.chunk_tokens, self.d_in_of(hook_name)), _NUMPY_STORAGE[self.dtype])

    @property
    def checksum_algorithm(self) -> str:
        """``"crc32c"`` (format 3) or ``"crc32"`` (format 2): how the chunk checksums were computed."""
        return CHECKSUM_ALGORITHMS[self.attrs.get("format_version", FORMAT_VERSION)]

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
        try:
            reader = self._reader(TOKENS_ARRAY)  # one token chunk holds one activation chunk's sequences
            ids = reader.read(i) if reader is not None else np.asarray(self.tokens[start // ctx : stop // ctx])
        except Exception as e:  # codec and file errors come in many types
            raise damaged_error(self, TOKENS_ARRAY, [i], f"its token ids cannot be decoded ({type(e).__name__})") from e
        return ids.reshape(-1)

    def _reader(self, key: str) -> ChunkFileReader | None:
        """The direct chunk reader of array ``key`` (:mod:`pipeline.chunk_files`), or ``None``: zarr
        reads it (a URL, a cache still being written, or a layout that reader does not know)."""
        if key not in self._readers:
            local = self.complete and not is_url(self.path)
            self._readers[key] = ChunkFileReader.of(self.group[key]) if local else None
        return self._readers[key]

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


# -- where a cache is read from ------------------------------------------------------------------
# A local folder is read through zarr's LocalStore (the fast path) and may be flock-ed by its
# writer; a URL through zarr's FsspecStore, read-only: a remote store has no lock to check, so a
# reader relies on the group's ``complete`` attribute alone (set by the harvest's last write).
def is_url(path: str | Path) -> bool:
    """Whether ``path`` is an fsspec URL (``s3://bucket/cache``, ``file:///abs/cache``) rather than
    a local path (a :class:`~pathlib.Path` never is: it would have lost a slash of ``//``)."""
    return isinstance(path, str) and "://" in path


def local_folder(path: str | Path) -> Path | None:
    """The local folder a cache path names: the path itself, a ``file://`` URL's folder, or None
    for a URL of another filesystem."""
    if not is_url(path):
        return Path(path)
    protocol, rest = fsspec.core.split_protocol(path)
    return Path(rest) if protocol in ("file", "local") else None


def _open_local(path: Path) -> zarr.Group:
    if not (path / "zarr.json").is_file():
        raise _no_cache_error(path)
    return zarr.open_group(str(path), mode="r")


def _open_remote(url: str) -> zarr.Group:
    """The group at ``url``, read-only through zarr's FsspecStore."""
    fs, root = _url_filesystem(url)
    try:
        # reading the file, not fs.isfile (HTTP's reads an unreachable host as a missing file), and
        # by range as shards are read: a server that ignores Range (python -m http.server) answers
        # with the whole file, which would read as damaged chunks
        head = fs.cat_file(f"{root.rstrip('/')}/zarr.json", start=0, end=2)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise _no_cache_error(url) from None
    except Exception as e:  # unreachable host, refused credentials: each backend has its own types
        raise CacheError(f"cannot read the cache at {url!r} ({type(e).__name__}: {e}): check the URL, that its host "
                         "is reachable from here and the backend's credentials, or copy the cache to a local "
                         "folder.") from e
    if len(head) != 2:
        raise CacheError(f"cannot read the cache at {url!r}: its server ignores byte-range requests (2 bytes of "
                         f"zarr.json asked for, {len(head):,} returned), and a cache's shard files are read by range; "
                         "serve it from storage that honours HTTP Range (S3, GCS, nginx, ...; not `python -m "
                         "http.server`), or copy the cache to a local folder.")
    return zarr.open_group(FsspecStore.from_url(url, read_only=True), mode="r")


def _url_filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec's filesystem of ``url`` and the path in it.

    Raises:
        CacheError: the protocol is unknown, or its backend is not installed (naming the package).
    """
    protocol = fsspec.core.split_protocol(url)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        module = known_implementations.get(protocol, {}).get("class", "").split(".")[0]
        install = f"pip install {module}" if module not in ("", "fsspec") else "install what it names"
        raise CacheError(f"cannot read the cache at {url!r}: the fsspec backend of {protocol!r} URLs is not "
                         f"installed ({e}); {install}, or copy the cache to a local folder.") from None
    except ValueError as e:
        raise CacheError(f"cannot read the cache at {url!r}: {e}. Pass a local folder or a URL fsspec reads "
                         "(file://, s3://, gcs://, https://, ...).") from None


def _no_cache_error(location: str | Path, why: str = "") -> CacheError:
    return CacheError(
        f"no activation cache at {str(location)!r}{why}: run `sae-pipeline harvest` first, or pass the "
        "folder that holds the harvest's zarr.json."
    )


def _incomplete_error(cache: ActivationCache) -> CacheError:
    """Why ``cache`` cannot be read yet: its writer still runs (its lock says so), or it was interrupted."""
    done = f"{cache.n_chunks_written}/{cache.layout.n_chunks}"
    if is_url(cache.path):
        return CacheError(f"the cache at {cache.path!r} is incomplete ({done} chunks written): its harvest is "
                          "still running or was interrupted (a cache read by URL has no lock to tell). Wait for "
                          "it, or re-run the same `sae-pipeline harvest` command where it ran to resume it.")
    state, holder = lock_state(cache.path)
    if state in ("running", "unknown"):
        return CacheError(
            f"the cache at {str(cache.path)!r} is still being written by pid {holder.get('pid')} on "
            f"{holder.get('host')} ({done} chunks so far); wait for that harvest to finish."
        )
    return CacheError(
        f"the cache at {str(cache.path)!r} is incomplete ({done} chunks written): its harvest was "
        "interrupted. Re-run the same `sae-pipeline harvest` command to resume it."
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
    storage = np.dtype(_NUMPY_STORAGE.get(attrs["dtype"], attrs["dtype"]))
    expected = {array_key(h): ((n_tokens, attrs["d_in"][h]), storage) for h in attrs["hook_names"]}
    expected[TOKENS_ARRAY] = ((attrs["n_seqs"], attrs["context_size"]), np.dtype("int32"))
    problems = []
    for name, (shape, dtype) in expected.items():
        try:
            array = group[name]
            actual, actual_dtype = tuple(array.shape), np.dtype(array.dtype)
        except Exception:  # zarr raises KeyError or its own errors for a missing or unreadable node
            problems.append(f"array {name!r} is missing or unreadable")
            continue
        if actual != shape:
            problems.append(f"array {name!r} has shape {list(actual)}, the attributes say {list(shape)}")
        if actual_dtype != dtype:
            problems.append(f"array {name!r} holds {actual_dtype}, the attributes say {dtype}")
    if attrs["n_tokens"] != n_tokens:
        problems.append(f"n_tokens is {attrs['n_tokens']}, n_seqs × context_size is {n_tokens}")
    if attrs["n_holdout_chunks"] >= math.ceil(n_tokens / attrs["chunk_tokens"]) or attrs["chunk_tokens"] % attrs["context_size"]:
        problems.append("n_holdout_chunks must leave a training chunk and chunk_tokens must be whole sequences")
    return problems


def check_attributes(path: str | Path, attrs: dict[str, Any], group: zarr.Group) -> None:
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


def chunk_checksum(block: np.ndarray, algorithm: str = "crc32c") -> int:
    """CRC-32C (or, for format-2 caches, CRC-32) of a chunk's stored (uncompressed) bytes."""
    data = np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    return google_crc32c.value(data) if algorithm == "crc32c" else zlib.crc32(data)


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
    """Mean activation ``[d_in]`` and mean L2 norm over the cache, out of core, one chunk per dask
    task (float64 sums of each chunk's kept rows, then added up): memory is a few chunks at a time
    whatever the cache's size.

    Rows whose token id is in ``exclude_token_ids`` (BOS/EOS/padding, whose activations are
    outliers) are left out. Returns ``{"mean": list[float], "mean_norm": float, "n_rows": int}``.

    Raises:
        CacheError: every row is excluded, or a chunk cannot be read.
    """
    import dask

    def chunk_sums(i: int) -> np.ndarray:  # [d_in + 2]: Σ rows, Σ norms, rows kept
        x = cache.read_kept_rows(hook_name, i, exclude_token_ids).double()
        return np.concatenate([x.sum(0).numpy(), [float(x.norm(dim=1).sum()), x.shape[0]]])

    sums = np.zeros(cache.d_in_of(hook_name) + 2)
    for start in range(0, cache.layout.n_chunks, 256):  # a bounded graph and result list per round
        stop = min(start + 256, cache.layout.n_chunks)
        sums += np.sum(dask.compute(*[dask.delayed(chunk_sums)(i) for i in range(start, stop)]), axis=0)
    n = int(sums[-1])
    if n == 0:
        raise CacheError("every row of the cache is a special token; nothing to compute statistics on.")
    return {"mean": (sums[:-2] / n).tolist(), "mean_norm": float(sums[-2] / n), "n_rows": n}


# Activation codecs (``compression``), measured by ``pipeline.bench.codecs`` (``sae-pipeline bench
# --cases codecs``): float16 activations are close to incompressible (their mantissa bytes are
# noise), so Zstd saves ~7% of the bytes but decodes ~10x slower than LZ4, which on these data
# stores the bytes as they are and costs almost nothing to read. The loader is the hot path, so
# LZ4 is the default; "zstd" suits archives, "none" skips Blosc entirely.
COMPRESSIONS = ("lz4", "zstd", "none")


def activation_compressor(compression: str, level: int = 3) -> BloscCodec | None:
    """The zarr compressor of activation arrays: byte-shuffled Blosc with ``compression``.

    Raises:
        CacheError: ``compression`` is not one of :data:`COMPRESSIONS`.
    """
    if compression not in COMPRESSIONS:
        raise CacheError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}.")
    if compression == "none":
        return None
    return BloscCodec(cname=compression, clevel=level, shuffle="shuffle")


class CacheWriter:
    """Creates or resumes a harvest and appends it chunk by chunk (see the module docstring)."""

    def __init__(self, path: Path, group: zarr.Group):
        self.path = path
        self.group = group
        self.cache = ActivationCache(path, group)
        self._recorded: set[int] = set(range(self.n_chunks_written))

    @classmethod
    def open_existing(cls, path: str | Path) -> "CacheWriter":
        """A writer of the cache another process created (a worker of a distributed harvest).

        Raises:
            CacheError: ``path`` holds no cache, or a damaged one.
        """
        cache = ActivationCache.open(path, require_complete=False)
        return cls(cache.path, zarr.open_group(str(cache.path), mode="r+"))

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
        compression: str = "lz4",
        compression_level: int = 3,
        overwrite: bool = False,
    ) -> "CacheWriter":
        """Open ``path`` for writing: create it, or resume it if it holds the same harvest.

        ``metadata`` must hold everything that identifies the harvest (model, weights fingerprint,
        hooks, dataset fingerprint, ...); a resume is refused unless it matches exactly. A new
        cache is laid out in ``<path>.creating`` and renamed to ``path`` when whole, so a harvest
        killed or out of space while creating it leaves nothing a re-run would refuse.

        Raises:
            CacheError: ``path`` is a file or a folder of something else than a cache (never
                deleted, even with ``overwrite``), or holds a different harvest and ``overwrite``
                is False; nothing is touched.
            CacheWriteError: the OS refused to write the new cache (nothing is left of it).
        """
        path = Path(path)
        identity = {**metadata, "hook_names": list(d_in), "d_in": d_in, "dtype": dtype, "compression": compression,
                    "chunk_tokens": chunk_tokens,
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
            try:
                _remove_partial_files(path)
            except OSError as err:
                raise write_error(path, "its leftover partial files", err) from None
            return cls(path, zarr.open_group(str(path), mode="r+"))
        building = building_path(path)
        try:
            shutil.rmtree(building, ignore_errors=True)  # left by a harvest killed while creating (we hold the lock)
            cls._create(building, identity, d_in=d_in, tokens=tokens, dtype=dtype, chunk_tokens=chunk_tokens,
                        chunks_per_shard=chunks_per_shard, compression=compression,
                        compression_level=compression_level)
            if path.exists():
                shutil.rmtree(path)
            os.replace(building, path)  # the cache appears whole or not at all
        except OSError as err:
            # zarr writes a new array's files concurrently, and one may land after this cleanup:
            # such a remnant of <path>.creating is removed by the next run before it builds
            shutil.rmtree(building, ignore_errors=True)
            raise write_error(path, "the empty arrays", err) from None
        return cls(path, zarr.open_group(str(path), mode="r+"))

    @staticmethod
    def _create(folder: Path, identity: dict[str, Any], *, d_in: dict[str, int], tokens: np.ndarray, dtype: str,
                chunk_tokens: int, chunks_per_shard: int, compression: str, compression_level: int) -> None:
        """Lay out an empty cache in ``folder``: arrays, checksums, token ids and attributes."""
        group = zarr.open_group(str(folder), mode="w")
        layout = CacheLayout(int(tokens.shape[0]), int(tokens.shape[1]), chunk_tokens, chunks_per_shard)
        for hook, width in d_in.items():
            group.create_array(
                array_key(hook),
                shape=(layout.n_tokens, width),
                chunks=(chunk_tokens, width),
                shards=(chunk_tokens * chunks_per_shard, width),
                dtype=_NUMPY_STORAGE[dtype],
                compressors=activation_compressor(compression, compression_level),
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

    @property
    def layout(self) -> CacheLayout:
        return self.cache.layout

    @property
    def n_chunks_written(self) -> int:
        return int(self.group.attrs.get("n_chunks_written", 0))

    def write_chunk(self, i: int, blocks: dict[str, np.ndarray]) -> None:
        """Write chunk ``i`` for every hook (:meth:`write_chunk_data`), then record it (:meth:`record_chunks`).

        Chunks must be written in order; ``blocks[hook]`` is ``[rows_of_chunk_i, d_in]`` in the
        storage dtype (see :func:`to_storage`).

        Raises:
            CacheError: ``i`` is out of order or a block has the wrong number of rows.
            CacheWriteError: the OS refused the write (disk full, read-only, permissions).
        """
        if i != self.n_chunks_written:
            raise CacheError(f"chunk {i} written out of order (expected {self.n_chunks_written}).")
        self.record_chunks({i: self.write_chunk_data(i, blocks)})

    def write_chunk_data(self, i: int, blocks: dict[str, np.ndarray]) -> dict[str, int]:
        """Store chunk ``i``'s activations for every hook and return their checksums ``{hook: checksum}``.

        Writes only the hooks' arrays, never the checksums or attributes, so processes writing
        chunks of *different shard files* (:meth:`CacheLayout.shard_ranges`) may call it at once;
        one process records what they wrote with :meth:`record_chunks`.

        Raises:
            CacheError: a block has the wrong number of rows.
            CacheWriteError: the OS refused the write; chunks recorded before are kept.
        """
        start, stop = self.layout.chunk_rows(i)
        crcs = {}
        with self._writes(f"chunk {i}"):
            for hook, block in blocks.items():
                if block.shape[0] != stop - start:
                    raise CacheError(f"chunk {i} of {hook!r} has {block.shape[0]} rows, expected {stop - start}.")
                self.group[array_key(hook)][start:stop] = block
                crcs[hook] = chunk_checksum(block, self.cache.checksum_algorithm)
        return crcs

    def record_chunks(self, crcs: dict[int, dict[str, int]]) -> None:
        """Record chunks already stored (``{chunk: {hook: crc}}``): their checksums, then
        ``n_chunks_written`` advanced over every chunk recorded so far without a gap.

        Chunks recorded past a gap (a later shard range of a distributed harvest that finished
        first) count once the gap is filled; until then only this writer knows them, so a harvest
        killed meanwhile redoes them. Call from one process only (the attributes live in one file).

        Raises:
            CacheWriteError: the OS refused the write.
        """
        with self._writes(f"the checksums of chunk(s) {sorted(crcs)}"):
            for hook in self.cache.hook_names:
                checksums = self.group[f"{CHECKSUMS_GROUP}/{array_key(hook)}"]
                for i, per_hook in sorted(crcs.items()):
                    checksums[i] = per_hook[hook]
            self._recorded.update(crcs)
            n = self.n_chunks_written
            while n in self._recorded:
                n += 1
            if n != self.n_chunks_written:
                self.group.attrs["n_chunks_written"] = n

    def finalize(self, statistics: dict[str, Any], extra: dict[str, Any] | None = None) -> ActivationCache:
        """Record statistics and mark the harvest complete (the last write of a harvest).

        Raises:
            CacheError: chunks are missing.
            CacheWriteError: the OS refused the write; re-running the harvest finalizes it.
        """
        if self.n_chunks_written != self.layout.n_chunks:
            raise CacheError(
                f"cannot finalize: {self.n_chunks_written}/{self.layout.n_chunks} chunks written."
            )
        with self._writes("the statistics and completion marker"):
            self.group.attrs.update({"statistics": statistics, **(extra or {})})
            self.group.attrs[COMPLETE_ATTR] = True
        return ActivationCache.open(self.path)

    @contextlib.contextmanager
    def _writes(self, what: str) -> Iterator[None]:
        """Turn the OS refusing a write (disk full, read-only, permissions) into a CacheWriteError."""
        try:
            yield
        except OSError as err:
            raise write_error(self.path, what, err, self._progress()) from None

    def _progress(self) -> str:
        """What a failed write leaves: the chunks recorded on disk (read back, as another process
        may be the one recording) and the bytes the rest still needs."""
        done = int(_read_attributes(self.path).get("n_chunks_written", 0))
        layout = self.layout
        row_bytes = sum(self.cache.attrs["d_in"].values()) * np.dtype(_NUMPY_STORAGE[self.cache.dtype]).itemsize
        rows_left = layout.n_tokens - min(layout.n_tokens, done * layout.chunk_tokens)
        kept = (f"The {done} chunk(s) recorded before are on disk with their checksums and are kept; "
                if done else "No chunk was recorded yet; ")
        return (kept + f"the remaining {layout.n_chunks - done} need up to {_size(rows_left * row_bytes)} "
                f"(uncompressed). Resuming starts at chunk {done}. ")


# Per OS error, what the user does about it.
_RESUME = "then re-run the same command to resume"
_WRITE_FIXES = {
    errno.ENOSPC: f"free space on that filesystem, {_RESUME}",
    errno.EDQUOT: f"free space or raise your quota on that filesystem, {_RESUME}",
    errno.EROFS: "the filesystem is read-only: make it writable and re-run the same command, or harvest into an "
                 "output_path on a writable filesystem",
    errno.EACCES: f"make the folder writable for this user, {_RESUME}",
    errno.EPERM: f"make the folder writable for this user, {_RESUME}",
}


def write_error(path: str | Path, what: str, err: OSError, progress: str = "") -> CacheWriteError:
    """The error a harvest raises when the OS refuses a write: the cache path, what was being
    written, the OS error and file, the free space there, what was kept, and the fix."""
    fix = _WRITE_FIXES.get(err.errno, f"remove the cause the OS names, {_RESUME}")
    return CacheWriteError(
        f"cannot write {what} of the cache at {str(path)!r}: {describe_os_error(err, Path(path))}. "
        f"{progress}Fix: {fix}."
    )


def describe_os_error(err: OSError, path: Path) -> str:
    """``"No space left on device (ENOSPC at <file>); 1.2 MiB free on that filesystem"``, the free
    space measured at ``path`` (or its nearest existing parent)."""
    code = errno.errorcode.get(err.errno or 0, "unknown")
    where = f" at {err.filename}" if err.filename else ""
    return f"{err.strerror or err} ({code}{where}); {_free_space(path)} free on that filesystem"


def _free_space(path: Path) -> str:
    for folder in (path, *path.absolute().parents):  # the nearest folder that exists
        try:
            return _size(shutil.disk_usage(folder).free)
        except OSError:
            continue
    return "unknown space"


def _size(n_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def building_path(path: str | Path) -> Path:
    """Where a new cache is laid out before it is renamed to ``path``: ``<path>.creating`` beside it."""
    return Path(str(Path(path)) + BUILDING_SUFFIX)


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

    The lock file records host, pid and start time, and its holder keeps an exclusive ``flock`` on
    it while it writes; the kernel releases that the moment the holder dies, however it dies. So a
    held flock means a live writer (refused, named; ``break_lock`` does not override it), and a lock
    file left by a process of this host whose flock is free is stale (a killed harvest): it is
    taken over with a note. A lock naming another host whose flock is free cannot be judged (not
    every shared filesystem carries flocks between machines) and is refused unless ``break_lock``.
    Taking over happens under the flock, so two harvests that find the same stale lock at once
    cannot both win (pid checks alone cannot tell a reused pid, nor order two breakers).

    Raises:
        CacheError: another writer holds the lock, or ``path`` is a URL (a harvest writes local
            folders only); the message names it and the fix.
        CacheWriteError: the lock file cannot be created (read-only or unwritable folder).
    """
    if is_url(path):
        raise CacheError(f"cannot harvest into {path!r}: a harvest writes local folders only (a URL cannot be "
                         "locked against a second writer). Harvest into a local folder, copy it there, and "
                         "train from the URL.")
    lock = lock_path(path)
    fd = _acquire_lock(lock, Path(path), break_lock)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # before releasing the flock, so a waiting writer finds no lock
        os.close(fd)


def _acquire_lock(lock: Path, path: Path, break_lock: bool) -> int:
    """Open, flock and claim ``lock``; returns the open descriptor that holds the flock."""
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(path, "the writer lock", err) from None
        if not _flock_within(fd, LOCK_RETRIES):
            os.close(fd)
            raise _locked_error(path, _read_lock(lock), "its lock is held by a running process")
        if not _same_file(fd, lock):  # its holder removed it between our open and flock: try the new one
            os.close(fd)
            continue
        holder = _read_lock(lock)
        if holder and holder.get("host") != socket.gethostname() and not break_lock:
            os.close(fd)
            raise _locked_error(path, holder, "on another machine, which cannot be checked from here")
        if holder:
            print(f"note: taking over the lock of pid {holder.get('pid')} on {holder.get('host')}, "
                  f"{'as asked' if holder.get('host') != socket.gethostname() else 'which no longer runs'}")
        _claim(fd)
        return fd


def _flock_within(fd: int, attempts: int) -> bool:
    """Take an exclusive flock on ``fd``; a few short retries ride out a reader's probe (:func:`lock_state`)."""
    for attempt in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < attempts:
                time.sleep(0.02)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _claim(fd: int) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)


def _locked_error(path: Path, holder: dict[str, Any], why: str) -> CacheError:
    fix = ("Wait for it to finish, or stop it first." if "running" in why else
           "Wait for it to finish; if that process is gone, re-run with --break-lock.")
    return CacheError(
        f"{str(path)!r} is being written by pid {holder.get('pid')} on {holder.get('host')} "
        f"(since {holder.get('started')}; {why}). {fix}"
    )


def lock_path(path: str | Path) -> Path:
    """The writer lock of the cache at ``path``: ``<path>.lock`` beside it, outside the Zarr group."""
    return Path(str(Path(path)) + LOCK_SUFFIX)


def lock_state(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Who holds the writer lock of the cache at ``path``, and whether it still runs.

    Returns ``(state, holder)`` with ``holder`` the lock file's host, pid and start time ({} if
    none) and ``state`` one of ``"none"`` (no lock file, or a cache read by URL, which has no lock
    to check), ``"running"`` (its flock is held),
    ``"stale"`` (left by a process of this host that no longer runs: the next harvest takes it
    over) or ``"unknown"`` (a process on another host: ``--break-lock`` if it is gone).
    """
    if is_url(path):
        return "none", {}
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return "none", {}
    try:
        holder = _read_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return "running", holder
    finally:
        os.close(fd)  # closing releases the probe's shared flock
    return ("unknown" if holder.get("host") not in (None, socket.gethostname()) else "stale"), holder


def _read_lock(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # missing, or half-written by a writer killed while locking (treated as stale)


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
