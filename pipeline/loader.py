"""Shuffled, prefetching batch loader over an activation cache.

How a batch is made:

1. Each epoch visits the training chunks in a fresh random order (seeded by ``(seed, epoch)``).
2. ``num_workers`` threads read, decompress and checksum chunks ahead of need
   (:mod:`pipeline.chunk_files`; file reads and Blosc release the GIL), into reused arrays.
3. Rows of many chunks collect in a shuffle buffer of ``shuffle_buffer_tokens`` rows. When it is
   full it is permuted and its first half is handed out as batches; the second half stays to mix
   with the next chunks. At the end of an epoch the buffer is flushed, so every kept row of the
   training chunks is served exactly once per epoch (the last partial batch carries over).
4. ``num_workers`` more threads gather each batch's rows and convert them to float32
   ``[batch, d_in]`` tensors (reusing the memory of batches nobody holds any more); a producer
   thread queues a few batches ahead; the consumer moves them to the training device.

Speed (``sae-pipeline bench --cases codecs``; BENCHMARKS.md, run 3): on 2 cores the loader serves
the anchor's float16 LZ4 cache (d_in 576) at 1.0M tokens/s once its buffer is full (0.74-1.01M over
development runs on a shared machine); filling the 262,144-row buffer before the first batch took
0.16 s.

Mixing: a batch draws from every sequence whose rows are in the buffer. When the buffer holds the
whole training set (262,144 rows by default: a 200K-token cache) a batch is as mixed as a uniform
shuffle of the cache; for larger caches it mixes ``shuffle_buffer_tokens / context_size`` sequences.

Rows whose token is special (BOS/EOS/padding; outliers in norm) are dropped when
``exclude_token_ids`` is given.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

from pipeline.cache import ActivationCache

_DONE = object()


class ActivationLoader:
    """Iterate shuffled ``[batch_size, d_in]`` float32 batches from ``cache`` at ``hook_name``.

    Args:
        cache: an open :class:`~pipeline.cache.ActivationCache`.
        hook_name: the cached hook to read (``None``: the cache's only hook).
        batch_size: rows (tokens) per batch.
        chunk_ids: chunks to serve (default: the cache's training chunks, holdout excluded).
        shuffle_buffer_tokens: rows held for mixing (memory: rows × d_in × stored bytes).
        seed: fixes chunk order and permutations; the same seed gives the same batches.
        num_workers: decompression threads.
        prefetch_batches: batches queued ahead of the consumer.
        exclude_token_ids: token ids whose rows are skipped (e.g. ``cache.special_token_ids``).
        device: where batches are delivered.

    Raises:
        CacheError: the hook is not in the cache.
        ValueError: no rows are left after exclusion, or the buffer cannot hold two batches.
    """

    def __init__(
        self,
        cache: ActivationCache,
        hook_name: str | None = None,
        *,
        batch_size: int = 4096,
        chunk_ids: Sequence[int] | None = None,
        shuffle_buffer_tokens: int = 262_144,
        seed: int = 0,
        num_workers: int = 2,
        prefetch_batches: int = 4,
        exclude_token_ids: Sequence[int] = (),
        device: str | torch.device = "cpu",
    ):
        self.cache = cache
        self.hook_name = cache.resolve_hook(hook_name)
        self.batch_size = batch_size
        self.chunk_ids = list(cache.train_chunks if chunk_ids is None else chunk_ids)
        self.buffer_rows = max(shuffle_buffer_tokens, 2 * batch_size)
        self.seed = seed
        self.num_workers = num_workers
        self.prefetch_batches = prefetch_batches
        self.exclude = np.asarray(sorted(exclude_token_ids), dtype=np.int64)
        self.device = torch.device(device)
        if not self.chunk_ids:
            raise ValueError("the loader was given no chunks to read; the cache may be all holdout.")

    @property
    def d_in(self) -> int:
        return self.cache.d_in_of(self.hook_name)

    def rows_per_epoch(self) -> int:
        """Rows served per epoch (training chunks, special tokens excluded)."""
        return sum(int(self._keep_mask(i).sum()) for i in self.chunk_ids)

    def _keep_mask(self, chunk: int) -> np.ndarray:
        if not self.exclude.size:  # nothing to drop: the token ids need not be read
            start, stop = self.cache.layout.chunk_rows(chunk)
            return np.ones(stop - start, dtype=bool)
        return ~np.isin(self.cache.chunk_token_ids(chunk), self.exclude)

    def _read(self, chunk: int, spare: queue.SimpleQueue) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray]:
        """Chunk ``chunk``'s rows, which to keep (``None``: all) and the array they were decoded
        into: a spare one (the shuffle buffer has copied out of it) when there is one."""
        try:
            out = spare.get_nowait()
        except queue.Empty:
            out = self.cache.chunk_buffer(self.hook_name)
        rows = self.cache.read_chunk(self.hook_name, chunk, verify=True, out=out)  # never train on garbage
        keep = self._keep_mask(chunk)
        return rows, None if keep.all() else keep, out

    def _chunk_stream(self) -> Iterator[tuple[int, int]]:
        """Endless ``(epoch, chunk_id)`` pairs, each epoch a fresh permutation."""
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.chunk_ids)
            for c in order:
                yield epoch, int(c)
            epoch += 1

    def _row_blocks(self, stop: threading.Event,
                    spare: queue.SimpleQueue) -> Iterator[tuple[int, tuple]]:
        """``(epoch, _read(chunk))`` in epoch order, read ``2 * num_workers`` chunks ahead on threads;
        the caller puts each block's array back on ``spare`` once it has copied the rows out."""
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="sae-loader") as pool:
            pending: deque = deque()
            stream = self._chunk_stream()
            while not stop.is_set():
                while len(pending) < 2 * self.num_workers:
                    epoch, c = next(stream)
                    pending.append((epoch, pool.submit(self._read, c, spare)))
                epoch, fut = pending.popleft()
                yield epoch, fut.result()
            for _, fut in pending:
                fut.cancel()

    def _batches_cpu(self, stop: threading.Event) -> Iterator[torch.Tensor]:
        """Shuffle-buffer logic (see module docstring); yields float32 CPU batches forever."""
        gen = torch.Generator().manual_seed(self.seed)
        buffer: _RowStore | None = None
        current_epoch = 0
        spare: queue.SimpleQueue = queue.SimpleQueue()
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="sae-loader-gather") as gather:
            for epoch, (rows, keep, decoded) in self._row_blocks(stop, spare):
                if buffer is None:  # it holds under buffer_rows before a chunk arrives, so one chunk more fits
                    capacity = self.buffer_rows + self.cache.layout.chunk_tokens
                    buffer = _RowStore(capacity, rows.shape[1], rows.dtype, gather, self.num_workers, self.batch_size)
                if epoch != current_epoch:  # flush the finished epoch entirely
                    yield from buffer.emit(gen, keep_fraction=0.0)
                    current_epoch = epoch
                buffer.add(rows, keep)
                spare.put(decoded)  # copied out: the next read may reuse it
                if buffer.n_rows >= self.buffer_rows:
                    yield from buffer.emit(gen, keep_fraction=0.5)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.batches()

    def batches(self, n_batches: int | None = None, skip: int = 0) -> Iterator[torch.Tensor]:
        """Yield ``n_batches`` batches (forever if ``None``), produced on a background thread.

        ``skip`` first discards that many batches of the same deterministic stream, so a run
        resumed after ``skip`` steps sees exactly the batches an uninterrupted run would.
        """
        q: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        errors: list[BaseException] = []

        def produce():
            try:
                for i, batch in enumerate(self._batches_cpu(stop)):
                    if i < skip:
                        continue
                    if n_batches is not None and i >= skip + n_batches:
                        break
                    while not stop.is_set():
                        try:
                            q.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        break
            except BaseException as e:  # re-raised in the consumer, which owns the error report
                errors.append(e)
            finally:
                stop.set()
                q.put(_DONE)

        thread = threading.Thread(target=produce, name="sae-loader-producer", daemon=True)
        thread.start()
        pin = self.device.type == "cuda"
        try:
            while True:
                batch = q.get()
                if batch is _DONE:
                    break
                yield (batch.pin_memory() if pin else batch).to(self.device, non_blocking=pin)
            if errors:
                raise errors[0]
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


