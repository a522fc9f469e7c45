"""Shuffled, prefetching batch loader over an activation cache.

How a batch is made:

1. Each epoch visits the training chunks in a fresh random order (seeded by ``(seed, epoch)``).
2. Background threads read and decompress chunks ahead of need (Blosc/Zstd release the GIL).
3. Rows of many chunks collect in a shuffle buffer of ``shuffle_buffer_tokens`` rows. When it is
   full it is permuted and its first half is handed out as batches; the second half stays to mix
   with the next chunks. At the end of an epoch the buffer is flushed, so every kept row of the
   training chunks is served exactly once per epoch (the last partial batch carries over).
4. A producer thread turns rows into float32 ``[batch, d_in]`` tensors and queues a few batches
   ahead; the consumer moves them to the training device.

Mixing: a batch draws from every sequence whose rows are in the buffer. When the buffer holds the
whole training set (262,144 rows by default: a 200K-token cache) a batch is as mixed as a uniform
shuffle of the cache; for larger caches it mixes ``shuffle_buffer_tokens / context_size`` sequences.

Rows whose token is special (BOS/EOS/padding; outliers in norm) are dropped when
``exclude_token_ids`` is given.
"""

from __future__ import annotations

import queue
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
        ids = self.cache.chunk_token_ids(chunk)
        return ~np.isin(ids, self.exclude) if self.exclude.size else np.ones(ids.shape, dtype=bool)

    def _read(self, chunk: int) -> torch.Tensor:
        rows = self.cache.read_chunk(self.hook_name, chunk, verify=True)  # never train on garbage
        keep = self._keep_mask(chunk)
        return rows if keep.all() else rows[torch.from_numpy(keep)]

    def _chunk_stream(self) -> Iterator[tuple[int, int]]:
        """Endless ``(epoch, chunk_id)`` pairs, each epoch a fresh permutation."""
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.chunk_ids)
            for c in order:
                yield epoch, int(c)
            epoch += 1

    def _row_blocks(self, stop: threading.Event) -> Iterator[tuple[int, torch.Tensor]]:
        """``(epoch, rows)`` in epoch order, read ``2 * num_workers`` chunks ahead on threads."""
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="sae-loader") as pool:
            pending: deque = deque()
            stream = self._chunk_stream()
            while not stop.is_set():
                while len(pending) < 2 * self.num_workers:
                    epoch, c = next(stream)
                    pending.append((epoch, pool.submit(self._read, c)))
                epoch, fut = pending.popleft()
                yield epoch, fut.result()
            for _, fut in pending:
                fut.cancel()

    def _batches_cpu(self, stop: threading.Event) -> Iterator[torch.Tensor]:
        """Shuffle-buffer logic (see module docstring); yields float32 CPU batches forever."""
        gen = torch.Generator().manual_seed(self.seed)
        buffer: _RowStore | None = None
        current_epoch = 0
        for epoch, rows in self._row_blocks(stop):
            if buffer is None:  # it holds under buffer_rows before a chunk arrives, so one chunk more fits
                buffer = _RowStore(self.buffer_rows + self.cache.layout.chunk_tokens, rows.shape[1], rows.dtype)
            if epoch != current_epoch:  # flush the finished epoch entirely
                yield from buffer.emit(gen, self.batch_size, keep_fraction=0.0)
                current_epoch = epoch
            buffer.add(rows)
            if buffer.n_rows >= self.buffer_rows:
                yield from buffer.emit(gen, self.batch_size, keep_fraction=0.5)

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

    ``filled`` lists the occupied slots in arrival order (rows kept from the last emit first, then
    new chunks), so a permutation of it picks the same rows a permutation of the concatenated
    buffer would.
    """

    def __init__(self, capacity: int, d_in: int, dtype: torch.dtype):
        self.data = torch.empty(capacity, d_in, dtype=dtype)
        self.free = torch.arange(capacity)
        self.filled = torch.empty(0, dtype=torch.int64)

    @property
    def n_rows(self) -> int:
        return self.filled.numel()

    def add(self, rows: torch.Tensor) -> None:
        short = rows.shape[0] - self.free.numel()
        if short > 0:  # chunks larger than the buffer: the kept half outgrew the initial capacity
            size = self.data.shape[0]
            self.data = torch.cat([self.data, self.data.new_empty(short, self.data.shape[1])])
            self.free = torch.cat([self.free, torch.arange(size, size + short)])
        slots, self.free = self.free[: rows.shape[0]], self.free[rows.shape[0]:]
        self.data.index_copy_(0, slots, rows)
        self.filled = torch.cat([self.filled, slots])

    def emit(self, gen: torch.Generator, batch_size: int, keep_fraction: float) -> Iterator[torch.Tensor]:
        """Permute the rows, yield whole float32 batches from all but ``keep_fraction`` of them and
        keep the rest (a final partial batch stays for the next epoch)."""
        order = self.filled[torch.randperm(self.n_rows, generator=gen)]
        n_out = int(self.n_rows * (1 - keep_fraction)) // batch_size * batch_size
        self.filled = order[n_out:]
        for s in range(0, n_out, batch_size):
            yield self.data.index_select(0, order[s : s + batch_size]).float()
        self.free = torch.cat([self.free, order[:n_out]])
