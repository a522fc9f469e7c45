"""The harvest-speed and memory cases of the benchmark suite, run tiny on the real SmolLM2 and WikiText-2.

No timing is asserted (machines are noisy): only what each case claims to have measured.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.bench.harvest_speed import harvest_rows
from pipeline.bench.memory import build_tiled_cache, memory_rows
from pipeline.cache import ActivationCache

pytestmark = pytest.mark.slow

HOOK = "blocks.8.hook_resid_post"


def du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def by_key(rows):
    return {(r.case, r.variant): r for r in rows}


def test_harvest_rows_measure_what_they_say(tmp_path, shared_data, smollm2):
    from datasets import load_from_disk

    rows = by_key(harvest_rows(dataset_path=shared_data / "wikitext2_raw" / "wiki.test.raw", n_tokens=2 * 64,
                               context_size=64, repeats=1, warmup=0, workdir=tmp_path, model=smollm2))
    n_tokens = 2 * 64
    ours = rows["harvest", "ours fp32 compute, float16 storage"]
    saelens = rows["harvest", "SAELens"]
    assert all(r.unit == "tokens/s" and r.value > 0 and len(r.samples) == 1 for r in rows.values())
    assert ours.reference == "SAELens" and ours.ratio == pytest.approx(ours.value / saelens.value)
    assert ours.quality["fraction_of_forward"] == pytest.approx(ours.value / rows["harvest", "forward only"].value)
    # one round: the paired ratio is that round's ratio; bf16 ran in other rounds than SAELens
    assert ours.quality["paired_ratio"] == pytest.approx(ours.value / saelens.value)
    assert "paired_ratio" not in rows["harvest", "ours bf16 compute, float16 storage"].quality

    # bytes/token are the folders' sizes over the tokens
    assert ours.quality["bytes_per_token"] == pytest.approx(du(tmp_path / "fp32") / n_tokens)
    assert saelens.quality["bytes_per_token"] == pytest.approx(du(tmp_path / "saelens") / n_tokens)
    assert ours.quality["bytes_per_token_vs_saelens"] == pytest.approx(du(tmp_path / "fp32") / du(tmp_path / "saelens"))

    # SAELens stored the same rows and hook as ours: same token ids, same activations up to float16
    cache = ActivationCache.open(tmp_path / "fp32")
    theirs = load_from_disk(str(tmp_path / "saelens")).with_format("numpy")[:]
    assert np.array_equal(theirs["token_ids"], np.asarray(cache.tokens[:]))
    assert torch.equal(torch.from_numpy(theirs[HOOK]).reshape(n_tokens, -1).half(), cache.read_rows(HOOK, 0, n_tokens))

    bf16 = rows["harvest", "ours bf16 compute, float16 storage"]
    assert 0.99 < bf16.quality["cosine_to_fp32"] <= 1 + 1e-6
    assert 0 < bf16.quality["relative_error"] < 0.1

    # n hooks in one pass: n arrays, the first one the 1-hook harvest's
    assert rows["harvest_hooks", "1 hook"].reference is None
    for n in (1, 2, 3, 4):
        many = ActivationCache.open(tmp_path / "hooks" / f"{n}")
        assert len(many.hook_names) == n and many.hook_names[0] == HOOK
        assert torch.equal(many.read_rows(HOOK, 0, n_tokens), cache.read_rows(HOOK, 0, n_tokens))
        if n > 1:
            row = rows["harvest_hooks", f"{n} hooks"]
            assert row.reference == "1 hook" and row.quality["paired_ratio"] == pytest.approx(row.ratio)


def test_harvest_rows_without_saelens_keep_ours_and_the_forward(tmp_path, shared_data, smollm2):
    rows = by_key(harvest_rows(dataset_path=shared_data / "wikitext2_raw" / "wiki.test.raw", n_tokens=64,
                               context_size=64, repeats=1, warmup=0, workdir=tmp_path, model=smollm2, saelens=False))
    assert ("harvest", "SAELens") not in rows and not (tmp_path / "saelens").exists()
    ours = rows["harvest", "ours fp32 compute, float16 storage"]
    assert ours.reference is None and "bytes_per_token_vs_saelens" not in ours.quality
    assert ours.quality["fraction_of_forward"] == pytest.approx(ours.value / rows["harvest", "forward only"].value)


def test_tiled_cache_repeats_its_source_chunk_by_chunk(real_cache, tmp_path):
    n_src = real_cache.layout.n_tokens // real_cache.layout.chunk_tokens  # 12 full chunks
    tiled = build_tiled_cache(real_cache, 16 * 4096, tmp_path / "tiled")
    assert tiled.layout.n_chunks == 16 and tiled.layout.chunk_tokens == real_cache.layout.chunk_tokens
    for i in range(tiled.layout.n_chunks):
        assert torch.equal(tiled.read_chunk(HOOK, i, verify=True), real_cache.read_chunk(HOOK, i % n_src))
        assert np.array_equal(tiled.chunk_token_ids(i), real_cache.chunk_token_ids(i % n_src))
    assert tiled.statistics(HOOK) == real_cache.statistics(HOOK)
    before = du(tmp_path / "tiled"), os.path.getmtime(tmp_path / "tiled" / "zarr.json")
    again = build_tiled_cache(real_cache, 16 * 4096, tmp_path / "tiled")
    assert again.layout == tiled.layout
    assert (du(tmp_path / "tiled"), os.path.getmtime(tmp_path / "tiled" / "zarr.json")) == before  # reused


def test_memory_rows_measure_fresh_processes(real_cache, tmp_path, shared_data):
    rows = by_key(memory_rows(source_cache=real_cache.path, workdir=tmp_path, sizes=(8192, 32768), train_steps=2,
                              d_sae=1024, harvest_tokens=(256, 512),
                              dataset_path=shared_data / "wikitext2_raw" / "wiki.test.raw"))
    small, large = rows["memory_train", "8192 tokens"], rows["memory_train", "32768 tokens"]
    assert large.reference == small.variant and large.ratio == pytest.approx(large.value / small.value)
    assert ActivationCache.open(tmp_path / "caches" / "32768").layout.n_tokens == 32768
    for r in rows.values():
        assert r.unit == "MiB" and r.value > r.quality["rss_before_mib"] > 0
    for size in (8192, 32768):
        assert (tmp_path / "saes" / f"{size}" / "cfg.json").is_file()
    for size in (256, 512):
        assert ActivationCache.open(tmp_path / "harvests" / f"{size}").layout.n_tokens == size
    assert rows["memory_harvest", "512 tokens"].reference == "256 tokens"
