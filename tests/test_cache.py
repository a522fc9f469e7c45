"""Cache layout, round trip, resume and refusal (mechanics on synthetic rows; real harvest in test_harvest)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cache import ActivationCache, CacheWriter, compute_statistics, from_storage, to_storage, verify
from pipeline.errors import CacheError
from tests.conftest import write_synthetic_cache

HOOK = "blocks.0.hook_resid_post"


def _data(n_seqs=12, ctx=8, d_in=6, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    acts = (rng.normal(size=(n_seqs * ctx, d_in)) * scale).astype(np.float32)
    tokens = rng.integers(0, 100, size=(n_seqs, ctx)).astype(np.int32)
    return acts, tokens


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_is_bit_exact_in_the_stored_dtype(tmp_path, dtype):
    acts, tokens = _data()
    cache = write_synthetic_cache(tmp_path / "c", acts, tokens, dtype=dtype, chunk_tokens=16)
    expected = torch.from_numpy(acts).to({"float16": torch.float16, "bfloat16": torch.bfloat16,
                                          "float32": torch.float32}[dtype])
    got = torch.cat([cache.read_chunk(HOOK, i) for i in range(cache.layout.n_chunks)])
    assert got.dtype == expected.dtype
    assert torch.equal(got.view(torch.int16 if dtype != "float32" else torch.int32),
                       expected.view(torch.int16 if dtype != "float32" else torch.int32))
    assert np.array_equal(np.asarray(cache.tokens[:]), tokens)
    assert cache.layout.n_chunks == 6 and cache.complete


def test_chunk_token_ids_align_with_rows(tmp_path):
    acts, tokens = _data()
    cache = write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    assert np.array_equal(cache.chunk_token_ids(2), tokens[4:6].reshape(-1))


def test_to_storage_refuses_float16_overflow_naming_hook_and_max():
    acts = torch.tensor([[1.0, 70000.0]])
    with pytest.raises(CacheError, match=r"blocks\.3\.hook_resid_post.*7e\+04.*bfloat16"):
        to_storage(acts, "float16", "blocks.3.hook_resid_post")
    assert from_storage(to_storage(acts, "bfloat16", "h"), "bfloat16").float()[0, 1].item() == 70144.0


def test_interrupted_write_resumes_to_the_same_content(tmp_path):
    acts, tokens = _data(n_seqs=20)
    write_synthetic_cache(tmp_path / "a", acts, tokens, dtype="float16", chunk_tokens=16, stop_after_chunks=4)
    with pytest.raises(CacheError, match="interrupted.*resume"):
        ActivationCache.open(tmp_path / "a")
    partial = ActivationCache.open(tmp_path / "a", require_complete=False)
    assert partial.n_chunks_written == 4 and not partial.complete
    (tmp_path / "a" / HOOK / "c" / "junk.partial").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "a" / HOOK / "c" / "junk.partial").write_bytes(b"half")
    resumed = write_synthetic_cache(tmp_path / "a", acts, tokens, dtype="float16", chunk_tokens=16)
    whole = write_synthetic_cache(tmp_path / "b", acts, tokens, dtype="float16", chunk_tokens=16)
    assert np.array_equal(resumed.array(HOOK)[:], whole.array(HOOK)[:])
    assert not list((tmp_path / "a").rglob("*.partial"))


def test_a_different_harvest_at_the_same_path_is_refused_and_nothing_changes(tmp_path):
    acts, tokens = _data()
    write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    with pytest.raises(CacheError, match="different harvest.*tokens_sha256.*--overwrite"):
        write_synthetic_cache(tmp_path / "c", acts, tokens[::-1].copy(), chunk_tokens=16)
    after = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert before == after


def test_open_refuses_missing_and_foreign_folders(tmp_path):
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationCache.open(tmp_path / "nope")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                              "attributes": {}}))
    with pytest.raises(CacheError, match="not a sae-pipeline activation cache"):
        ActivationCache.open(tmp_path / "other")


def test_write_out_of_order_is_refused(tmp_path):
    acts, tokens = _data()
    writer = write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16, stop_after_chunks=1)
    assert isinstance(writer, CacheWriter)
    with pytest.raises(CacheError, match="out of order"):
        writer.write_chunk(3, {HOOK: acts[48:64]})


def test_statistics_with_dask_match_numpy_and_exclude_special_tokens(tmp_path):
    acts, tokens = _data(n_seqs=10, d_in=5)
    tokens[:, 0] = 1  # a "BOS" column to exclude
    cache = write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    stats = compute_statistics(cache, HOOK, exclude_token_ids=[1])
    keep = tokens.reshape(-1) != 1
    np.testing.assert_allclose(stats["mean"], acts[keep].astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(acts[keep].astype(np.float64), axis=1).mean(),
                               rtol=1e-10)
    assert stats["n_rows"] == keep.sum()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_other_files_is_never_replaced(tmp_path, overwrite):
    acts, tokens = _data()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CacheError, match="not an activation cache; nothing was changed"):
        CacheWriter.create_or_resume(tmp_path / "mine", metadata={}, d_in={HOOK: 6}, tokens=tokens, dtype="float16",
                                     chunk_tokens=16, chunks_per_shard=2, n_holdout_chunks=1, overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CacheError, match="is a file"):
        CacheWriter.create_or_resume(tmp_path / "afile", metadata={}, d_in={HOOK: 6}, tokens=tokens, dtype="float16",
                                     chunk_tokens=16, chunks_per_shard=2, n_holdout_chunks=1, overwrite=overwrite)


def test_overwrite_replaces_a_different_cache(tmp_path):
    acts, tokens = _data()
    write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    writer = CacheWriter.create_or_resume(tmp_path / "c", metadata={}, d_in={HOOK: 6}, tokens=tokens[:4],
                                          dtype="float16", chunk_tokens=16, chunks_per_shard=2, n_holdout_chunks=1,
                                          overwrite=True)
    assert writer.layout.n_seqs == 4 and writer.n_chunks_written == 0


def _shard_files(path):
    return sorted(p for p in (path / HOOK / "c").rglob("*") if p.is_file())


def test_verify_names_the_damaged_chunk_every_time(tmp_path):
    acts, tokens = _data(n_seqs=32, d_in=16)
    cache = write_synthetic_cache(tmp_path / "c", acts, tokens, dtype="float16", chunk_tokens=16)
    assert verify(cache, progress=False) == {}
    rng = np.random.default_rng(0)
    for trial in range(10):
        # one shard file holds 2 chunks of 16 rows; flip one byte inside a chunk's compressed data
        shard = _shard_files(tmp_path / "c")[trial % 8]
        original = shard.read_bytes()
        damaged = bytearray(original)
        offset = int(rng.integers(16, len(original) - 2 * 16 - 4))  # keep clear of the shard index
        damaged[offset] ^= 0xFF
        shard.write_bytes(bytes(damaged))
        found = verify(ActivationCache.open(tmp_path / "c"), progress=False)
        shard_id = int(shard.parent.name)  # shards live at c/<row>/<column>
        assert found and set(found) == {HOOK}, (trial, found)
        assert set(found[HOOK]) <= {2 * shard_id, 2 * shard_id + 1}
        shard.write_bytes(original)
    assert verify(ActivationCache.open(tmp_path / "c"), progress=False) == {}


def test_reading_a_damaged_chunk_for_training_stops_with_the_report(tmp_path):
    from pipeline.loader import ActivationLoader

    acts, tokens = _data(n_seqs=32, d_in=16)
    write_synthetic_cache(tmp_path / "c", acts, tokens, dtype="float32", chunk_tokens=16, n_holdout_chunks=0)
    shard = _shard_files(tmp_path / "c")[3]
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x01
    shard.write_bytes(bytes(data))
    loader = ActivationLoader(ActivationCache.open(tmp_path / "c"), batch_size=16, shuffle_buffer_tokens=64)
    with pytest.raises(CacheError, match=r"damaged: chunk\(s\) \[[67]\].*cache verify"):
        list(loader.batches(40))


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    import os
    import socket

    from pipeline.cache import writer_lock

    with writer_lock(tmp_path / "c"):
        with pytest.raises(CacheError, match=rf"being written by pid {os.getpid()} on {socket.gethostname()}.*--break-lock"):
            with writer_lock(tmp_path / "c"):
                pass
        with writer_lock(tmp_path / "c", break_lock=True):  # explicit take-over
            pass
    assert not (tmp_path / "c.lock").exists()


def test_a_stale_lock_of_a_dead_process_is_removed(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from pipeline.cache import writer_lock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "c.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "x"}))
    with writer_lock(tmp_path / "c"):
        assert json.loads((tmp_path / "c.lock").read_text())["pid"] != int(dead.stdout)
    assert "no longer runs" in capsys.readouterr().out
    (tmp_path / "c.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(CacheError, match="on elsewhere"):
        with writer_lock(tmp_path / "c"):
            pass


def test_training_on_a_cache_still_being_written_names_the_writer(tmp_path):
    import os

    from pipeline.cache import writer_lock

    acts, tokens = _data()
    with writer_lock(tmp_path / "c"):
        write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16, stop_after_chunks=2)
        with pytest.raises(CacheError, match=rf"still being written by pid {os.getpid()}.*2/6 chunks"):
            ActivationCache.open(tmp_path / "c")
    with pytest.raises(CacheError, match="interrupted"):
        ActivationCache.open(tmp_path / "c")


def test_a_cache_of_another_format_version_is_refused_with_the_fix(tmp_path):
    acts, tokens = _data()
    write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    meta = json.loads((tmp_path / "c" / "zarr.json").read_text())
    meta["attributes"]["format_version"] = 1
    (tmp_path / "c" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(CacheError, match="format version 1.*re-harvest.*--overwrite"):
        ActivationCache.open(tmp_path / "c")
