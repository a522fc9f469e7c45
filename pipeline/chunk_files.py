"""Direct reads of one chunk of a local Zarr v3 array: the loader's hot path.

Why: zarr-python's read path costs about 6 ms per 4.7 MB activation chunk (async dispatch and
buffer copies) and 2 ms per 16 KB token-id chunk, while the Blosc decode itself takes 0.6 ms; on
2 cores that caps the loader near 0.5M tokens/s whatever else it does (measured: ``sae-pipeline
bench --cases codecs``). Zarr stays the format, the writer and the reader of everything else; this
module reads only the two layouts :class:`~pipeline.cache.CacheWriter` creates, as the Zarr v3
specification defines them:

* a sharded array (``sharding_indexed``): each shard file holds its chunks' encoded bytes followed
  by the shard index, ``chunks_per_shard`` little-endian ``(offset, nbytes)`` uint64 pairs and the
  index's CRC-32C (``index_codecs = [bytes, crc32c]``, ``index_location = end``);
* an unsharded array: one file per chunk.

Chunks are ``bytes`` (little endian) then optionally ``blosc`` encoded, chunked along axis 0 only.
:meth:`ChunkFileReader.of` returns ``None`` for any other layout or store, and the caller reads
through zarr. Shard indexes are read once per shard, so use a reader only on a cache that is
complete (its files no longer change).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore, WrapperStore

_EMPTY = np.uint64(2**64 - 1)  # the index entry of a chunk that was never written


class ChunkFileReader:
    """Reads chunk ``i`` (rows ``[i * chunk_rows, ...)``) of a local Zarr v3 array from its file.

    Built by :meth:`of`, which checks the layout. Thread-safe (each read opens its own file and
    reads into its thread's buffer).
    """

    def __init__(self, folder: Path, array: zarr.Array, chunk_codecs: tuple, chunks_per_shard: int | None):
        self.folder = folder
        self.array = array
        self.shape = tuple(array.shape)
        self.chunk_shape = tuple(array.chunks)
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.compressed = any(isinstance(c, BloscCodec) for c in chunk_codecs)
        self.chunks_per_shard = chunks_per_shard  # None: unsharded
        self._indexes: dict[int, np.ndarray] = {}
        self._local = threading.local()

    @classmethod
    def of(cls, array: zarr.Array) -> "ChunkFileReader | None":
        """A reader for ``array``, or ``None`` when its store or codecs are not the layouts above."""
        store = array.store
        while isinstance(store, WrapperStore):  # e.g. a store that counts what is read
            store = store._store
        if not isinstance(store, LocalStore) or array.metadata.zarr_format != 3:
            return None
        if tuple(array.chunks[1:]) != tuple(array.shape[1:]):
            return None  # chunked along more than axis 0
        codecs = tuple(array.metadata.codecs)
        per_shard = None
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            index_ok = (shard.index_location == ShardingCodecIndexLocation.end
                        and [type(c) for c in shard.index_codecs] == [BytesCodec, Crc32cCodec])
            if not index_ok:
                return None
            codecs = tuple(shard.codecs)
            per_shard = array.shards[0] // array.chunks[0]
        if not codecs or not isinstance(codecs[0], BytesCodec) or codecs[0].endian.value != "little":
            return None
        if len(codecs) > 2 or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec)):
            return None
        return cls(Path(store.root) / array.path, array, codecs, per_shard)

    def n_rows(self, i: int) -> int:
        """Rows of chunk ``i`` inside the array (the last chunk may be cut short)."""
        return min(self.chunk_shape[0], self.shape[0] - i * self.chunk_shape[0])

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk ``i`` as ``[n_rows(i), *shape[1:]]`` in the array's dtype, decoded into ``out``
        (a C-contiguous array of the chunk shape and dtype, reused by the caller) if given.

        Raises:
            OSError: the file cannot be read.
            ValueError: the shard index fails its CRC-32C, or the chunk was never written or does
                not decode to the chunk's size, or ``out`` is not a chunk-shaped array.
        """
        if out is None:
            out = np.empty(self.chunk_shape, dtype=self.dtype)
        elif out.shape != self.chunk_shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.chunk_shape} {self.dtype} array")
        if self.chunks_per_shard is None:
            path, offset, nbytes = self.folder / self._key(i), 0, None
        else:
            shard, local = divmod(i, self.chunks_per_shard)
            offset, nbytes = self._index(shard)[local]
            if offset == _EMPTY:
                raise ValueError(f"chunk {i} was never written")
            path = self.folder / self._key(shard)
        raw = self._read_bytes(path, int(offset), None if nbytes is None else int(nbytes))
        nbytes = len(raw)
        # a Blosc 1 frame states its decoded size in header bytes 4-7 and its own size in 12-15
        size, frame = (int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[12:16], "little")) if self.compressed \
            else (nbytes, nbytes)
        if frame != nbytes:
            raise ValueError(f"chunk {i} holds {nbytes} bytes, its Blosc header says {frame}")
        if size != out.nbytes:
            raise ValueError(f"chunk {i} decodes to {size} bytes, expected {out.nbytes}")
        if self.compressed:
            blosc.decompress(raw, out)
        else:
            out.reshape(-1).view(np.uint8)[:] = raw
        return out[: self.n_rows(i)]

    def _read_bytes(self, path: Path, offset: int, nbytes: int | None) -> memoryview:
        """``nbytes`` bytes of ``path`` from ``offset`` (``None``: the whole file) into this thread's
        reusable buffer (fresh 5 MB buffers cost page faults). Every file read goes through here.

        Raises:
            ValueError: the file ends before ``offset + nbytes``.
        """
        with open(path, "rb") as f:
            if nbytes is None:
                nbytes = os.fstat(f.fileno()).st_size
            buf = getattr(self._local, "buf", None)
            if buf is None or buf.size < nbytes:
                buf = self._local.buf = np.empty(nbytes, np.uint8)
            raw = memoryview(buf[:nbytes])
            if os.preadv(f.fileno(), [raw], offset) != nbytes:
                raise ValueError(f"{path.name} is cut short")
        return raw

    def _key(self, i: int) -> str:
        return self.array.metadata.encode_chunk_key((i,) + (0,) * (len(self.shape) - 1))

    def _index(self, shard: int) -> np.ndarray:
        """Shard ``shard``'s ``[chunks_per_shard, 2]`` (offset, nbytes) table, checked and kept."""
        index = self._indexes.get(shard)
        if index is None:
            size = 16 * self.chunks_per_shard + 4
            path = self.folder / self._key(shard)
            tail = bytes(self._read_bytes(path, path.stat().st_size - size, size))
            if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
                raise ValueError(f"the index of shard {shard} fails its CRC-32C")
            index = np.frombuffer(tail[:-4], "<u8").reshape(self.chunks_per_shard, 2)
            self._indexes[shard] = index
        return index