class _RowStore:
    """The shuffle buffer: a fixed block of row slots that rows are copied into once, on arrival,
    and gathered out of once, as a batch (no concatenation or permuted copy of the whole buffer).

    ``filled[:n_rows]`` lists the occupied slots in arrival order (rows kept from the last emit
    first, then new chunks), so a permutation of it picks the same rows a permutation of the
    concatenated buffer would; ``free[:n_free]`` is a stack of the empty slots. Rows are numpy
    ``void`` records (one per row, any stored dtype) because numpy's row scatter and gather run
    about twice as fast as torch's ``index_copy_`` / ``index_select`` and release the GIL.

    Batches are gathered and converted to float32 on the ``gather`` pool of ``workers`` threads,
    ``workers + 1`` at a time, each into its own reused staging block (the serial thread only
    scatters arrivals).
    """

    def __init__(self, capacity: int, d_in: int, dtype: torch.dtype, gather: ThreadPoolExecutor, workers: int,
                 batch_size: int):
        self.dtype = dtype
        self.d_in = d_in
        self.record = np.dtype((np.void, d_in * dtype.itemsize))
        self.data = np.empty(capacity, self.record)
        self.free = np.arange(capacity, dtype=np.int64)
        self.n_free = capacity
        self.filled = np.empty(capacity, dtype=np.int64)
        self.n_rows = 0
        self.pool = gather
        self.batch_size = batch_size
        self.staging = [np.empty(batch_size, self.record) for _ in range(workers + 1)]
        self.outputs = _Recycler(limit=16)

    def add(self, rows: torch.Tensor, keep: np.ndarray | None = None) -> None:
        """Store ``rows`` ``[n, d_in]``; with a ``keep`` mask ``[n]`` the others are dropped."""
        n = rows.shape[0]
        if n > self.n_free:  # chunks larger than the buffer: the kept half outgrew the capacity
            self._grow(n - self.n_free)
        slots = self.free[self.n_free - n : self.n_free].copy()
        self.n_free -= n
        self.data[slots] = rows.contiguous().view(torch.uint8).numpy().view(self.record).reshape(n)
        if keep is not None:  # dropped rows were copied with the rest (one bulk copy); free them again
            self._push_free(slots[~keep])
            slots = slots[keep]
        self.filled[self.n_rows : self.n_rows + slots.size] = slots
        self.n_rows += slots.size

    def emit(self, gen: torch.Generator, keep_fraction: float) -> Iterator[torch.Tensor]:
        """Permute the rows, yield whole float32 batches from all but ``keep_fraction`` of them and
        keep the rest (a final partial batch stays for the next epoch)."""
        bs = self.batch_size
        order = self.filled[: self.n_rows][torch.randperm(self.n_rows, generator=gen).numpy()]
        n_out = int(self.n_rows * (1 - keep_fraction)) // bs * bs
        self.n_rows -= n_out
        self.filled[: self.n_rows] = order[n_out:]
        pending: deque = deque()
        for j, s in enumerate(range(0, n_out, bs)):
            # staging block j % len(staging) is free: the job that used it last has been yielded
            pending.append(self.pool.submit(self._gather, order[s : s + bs], self.staging[j % len(self.staging)]))
            if len(pending) == len(self.staging):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
        self._push_free(order[:n_out])

    def _gather(self, slots: np.ndarray, staging: np.ndarray) -> torch.Tensor:
        np.take(self.data, slots, out=staging, mode="clip")  # 'raise' would buffer a copy of the whole batch
        rows = torch.from_numpy(staging.view(np.uint8).reshape(len(slots), -1)).view(self.dtype)
        return self.outputs.take(rows.shape).copy_(rows)

    def _push_free(self, slots: np.ndarray) -> None:
        self.free[self.n_free : self.n_free + slots.size] = slots
        self.n_free += slots.size

    def _grow(self, extra: int) -> None:
        size = self.data.size
        self.data = np.concatenate([self.data, np.empty(extra, self.record)])
        self.filled = np.concatenate([self.filled, np.empty(extra, np.int64)])
        self.free = np.concatenate([self.free[: self.n_free], np.arange(size, size + extra), np.empty(size - self.n_free, np.int64)])
        self.n_free += extra


