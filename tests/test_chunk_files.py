"""Direct chunk-file reads (pipeline.chunk_files): the same rows as were written, or zarr, or a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from pipeline.cache import ActivationCache, from_storage
from pipeline.chunk_files import ChunkFileReader
from pipeline.constants import TOKENS_ARRAY
from pipeline.errors import CacheError
from tests.conftest import write_synthetic_cache

HOOK = "blocks.0.hook_resid_post"


def _written(tmp_path, *, dtype="float16", compression="lz4", chunks_per_shard=2, n_seqs=37):
    """A cache of ``n_seqs`` sequences of 8 tokens (the last chunk is cut short) and what went into it."""
    rng = np.random.default_rng(7)
    acts = rng.normal(size=(n_seqs * 8, 12)).astype(np.float32)
    tokens = rng.integers(0, 30_000, size=(n_seqs, 8)).astype(np.int32)
    from pipeline.cache import CacheWriter, to_storage

    meta = {"model_name": "synthetic", "hook_names": [HOOK]}
    writer = CacheWriter.create_or_resume(tmp_path / "c", metadata=meta, d_in={HOOK: 12}, tokens=tokens, dtype=dtype,
                                          chunk_tokens=32, chunks_per_shard=chunks_per_shard, n_holdout_chunks=1,
                                          compression=compression)
    stored = to_storage(torch.from_numpy(acts), dtype, HOOK)
    for i in range(writer.layout.n_chunks):
        s, e = writer.layout.chunk_rows(i)
        writer.write_chunk(i, {HOOK: stored[s:e]})
    return writer.finalize({HOOK: {"mean": [0.0] * 12, "mean_norm": 1.0}}), from_storage(stored, dtype), tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
@pytest.mark.parametrize("chunks_per_shard", [1, 3])
def test_every_chunk_reads_back_the_rows_and_token_ids_written(tmp_path, dtype, compression, chunks_per_shard):
    cache, stored, tokens = _written(tmp_path, dtype=dtype, compression=compression, chunks_per_shard=chunks_per_shard)
    hook_key = cache.array(HOOK).path
    assert isinstance(cache._reader(hook_key), ChunkFileReader)  # the direct path is the one under test
    assert isinstance(cache._reader(TOKENS_ARRAY), ChunkFileReader)  # the unsharded layout
    n_chunks = cache.layout.n_chunks
    assert cache.layout.chunk_rows(n_chunks - 1)[1] - cache.layout.chunk_rows(n_chunks - 1)[0] == 8  # short last
    buffer = cache.chunk_buffer(HOOK)
    for i in range(n_chunks):
        s, e = cache.layout.chunk_rows(i)
        assert torch.equal(cache.read_chunk(HOOK, i, verify=True), stored[s:e])
        assert torch.equal(cache.read_chunk(HOOK, i, verify=True, out=buffer), stored[s:e])  # a reused buffer
        np.testing.assert_array_equal(cache.chunk_token_ids(i), tokens.reshape(-1)[s:e])


def test_zarr_reads_what_the_direct_path_cannot(tmp_path, id_cache):
    """URL caches, caches still being written and foreign codecs go through zarr, with the same rows."""
    url = ActivationCache.open(id_cache.path.as_uri())
    assert url._reader(url.array(HOOK).path) is None
    np.testing.assert_array_equal(url.read_chunk(HOOK, 3, verify=True).numpy(), id_cache.read_chunk(HOOK, 3).numpy())

    acts = np.arange(64 * 4 * 2, dtype=np.float32).reshape(-1, 2)
    partial = write_synthetic_cache(tmp_path / "partial", acts, np.zeros((16, 32), np.int32), stop_after_chunks=2)
    assert partial.cache._reader(partial.cache.array(HOOK).path) is None
    np.testing.assert_array_equal(partial.cache.read_chunk(HOOK, 1).numpy(), acts[64:128])

    gzip = zarr.create_array(str(tmp_path / "gzip"), shape=(10, 3), chunks=(4, 3), dtype="float32",
                             compressors=zarr.codecs.GzipCodec())
    assert ChunkFileReader.of(gzip) is None
    by_column = zarr.create_array(str(tmp_path / "cols"), shape=(10, 4), chunks=(4, 2), dtype="float32")
    assert ChunkFileReader.of(by_column) is None


def test_a_damaged_shard_index_or_a_cut_short_shard_is_named_as_damage(tmp_path):
    cache, _, _ = _written(tmp_path, chunks_per_shard=3)
    shard = tmp_path / "c" / HOOK / "c" / "1" / "0"  # chunks 3, 4, 5
    original = shard.read_bytes()
    damaged = bytearray(original)
    damaged[-10] ^= 0xFF  # inside the index (3 x 16 bytes, then its CRC-32C)
    shard.write_bytes(bytes(damaged))
    with pytest.raises(CacheError, match=r"damaged: chunk\(s\) \[4\].*cannot be decoded \(ValueError\)"):
        ActivationCache.open(tmp_path / "c").read_chunk(HOOK, 4)
    shard.write_bytes(original[: len(original) // 2] + original[-52:])  # the index survives, the data does not
    with pytest.raises(CacheError, match=r"damaged: chunk\(s\) \[5\]"):
        ActivationCache.open(tmp_path / "c").read_chunk(HOOK, 5)


def test_a_buffer_of_the_wrong_shape_is_refused(tmp_path):
    cache, _, _ = _written(tmp_path)
    reader = cache._reader(cache.array(HOOK).path)
    with pytest.raises(ValueError, match=r"C-contiguous \(32, 12\) float16"):
        reader.read(0, np.empty((32, 13), np.float16))


def test_damaged_token_ids_are_named_as_damage_not_read_as_ids(tmp_path):
    cache, _, _ = _written(tmp_path)
    token_chunk = tmp_path / "c" / TOKENS_ARRAY / "c" / "0" / "0"
    original = token_chunk.read_bytes()
    token_chunk.write_bytes(original[:20])  # the Blosc header survives, its frame does not
    with pytest.raises(CacheError, match=r"damaged: chunk\(s\) \[0\] of 'tokens' \(its token ids cannot be decoded"):
        ActivationCache.open(tmp_path / "c").chunk_token_ids(0)
    token_chunk.unlink()
    with pytest.raises(CacheError, match=r"chunk\(s\) \[0\] of 'tokens'"):
        ActivationCache.open(tmp_path / "c").chunk_token_ids(0)


def test_an_array_whose_dtype_was_edited_is_refused_on_open(tmp_path):
    import json

    _written(tmp_path)
    meta = tmp_path / "c" / HOOK / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "int16"
    meta.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match=f"array '{HOOK}' holds int16, the attributes say float16"):
        ActivationCache.open(tmp_path / "c")
