"""Stage 1 on the real SmolLM2-135M: content, metadata, resume after an interruption, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import models
from pipeline.cache import ActivationCache, CacheWriter
from pipeline.config import HarvestConfig
from pipeline.errors import CacheError, ConfigError, DatasetError, HookNameError
from pipeline.harvest import harvest

pytestmark = pytest.mark.slow
HOOKS = ["blocks.2.hook_resid_post", "blocks.5.hook_resid_post"]


def _cfg(shared_data, out, **kw):
    base = dict(dataset_path=str(shared_data / "tinyshakespeare" / "input.txt"), hook_names=HOOKS,
                context_size=32, n_tokens=32 * 24, holdout_tokens=128, chunk_tokens=128, chunks_per_shard=2,
                store_batch_size_prompts=3, output_path=str(out))
    return HarvestConfig.from_dict({**base, **kw})


def test_harvest_stores_what_the_model_computes(smollm2, shared_data, tmp_path):
    result = harvest(_cfg(shared_data, tmp_path / "h"), model=smollm2)
    cache = ActivationCache.open(tmp_path / "h")
    assert cache.complete and cache.layout.n_tokens == 768 and cache.hook_names == HOOKS
    a = cache.attrs
    assert a["model_name"] == "smollm2-135m" and a["d_in"] == {h: 576 for h in HOOKS}
    assert a["dtype"] == "float16" and a["prepend_bos"] is False and a["context_size"] == 32
    assert a["weights_fingerprint"] == models.model_fingerprint(smollm2)
    assert len(cache.holdout_chunks) == 1
    # recompute sequence 7's activations independently with a full forward pass
    tokens = torch.from_numpy(np.asarray(cache.tokens[7:8]).astype(np.int64))
    _, ref = smollm2.run_with_cache(tokens, names_filter=HOOKS)
    for hook in HOOKS:
        stored = cache.read_rows(hook, 7 * 32, 8 * 32).float()
        expected = ref[hook][0].to(torch.float16).float()
        torch.testing.assert_close(stored, expected, atol=0.05, rtol=2e-3)
        mean = np.asarray(cache.statistics(hook)["mean"])
        all_rows = cache.read_rows(hook, 0, 768).double().numpy()
        np.testing.assert_allclose(mean, all_rows.mean(0), rtol=1e-6, atol=1e-6)
    assert result.bytes_per_token < 2 * 576 * 2 + 200  # two float16 hooks, compressed


def test_the_harvest_bounds_the_heap_and_frees_it_after_every_chunk(smollm2, shared_data, tmp_path, monkeypatch):
    from pipeline import allocator

    calls = []
    monkeypatch.setattr(allocator, "bound_heap", lambda: calls.append("bound"))
    monkeypatch.setattr(allocator, "release_free_heap", lambda: calls.append("release"))
    harvest(_cfg(shared_data, tmp_path / "h"), model=smollm2)
    # bounded before anything is written, released once per chunk of the 6 (768 tokens / 128)
    assert calls == ["bound"] + ["release"] * 6


def test_interrupted_harvest_resumes_to_an_identical_cache(smollm2, shared_data, tmp_path, monkeypatch):
    whole = harvest(_cfg(shared_data, tmp_path / "whole"), model=smollm2).cache
    original = CacheWriter.write_chunk

    def dies_after_two(self, i, blocks):
        if i == 2:
            raise KeyboardInterrupt  # what a Ctrl-C mid-harvest looks like to the writer
        original(self, i, blocks)

    monkeypatch.setattr(CacheWriter, "write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(shared_data, tmp_path / "cut"), model=smollm2)
    with pytest.raises(CacheError, match="interrupted"):
        ActivationCache.open(tmp_path / "cut")
    monkeypatch.setattr(CacheWriter, "write_chunk", original)
    resumed = harvest(_cfg(shared_data, tmp_path / "cut"), model=smollm2)
    assert resumed.n_tokens_harvested == 768 - 2 * 128
    for hook in HOOKS:
        assert np.array_equal(resumed.cache.array(hook)[:], whole.array(hook)[:])
    assert np.array_equal(resumed.cache.tokens[:], whole.tokens[:])


def test_bad_input_is_refused_before_anything_is_written(smollm2, shared_data, tmp_path):
    with pytest.raises(HookNameError, match="blocks.8.hook_resid_post"):
        harvest(_cfg(shared_data, tmp_path / "a", hook_names=["blocks.8.hook_resid_pots"]), model=smollm2)
    with pytest.raises(ConfigError, match="n_ctx"):
        harvest(_cfg(shared_data, tmp_path / "b", context_size=9000, n_tokens=90000, holdout_tokens=0),
                model=smollm2)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DatasetError):
        harvest(_cfg(shared_data, tmp_path / "c", dataset_path=str(empty)), model=smollm2)
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abc")


def test_float16_overflow_is_reported_not_stored(smollm2, shared_data, tmp_path):
    def blow_up(act, hook):
        return act * 1e5

    hook = HOOKS[0]
    smollm2.hook_dict[hook].add_hook(blow_up)
    try:
        with pytest.raises(CacheError, match=rf"{hook}.*float16 overflows.*bfloat16") as err:
            harvest(_cfg(shared_data, tmp_path / "o"), model=smollm2)
    finally:
        smollm2.reset_hooks()
    cache = ActivationCache.open(tmp_path / "o", require_complete=False)
    assert cache.n_chunks_written == 0
    # the max reported is that of the first forward batch (3 sequences), recomputed without the hook
    tokens = torch.from_numpy(np.asarray(cache.tokens[0:3]).astype(np.int64))
    _, ref = smollm2.run_with_cache(tokens, names_filter=[hook])
    assert f"max |activation| {ref[hook].abs().max().item() * 1e5:.4g})" in str(err.value)


@pytest.fixture(scope="module")
def whole_harvest(smollm2, shared_data, tmp_path_factory):
    """The uninterrupted reference harvest of ``_cfg`` (6 chunks of 128 rows, 2 per shard)."""
    out = tmp_path_factory.mktemp("whole") / "h"
    harvest(_cfg(shared_data, out), model=smollm2)
    return out


@pytest.mark.parametrize("fails_at, after, what, kept", [
    ("creation", 0, "the empty arrays", None),               # the first file of the new cache
    ("creation", 8, "the empty arrays", None),               # the metadata of the second hook's arrays
    ("chunk", 0, "chunk 2", 2),                               # chunk 2's first shard write
    ("chunk", 2, "the checksums of chunk(s) [2]", 2),         # chunk 2's data is down, its checksums not
    ("chunk", 4, "the checksums of chunk(s) [2]", 2),         # all of chunk 2 but the progress attribute
    ("finalize", 0, "the statistics and completion marker", 6),  # every chunk down
])
def test_a_full_disk_stops_the_harvest_with_the_fix_and_a_rerun_finishes_it(
        smollm2, shared_data, tmp_path, monkeypatch, whole_harvest, fails_at, after, what, kept):
    from pipeline.bench.reliability import FullDisk, cache_content, same_content
    from pipeline.cache import lock_path, verify
    from pipeline.errors import CacheWriteError

    disk = FullDisk()
    write_chunk, finalize = CacheWriter.write_chunk, CacheWriter.finalize

    def fill_at_chunk_2(self, i, blocks):
        if i == 2:
            disk.arm(after)
        write_chunk(self, i, blocks)

    def fill_at_finalize(self, *args, **kwargs):
        disk.arm(after)
        return finalize(self, *args, **kwargs)

    if fails_at == "creation":
        disk.arm(after)
    monkeypatch.setattr(CacheWriter, "write_chunk", fill_at_chunk_2 if fails_at == "chunk" else write_chunk)
    monkeypatch.setattr(CacheWriter, "finalize", fill_at_finalize if fails_at == "finalize" else finalize)
    out = tmp_path / "h"
    with disk, pytest.raises(CacheWriteError) as err:
        harvest(_cfg(shared_data, out), model=smollm2)
    message = str(err.value)
    assert f"cannot write {what} of the cache at {str(out)!r}: No space left on device (ENOSPC at {out}" in message
    assert "free on that filesystem" in message and "Fix: free space on that filesystem" in message
    assert message.endswith("then re-run the same command to resume.")
    assert not lock_path(out).exists() and not list(out.rglob("*.partial"))
    if kept is None:  # nothing half-made at output_path for the re-run to refuse (a remnant of
        assert not out.exists()  # <output_path>.creating, zarr's late metadata writes, the re-run clears)
    else:
        assert disk.refused == 1  # the cache's writes are one file at a time: none was in flight
        assert f"The {kept} chunk(s) recorded before are on disk with their checksums and are kept" in message
        assert f"Resuming starts at chunk {kept}." in message
        left = ActivationCache.open(out, require_complete=False)
        assert left.n_chunks_written == kept and not left.complete and verify(left, progress=False) == {}
        with pytest.raises(CacheError, match="interrupted"):
            ActivationCache.open(out)
    monkeypatch.undo()  # (the disk was freed when the with-block ended)
    resumed = harvest(_cfg(shared_data, out), model=smollm2)
    assert resumed.n_tokens_harvested == 768 - 128 * (kept or 0)
    assert same_content(cache_content(out), cache_content(whole_harvest))
