"""The shuffled loader: exactly-once epochs, holdout and special-token exclusion, mixing, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.loader import ActivationLoader
from tests.conftest import write_synthetic_cache


def _ids(batches) -> np.ndarray:
    return np.concatenate([b[:, 0].numpy() for b in batches]).astype(np.int64)


def test_every_training_row_is_served_exactly_once_per_epoch(id_cache):
    # 640 rows, 10 chunks of 64, the last 2 held out: 512 training rows = 16 batches of 32 per epoch
    loader = ActivationLoader(id_cache, batch_size=32, shuffle_buffer_tokens=128, seed=1)
    assert loader.rows_per_epoch() == 512
    batches = list(loader.batches(32))
    assert all(b.shape == (32, 8) and b.dtype == torch.float32 for b in batches)
    for epoch in (batches[:16], batches[16:]):
        assert sorted(_ids(epoch).tolist()) == list(range(512))
    assert not np.array_equal(_ids(batches[:16]), _ids(batches[16:]))  # a fresh order each epoch


def test_holdout_chunks_are_never_served(id_cache):
    assert id_cache.holdout_chunks == [8, 9]
    ids = _ids(ActivationLoader(id_cache, batch_size=32, shuffle_buffer_tokens=64, seed=0).batches(40))
    assert ids.max() < 512


def test_special_token_rows_are_excluded(id_cache):
    # token id of row r is r % 50 + 10; excluding ids 10 and 11 drops rows r % 50 in {0, 1}
    loader = ActivationLoader(id_cache, batch_size=16, shuffle_buffer_tokens=64, seed=0, exclude_token_ids=[10, 11])
    expected = [r for r in range(512) if r % 50 not in (0, 1)]
    assert loader.rows_per_epoch() == len(expected)
    ids = _ids(loader.batches(len(expected) // 16))
    assert set(ids.tolist()) <= set(expected) and len(set(ids.tolist())) == len(ids)
    assert len(ids) == len(expected) // 16 * 16


def test_same_seed_same_batches_other_seed_other_batches(id_cache):
    def first(seed):
        return _ids(ActivationLoader(id_cache, batch_size=32, shuffle_buffer_tokens=128, seed=seed).batches(5))

    assert np.array_equal(first(3), first(3))
    assert not np.array_equal(first(3), first(4))


def test_batches_mix_nearly_as_many_sequences_as_a_uniform_shuffle(tmp_path):
    # 400 sequences of 32 tokens in 40 chunks; a 512-row batch of a uniform shuffle over the 12,800
    # rows touches 400 * (1 - (1 - 1/400) ** 512) ≈ 288.6 distinct sequences on average.
    n_seqs, ctx = 400, 32
    n = n_seqs * ctx
    acts = np.zeros((n, 2), dtype=np.float32)
    acts[:, 0] = np.arange(n)
    tokens = np.full((n_seqs, ctx), 5, dtype=np.int32)
    cache = write_synthetic_cache(tmp_path / "mix", acts, tokens, chunk_tokens=320, chunks_per_shard=4,
                                  n_holdout_chunks=0)
    uniform = n_seqs * (1 - (1 - 1 / n_seqs) ** 512)
    loader = ActivationLoader(cache, batch_size=512, shuffle_buffer_tokens=n, seed=0)
    distinct = [len(np.unique(_ids([b]) // ctx)) for b in loader.batches(20)]
    assert np.mean(distinct) >= 0.95 * uniform, (np.mean(distinct), uniform)
    # a naive loader reading chunks in order would see at most 2 chunks = 20 sequences per batch
    chunks_per_batch = [len(np.unique(_ids([b]) // 320)) for b in loader.batches(5)]
    assert min(chunks_per_batch) >= 30


def test_consumer_can_stop_early_without_hanging(id_cache):
    loader = ActivationLoader(id_cache, batch_size=16, shuffle_buffer_tokens=64, seed=0, prefetch_batches=1)
    it = loader.batches()
    next(it)
    it.close()  # must return promptly: the producer thread is told to stop


def test_loader_needs_chunks(id_cache):
    with pytest.raises(ValueError, match="no chunks"):
        ActivationLoader(id_cache, chunk_ids=[])


def test_a_cache_copied_to_an_fsspec_memory_filesystem_serves_the_batches_of_its_folder(id_cache):
    import uuid

    import fsspec
    from zarr.storage import FsspecStore

    from pipeline.cache import ActivationCache

    memory, root = fsspec.filesystem("memory"), f"/{uuid.uuid4().hex}"
    memory.put(str(id_cache.path), f"{root}/ids", recursive=True)
    try:
        remote = ActivationCache.open(f"memory://{root}/ids")
        assert isinstance(remote.group.store, FsspecStore)
        settings = dict(batch_size=32, shuffle_buffer_tokens=128, seed=3, exclude_token_ids=[10, 11], num_workers=2)
        local_batches = list(ActivationLoader(id_cache, **settings).batches(24))
        remote_batches = list(ActivationLoader(remote, **settings).batches(24))
    finally:
        memory.rm(root, recursive=True)
    assert all(torch.equal(a, b) for a, b in zip(local_batches, remote_batches, strict=True))
    # and they are the rows the cache holds: token of row r is r % 50 + 10, ids 10 and 11 left out
    expected = {r for r in range(512) if r % 50 not in (0, 1)}
    ids = _ids(remote_batches[: len(expected) // 32])
    assert set(ids.tolist()) <= expected and len(set(ids.tolist())) == len(ids)


def test_batches_kept_by_the_consumer_are_never_overwritten(id_cache):
    """Batch memory is reused only once nothing aliases it: kept batches, views and arrays stay intact."""
    settings = dict(batch_size=32, shuffle_buffer_tokens=128, seed=5, prefetch_batches=1, num_workers=1)
    expected = [b.clone() for b in ActivationLoader(id_cache, **settings).batches(60)]
    kept, views, arrays, storages, addresses = [], [], [], [], set()
    for i, b in enumerate(ActivationLoader(id_cache, **settings).batches(60)):
        assert torch.equal(b, expected[i])
        addresses.add(b.data_ptr())
        if i % 5 == 0:
            kept.append((i, b))
        elif i % 5 == 1:
            views.append((i, b[1:5]))
        elif i % 5 == 2:
            arrays.append((i, b.numpy()))
        elif i % 5 == 3:
            storages.append((i, b.untyped_storage()))
        del b  # every 5th batch is dropped: its memory may serve a later batch
    assert len(addresses) < 60  # memory was reused...
    for i, b in kept:
        assert torch.equal(b, expected[i])
    for i, v in views:
        assert torch.equal(v, expected[i][1:5])
    for i, a in arrays:  # ...but never while anything could still read it
        np.testing.assert_array_equal(a, expected[i].numpy())
    for i, storage in storages:
        assert torch.equal(torch.tensor([], dtype=torch.float32).set_(storage).view(expected[i].shape), expected[i])


def test_a_shuffle_buffer_smaller_than_a_chunk_grows_and_still_serves_each_row_once_per_epoch(id_cache):
    # 64-row chunks into a 32-row buffer: the kept half plus the next chunk outgrows the first capacity
    loader = ActivationLoader(id_cache, batch_size=16, shuffle_buffer_tokens=16, seed=1)
    assert loader.buffer_rows == 32 < id_cache.layout.chunk_tokens
    ids = _ids(loader.batches(64))
    assert sorted(ids[:512].tolist()) == list(range(512)) and sorted(ids[512:].tolist()) == list(range(512))
