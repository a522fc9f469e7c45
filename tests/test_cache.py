"""Cache layout, round trip, resume and refusal (mechanics on synthetic rows; real harvest in test_harvest)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import ActivationCache, CacheWriter, compute_statistics, from_storage, to_storage, verify
from pipeline.errors import CacheError
from tests.conftest import write_synthetic_cache

HOOK = "blocks.0.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


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


# A process that takes the writer lock of argv[1], says so, and holds it until its stdin closes.
_CONTENDER = """
import sys
from pipeline.cache import writer_lock
from pipeline.errors import CacheError
try:
    with writer_lock(sys.argv[1]):
        print("won", flush=True)
        sys.stdin.readline()
except CacheError as err:
    print("refused", err, flush=True)
"""


def _contender(path):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _CONTENDER, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)


def _outcome(contender) -> str:
    """``won`` or ``refused``: the first such line it prints (a winner may print a note first)."""
    for line in contender.stdout:
        if line.startswith(("won", "refused")):
            return line.split()[0]
    return "exited"


def test_a_second_writer_is_refused_naming_the_first_even_with_break_lock(tmp_path):
    import socket

    from pipeline.cache import lock_state, writer_lock
    from pipeline.config import HarvestConfig
    from pipeline.harvest import harvest

    holder = _contender(tmp_path / "c")
    try:
        assert _outcome(holder) == "won"
        assert lock_state(tmp_path / "c") == ("running", {**lock_state(tmp_path / "c")[1], "pid": holder.pid,
                                                          "host": socket.gethostname()})
        for break_lock in (False, True):  # a held flock is a live writer: never taken over
            with pytest.raises(CacheError, match=rf"being written by pid {holder.pid} on {socket.gethostname()}"
                                                 r".*held by a running process"):
                with writer_lock(tmp_path / "c", break_lock=break_lock):
                    pass
        # the harvest itself is refused before it loads anything or touches the folder
        with pytest.raises(CacheError, match=rf"pid {holder.pid}"):
            harvest(HarvestConfig(output_path=str(tmp_path / "c"), break_lock=True))
        assert not (tmp_path / "c").exists()
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (tmp_path / "c.lock").exists()


def test_a_killed_writers_lock_is_detected_as_stale_and_taken_over(tmp_path, capsys):
    import signal

    from pipeline.cache import lock_state, writer_lock

    holder = _contender(tmp_path / "c")
    assert _outcome(holder) == "won"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    state, who = lock_state(tmp_path / "c")
    assert (state, who["pid"]) == ("stale", holder.pid)  # the file is still there, its flock died with it
    with writer_lock(tmp_path / "c"):
        assert lock_state(tmp_path / "c")[1]["pid"] == os.getpid()
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().out
    assert lock_state(tmp_path / "c") == ("none", {})


def test_a_lock_from_another_host_is_refused_unless_broken_explicitly(tmp_path, capsys):
    from pipeline.cache import lock_state, writer_lock

    (tmp_path / "c.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    assert lock_state(tmp_path / "c")[0] == "unknown"
    with pytest.raises(CacheError, match="pid 1 on elsewhere.*another machine.*--break-lock"):
        with writer_lock(tmp_path / "c"):
            pass
    with writer_lock(tmp_path / "c", break_lock=True):
        assert lock_state(tmp_path / "c")[0] == "running"
    assert "taking over the lock of pid 1 on elsewhere, as asked" in capsys.readouterr().out


def test_writers_racing_for_one_stale_lock_never_both_win(tmp_path):
    # a stale lock of this host (a pid that has exited), found by three writers starting together:
    # under the flock exactly one takes it over and the others are refused while it holds it
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "c.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                 "started": "x"}))
    contenders = [_contender(tmp_path / "c") for _ in range(3)]
    try:
        outcomes = [_outcome(c) for c in contenders]
        assert sorted(outcomes) == ["refused"] * 2 + ["won"], outcomes
    finally:
        for c in contenders:
            c.communicate("")


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
    for damaged in ([], {"v": 3}, "3", True):  # an unhashable value raised TypeError (found by test_properties)
        meta["attributes"]["format_version"] = damaged
        (tmp_path / "c" / "zarr.json").write_text(json.dumps(meta))
        with pytest.raises(CacheError, match="format version .*re-harvest"):
            ActivationCache.open(tmp_path / "c")


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("n_seqs, chunks_per_shard, first_chunk, n_ranges", [
    (21, 2, 0, 2),   # 11 chunks (the last one short), 6 shards (the last one short)
    (21, 3, 0, 8),   # more ranges asked for than there are shards
    (21, 3, 4, 2),   # resuming inside shard 1
    (32, 4, 0, 3),   # shards that do not split evenly
])
def test_shard_ranges_never_share_a_shard_file(tmp_path, n_seqs, chunks_per_shard, first_chunk, n_ranges):
    """Each range's chunks are written alone into an empty cache and the files zarr creates are
    collected: no file may be written by two ranges, and together they cover the chunks to do."""
    acts, tokens = _data(n_seqs=n_seqs)  # 8 tokens per sequence, 2 sequences per 16-row chunk
    writer = CacheWriter.create_or_resume(tmp_path / "c", metadata={}, d_in={HOOK: 6}, tokens=tokens,
                                          dtype="float32", chunk_tokens=16, chunks_per_shard=chunks_per_shard,
                                          n_holdout_chunks=1)
    layout = writer.layout
    ranges = layout.shard_ranges(first_chunk, n_ranges)
    assert [c for a, b in ranges for c in range(a, b)] == list(range(first_chunk, layout.n_chunks))
    assert len(ranges) == min(n_ranges, -(-layout.n_chunks // chunks_per_shard) - first_chunk // chunks_per_shard)
    owner: dict[str, int] = {}
    for r, (a, b) in enumerate(ranges):
        before = _files(tmp_path / "c" / HOOK)
        for i in range(a, b):
            s, e = layout.chunk_rows(i)
            writer.write_chunk_data(i, {HOOK: acts[s:e]})
        after = _files(tmp_path / "c" / HOOK)
        written = {name for name, data in after.items() if before.get(name) != data}
        assert written, (a, b)
        for name in written:
            assert name not in owner, f"shard file {name} written by ranges {owner[name]} and {r}"
            owner[name] = r
    stored = np.asarray(writer.group[HOOK][:])
    first_row = layout.chunk_rows(first_chunk)[0]
    assert np.array_equal(stored[first_row:], acts[first_row:])


def test_chunks_recorded_out_of_order_count_once_the_gap_is_filled(tmp_path):
    from pipeline.cache import chunk_checksum

    acts, tokens = _data(n_seqs=12)
    writer = CacheWriter.create_or_resume(tmp_path / "c", metadata={}, d_in={HOOK: 6}, tokens=tokens, dtype="float32",
                                          chunk_tokens=16, chunks_per_shard=2, n_holdout_chunks=1)
    crcs = {}
    for i in range(writer.layout.n_chunks):
        s, e = writer.layout.chunk_rows(i)
        crcs[i] = writer.write_chunk_data(i, {HOOK: acts[s:e]})
        assert crcs[i] == {HOOK: chunk_checksum(acts[s:e])}
    writer.record_chunks({i: crcs[i] for i in (4, 5)})  # the last shard's range returned first
    assert ActivationCache.open(tmp_path / "c", require_complete=False).n_chunks_written == 0
    writer.record_chunks({i: crcs[i] for i in (0, 1)})
    assert ActivationCache.open(tmp_path / "c", require_complete=False).n_chunks_written == 2
    writer.record_chunks({i: crcs[i] for i in (2, 3)})
    cache = writer.finalize({HOOK: {"mean": [0.0] * 6, "mean_norm": 1.0}})
    assert cache.complete and verify(cache, progress=False) == {}


@pytest.mark.parametrize("code, fix", [(errno.EROFS, "the filesystem is read-only: make it writable"),
                                       (errno.EACCES, "make the folder writable for this user")])
def test_an_unwritable_output_stops_with_the_fix_and_leaves_nothing_half_made(tmp_path, monkeypatch, code, fix):
    import zarr.storage._local as local

    from pipeline.cache import building_path
    from pipeline.errors import CacheWriteError

    def refuse(path, value, exclusive=False):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(local, "_put", refuse)
    acts, tokens = _data()
    with pytest.raises(CacheWriteError, match=rf"cannot write the empty arrays of the cache at '{tmp_path / 'c'}': "
                                              rf"{os.strerror(code)} \({errno.errorcode[code]} at .*Fix: {fix}"):
        write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    assert not (tmp_path / "c").exists() and not building_path(tmp_path / "c").exists()


def test_a_lock_that_cannot_be_created_is_a_write_error_naming_the_path(tmp_path):
    from pipeline.cache import writer_lock
    from pipeline.errors import CacheWriteError

    (tmp_path / "afile").write_text("x")  # the cache's parent folder is a file: nothing can be created in it
    cache = tmp_path / "afile" / "c"
    with pytest.raises(CacheWriteError, match=rf"cannot write the writer lock of the cache at '{cache}'"):
        with writer_lock(cache):
            pass


def test_cache_info_shows_a_stale_lock_and_its_writer(tmp_path):
    import socket
    import subprocess
    import sys

    from click.testing import CliRunner

    from stages.cli import cli

    acts, tokens = _data()
    write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16, stop_after_chunks=2)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "c.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                 "started": "2026-01-02 03:04:05"}))
    out = CliRunner().invoke(cli, ["cache", "info", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    assert (f"writer lock: pid {int(dead.stdout)} on {socket.gethostname()} since 2026-01-02 03:04:05 (its writer "
            "no longer runs: the next harvest into it takes the lock over)") in out.output


@pytest.mark.parametrize("compression", ["lz4", "zstd", "none"])
def test_each_compression_round_trips_and_records_crc32c_checksums(tmp_path, compression):
    import google_crc32c

    from pipeline.cache import CacheWriter

    rng = np.random.default_rng(3)
    acts = rng.normal(size=(256, 8)).astype(np.float32)
    tokens = np.arange(256, dtype=np.int32).reshape(8, 32)
    meta = {"model_name": "synthetic", "hook_names": [HOOK]}
    writer = CacheWriter.create_or_resume(tmp_path / "c", metadata=meta, d_in={HOOK: 8}, tokens=tokens,
                                          dtype="float32", chunk_tokens=64, chunks_per_shard=2, n_holdout_chunks=1,
                                          compression=compression)
    for i in range(4):
        writer.write_chunk(i, {HOOK: acts[i * 64:(i + 1) * 64]})
    cache = writer.finalize({HOOK: {"mean": [0.0] * 8, "mean_norm": 1.0}})
    assert cache.attrs["compression"] == compression and cache.checksum_algorithm == "crc32c"
    np.testing.assert_array_equal(cache.array(HOOK)[:], acts)
    for i in range(4):  # CRC-32C of each chunk's raw little-endian bytes, computed here independently
        assert cache.recorded_checksum(HOOK, i) == google_crc32c.value(acts[i * 64:(i + 1) * 64].tobytes())
    assert verify(cache, progress=False) == {}


def test_a_format_2_cache_is_still_read_and_verified_with_crc32(tmp_path):
    import zlib

    import zarr

    acts = np.random.default_rng(4).normal(size=(256, 8)).astype(np.float32)
    write_synthetic_cache(tmp_path / "c", acts, np.zeros((8, 32), np.int32))
    group = zarr.open_group(str(tmp_path / "c"), mode="r+")  # what sae-pipeline wrote before format 3
    group.attrs["format_version"] = 2
    group[f"checksums/{HOOK}"][:] = [zlib.crc32(acts[i * 64:(i + 1) * 64].tobytes()) for i in range(4)]
    old = ActivationCache.open(tmp_path / "c")
    assert old.checksum_algorithm == "crc32" and verify(old, progress=False) == {}
    np.testing.assert_array_equal(old.read_chunk(HOOK, 2, verify=True).numpy(), acts[128:192])


def test_an_unknown_compression_is_refused_naming_the_choices(tmp_path):
    from pipeline.cache import activation_compressor

    with pytest.raises(CacheError, match="lz4, zstd, none.*'gzip'"):
        activation_compressor("gzip")


# ------------------------------------------------------------------------------------- caches read by URL
def test_a_cache_opened_by_file_url_reads_the_chunks_tokens_and_checksums_of_its_folder(id_cache):
    import google_crc32c
    from zarr.storage import FsspecStore, LocalStore

    from pipeline.training import cache_identity

    url = id_cache.path.as_uri()
    assert url.startswith("file:///")
    remote = ActivationCache.open(url)
    # the URL is read through fsspec; the folder keeps zarr's local store
    assert isinstance(remote.group.store, FsspecStore) and isinstance(id_cache.group.store, LocalStore)
    assert remote.path == url and remote.attrs == id_cache.attrs
    for i in range(remote.layout.n_chunks):
        rows = remote.read_chunk(HOOK, i, verify=True)
        assert torch.equal(rows, id_cache.read_chunk(HOOK, i))
        assert np.array_equal(rows[:, 0].numpy(), np.arange(64 * i, 64 * (i + 1)))  # id_cache: row r holds r
        assert remote.recorded_checksum(HOOK, i) == google_crc32c.value(rows.numpy().tobytes())
    expected_tokens = np.arange(640).reshape(40, 16) % 50 + 10
    assert np.array_equal(np.asarray(remote.tokens[:]), expected_tokens)
    assert remote.statistics(HOOK) == id_cache.statistics(HOOK)
    assert verify(remote, progress=False) == {}
    assert cache_identity(remote, HOOK) == cache_identity(id_cache, HOOK)


def test_a_damaged_chunk_of_a_cache_read_by_url_is_named(tmp_path):
    acts, tokens = _data(n_seqs=32, d_in=16)
    write_synthetic_cache(tmp_path / "c", acts, tokens, dtype="float32", chunk_tokens=16, n_holdout_chunks=0)
    shard = _shard_files(tmp_path / "c")[3]  # chunks 6 and 7
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x01
    shard.write_bytes(bytes(data))
    url = (tmp_path / "c").as_uri()
    found = verify(ActivationCache.open(url), progress=False)
    assert set(found) == {HOOK} and len(found[HOOK]) == 1 and found[HOOK][0] in (6, 7)
    with pytest.raises(CacheError, match=rf"the cache at '{url}' is damaged: chunk\(s\) \[{found[HOOK][0]}\]"):
        ActivationCache.open(url).read_chunk(HOOK, found[HOOK][0], verify=True)


def test_a_missing_or_unreadable_url_is_refused_naming_it_and_the_fix(tmp_path):
    import importlib.util

    for url in ((tmp_path / "none").as_uri(), "memory://no-such-cache/c"):
        with pytest.raises(CacheError, match=rf"no activation cache at '{url}': run `sae-pipeline harvest` first"):
            ActivationCache.open(url)
    with pytest.raises(CacheError, match=r"'nosuch://c/d'.*Protocol not known: nosuch.*file://, s3://"):
        ActivationCache.open("nosuch://c/d")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(CacheError, match=r"fsspec backend of 's3' URLs is not installed.*pip install s3fs"):
            ActivationCache.open("s3://bucket/cache")


def test_an_unreachable_host_or_a_server_ignoring_range_requests_is_named_not_called_damaged(tmp_path):
    import functools
    import http.server
    import threading

    pytest.importorskip("aiohttp")  # fsspec's HTTP backend
    # an unreachable host is not "no cache, harvest first" (HTTP's isfile reads it as a missing file)
    with pytest.raises(CacheError, match=r"cannot read the cache at 'http://127.0.0.1:1/c' \(ClientConnectorError: "
                                         r".*check the URL, that its host is reachable"):
        ActivationCache.open("http://127.0.0.1:1/c")
    # python -m http.server answers a Range request with the whole file: every shard read would
    # decode as a damaged chunk, so the open refuses it, naming the server
    acts, tokens = _data()
    write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16)
    file_url = (tmp_path / "c" / "zarr.json").as_uri()  # the metadata file, not its folder
    with pytest.raises(CacheError, match=rf"no activation cache at '{file_url}'"):
        ActivationCache.open(file_url)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c"
        with pytest.raises(CacheError, match=rf"cannot read the cache at '{url}': its server ignores byte-range "
                                             r"requests .*copy the cache to a local folder"):
            ActivationCache.open(url)
        with pytest.raises(CacheError, match=rf"no activation cache at '{url}x'"):
            ActivationCache.open(url + "x")
    finally:
        server.shutdown()
        server.server_close()


def test_an_incomplete_cache_read_by_url_is_refused_without_a_lock_check(tmp_path):
    from pipeline.cache import lock_state, writer_lock

    acts, tokens = _data()
    url = (tmp_path / "c").as_uri()
    with writer_lock(tmp_path / "c"):
        write_synthetic_cache(tmp_path / "c", acts, tokens, chunk_tokens=16, stop_after_chunks=2)
        assert lock_state(url) == ("none", {})  # a URL is never flock-ed: only the attributes tell
        with pytest.raises(CacheError, match=r"incomplete \(2/6 chunks written\): its harvest is still running or "
                                             r"was interrupted \(a cache read by URL has no lock to tell\)"):
            ActivationCache.open(url)
    assert ActivationCache.open(url, require_complete=False).n_chunks_written == 2


def test_a_harvest_into_a_url_is_refused_before_anything_runs(tmp_path):
    from pipeline.config import HarvestConfig
    from pipeline.harvest import harvest

    url = (tmp_path / "c").as_uri()
    with pytest.raises(CacheError, match=rf"cannot harvest into '{url}': a harvest writes local folders only"):
        harvest(HarvestConfig(output_path=url))
    assert not list(tmp_path.iterdir())


def test_training_from_a_file_url_gives_the_weights_and_holdout_metrics_of_training_from_the_folder(tmp_path):
    from pipeline.config import EvalConfig, TrainConfig
    from pipeline.errors import ConfigError
    from pipeline.evaluate import evaluate
    from pipeline.training import train
    from tests.test_sweep import SMALL, assert_same_sae, low_rank_cache

    cache = low_rank_cache(tmp_path / "cache")
    url = cache.path.as_uri()
    for name, cache_path in (("by_path", str(cache.path)), ("by_url", url)):
        train(TrainConfig(cache_path=cache_path, output_path=str(tmp_path / name), **SMALL), progress=False)
    assert_same_sae(tmp_path / "by_path", tmp_path / "by_url")
    # evaluation reads the holdout chunk (256 rows) of the cache the SAE trained on: here its URL
    by_path, by_url = (evaluate(EvalConfig(sae_path=str(tmp_path / name), ce_loss=False))
                       for name in ("by_path", "by_url"))
    assert by_url == by_path and by_url["n_tokens"] == 256
    # a file:// cache is a local folder: an SAE folder inside it is refused as for its path
    with pytest.raises(ConfigError, match="overlaps the cache"):
        train(TrainConfig(cache_path=url, output_path=str(cache.path / "sae"), **SMALL), progress=False)