_use_count = getattr(torch._C, "_storage_Use_Count", None)  # torch's reference count of a storage


def _holders(block: torch.Tensor) -> tuple[int, int]:
    """``(tensors sharing block's memory, Python references to its storage object)``: the first
    counts views, ``.numpy()`` arrays and the like; a storage object kept on its own
    (``b.untyped_storage()``) does not raise it, so its own reference count is read too."""
    storage = block.untyped_storage()
    return _use_count(storage._cdata), sys.getrefcount(storage)


class _Recycler:
    """Float32 batch blocks, reused once nothing holds them any more.

    Each batch is handed out as a new view of a block kept here, so the block's holders (see
    :func:`_holders`: the tensors, views and arrays sharing its memory and the references to its
    storage object) tell whether anything can still read it: a batch the consumer keeps, or any part
    of it, is never overwritten. Reuse spares the ~2,300 page faults of each fresh 9 MB batch, which
    the kernel serialises across threads (measured: they cost the loader about a third of its
    speed). Without torch's count (another torch build) every batch is new.
    """

    def __init__(self, limit: int):
        self.blocks: list[tuple[torch.Tensor, tuple[int, int]]] = []  # (block, its holders when idle)
        self.limit = limit
        self.lock = threading.Lock()

    def take(self, shape: torch.Size) -> torch.Tensor:
        with self.lock:  # the view is made under the lock, so no other thread can pick the same block
            for block, idle in self.blocks:
                if block.shape == shape and _holders(block) == idle:
                    return block.view(shape)
            block = torch.empty(shape, dtype=torch.float32)
            if _use_count is not None and len(self.blocks) < self.limit:
                self.blocks.append((block, _holders(block)))
            return block.view(shape)
