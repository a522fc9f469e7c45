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
        with pytest.raises(CacheError, match=rf"{hook}.*float16 overflows.*bfloat16"):
            harvest(_cfg(shared_data, tmp_path / "o"), model=smollm2)
    finally:
        smollm2.reset_hooks()
    assert ActivationCache.open(tmp_path / "o", require_complete=False).n_chunks_written == 0
