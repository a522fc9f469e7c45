"""SAE folders: bit-exact round trips, SAELens compatibility both ways, malformed folders."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from pipeline.errors import SAEFormatError
from pipeline.sae import SAE, SAEConfig, StandardSAE, TopKSAE, get_architecture
from pipeline.sae.io import load_sparsity, log_feature_density, read_cfg

import sae_lens  # noqa: E402  (a [test] dependency: missing means a broken install, not a skip)


def random_sae(architecture: str, dtype: str = "float32", **kw) -> SAE:
    torch.manual_seed(0)
    cfg = SAEConfig(
        architecture, d_in=8, d_sae=32, k=4 if architecture == "topk" else None, dtype=dtype,
        hook_name="blocks.1.hook_resid_post", model_name="tiny", **kw,
    )
    sae = get_architecture(architecture)(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.W_enc.add_(0.05 * torch.randn_like(sae.W_enc))
    return sae


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact(tmp_path, architecture, dtype):
    sae = random_sae(architecture, dtype, metadata={"context_size": 128})
    sparsity = log_feature_density(torch.rand(32))
    sae.save(tmp_path, sparsity=sparsity)
    loaded = SAE.load(tmp_path)
    assert type(loaded) is type(sae)
    assert loaded.cfg == sae.cfg
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert getattr(loaded, name).dtype == getattr(sae, name).dtype
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert torch.equal(load_sparsity(tmp_path), sparsity)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME]
    )


def test_subclass_load_checks_architecture(tmp_path):
    random_sae("topk").save(tmp_path)
    assert isinstance(TopKSAE.load(tmp_path), TopKSAE)
    with pytest.raises(SAEFormatError, match="topk"):
        StandardSAE.load(tmp_path)


def test_written_layout_matches_sae_lens(tmp_path):
    random_sae("topk").save(tmp_path / "ours")
    reference = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=32, k=4))
    reference.save_model(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / SAE_CFG_FILENAME).read_text())
    theirs = json.loads((tmp_path / "theirs" / SAE_CFG_FILENAME).read_text())
    assert set(theirs) <= set(ours)
    assert set(theirs["metadata"]) <= set(ours["metadata"])
    assert ours["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    w_ours = load_file(tmp_path / "ours" / SAE_WEIGHTS_FILENAME)
    w_theirs = load_file(tmp_path / "theirs" / SAE_WEIGHTS_FILENAME)
    assert {k: v.shape for k, v in w_ours.items()} == {k: v.shape for k, v in w_theirs.items()}


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_sae_lens_loads_our_folder(tmp_path, architecture):
    sae = random_sae(architecture)
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == architecture
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(16, 8)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-6)
    assert torch.allclose(theirs(x), sae(x), atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=32)),
        lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=32, k=4)),
        # selects on pre-activations times decoder norms; our loader folds the norms in
        lambda: sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=32, k=4, rescale_acts_by_decoder_norm=True)),
    ],
    ids=["standard", "topk", "topk-rescaled"],
)
def test_we_load_a_sae_lens_folder(tmp_path, make):
    torch.manual_seed(1)
    theirs = make()
    theirs.cfg.metadata.hook_name = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.hook_name == "blocks.0.hook_resid_pre"
    x = torch.randn(16, 8)
    assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
    assert torch.allclose(ours(x), theirs(x), atol=1e-4)


def test_we_load_a_sae_lens_training_sae(tmp_path):
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(2)
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=32, k=4))
    theirs.save_inference_model(tmp_path)
    x = torch.randn(16, 8)
    assert torch.allclose(SAE.load(tmp_path).encode(x), theirs.encode(x), atol=1e-5)


@pytest.fixture
def saved(tmp_path):
    random_sae("topk").save(tmp_path)
    return tmp_path


def _edit_cfg(folder, **changes):
    path = folder / SAE_CFG_FILENAME
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_files(saved, tmp_path_factory):
    with pytest.raises(SAEFormatError, match="does not exist"):
        SAE.load(tmp_path_factory.mktemp("empty") / "nothing")
    (saved / SAE_WEIGHTS_FILENAME).unlink()
    with pytest.raises(SAEFormatError, match=SAE_WEIGHTS_FILENAME):
        SAE.load(saved)
    (saved / SAE_CFG_FILENAME).unlink()
    with pytest.raises(SAEFormatError, match=SAE_CFG_FILENAME):
        SAE.load(saved)


def test_malformed_cfg(saved):
    (saved / SAE_CFG_FILENAME).write_text("{not json")
    with pytest.raises(SAEFormatError, match="not valid JSON"):
        SAE.load(saved)
    (saved / SAE_CFG_FILENAME).write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match="JSON object"):
        SAE.load(saved)


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"d_in": 9}, "shape"),
        ({"d_sae": "32"}, "d_sae"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": "int8"}, "dtype"),
        ({"architecture": "transcoder"}, "architecture"),  # a SAELens architecture we do not register
        ({"k": 0}, "k"),
        ({"reshape_activations": "hook_z"}, "reshape_activations"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ],
)
def test_cfg_that_disagrees_with_weights(saved, changes, match):
    _edit_cfg(saved, **changes)
    with pytest.raises(SAEFormatError, match=match):
        SAE.load(saved)


def test_wrong_tensor_names_and_shapes(saved):
    weights = load_file(saved / SAE_WEIGHTS_FILENAME)
    save_file({**weights, "extra": torch.zeros(1)}, saved / SAE_WEIGHTS_FILENAME)
    with pytest.raises(SAEFormatError, match="unexpected \\['extra'\\]"):
        SAE.load(saved)
    save_file({k: v for k, v in weights.items() if k != "b_enc"}, saved / SAE_WEIGHTS_FILENAME)
    with pytest.raises(SAEFormatError, match="missing \\['b_enc'\\]"):
        SAE.load(saved)
    save_file({**weights, "W_dec": weights["W_dec"].T.contiguous()}, saved / SAE_WEIGHTS_FILENAME)
    with pytest.raises(SAEFormatError, match="W_dec has shape"):
        SAE.load(saved)
    (saved / SAE_WEIGHTS_FILENAME).write_bytes(b"garbage")
    with pytest.raises(SAEFormatError, match="safetensors"):
        SAE.load(saved)


def test_bad_sparsity(saved):
    with pytest.raises(SAEFormatError, match="sparsity"):
        SAE.load(saved).save(saved, sparsity=torch.zeros(3))
    save_file({"other": torch.zeros(32)}, saved / SPARSITY_FILENAME)
    with pytest.raises(SAEFormatError, match="sparsity"):
        load_sparsity(saved)


def test_read_cfg_of_pre_6_sae_lens_config(tmp_path):
    (tmp_path / SAE_CFG_FILENAME).write_text(json.dumps({
        "d_in": 8, "d_sae": 32, "dtype": "torch.float32", "device": "cpu",
        "hook_point": "blocks.2.hook_resid_pre", "model_name": "gpt2",
        "activation_fn_str": "topk", "activation_fn": "topk", "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": True, "normalize_activations": False,
    }))
    cfg = read_cfg(tmp_path)
    assert (cfg.architecture, cfg.k, cfg.hook_name, cfg.model_name, cfg.dtype) == (
        "topk", 4, "blocks.2.hook_resid_pre", "gpt2", "float32")


def test_all_ones_scaling_factor_is_dropped_and_others_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = get_architecture("standard")(SAEConfig("standard", d_in=8, d_sae=16))
    folder = sae.save(tmp_path / "s")
    state = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**state, "scaling_factor": torch.ones(16)}, str(folder / "sae_weights.safetensors"))
    assert torch.equal(SAE.load(folder).W_enc, state["W_enc"])
    save_file({**state, "scaling_factor": torch.full((16,), 2.0)}, str(folder / "sae_weights.safetensors"))
    with pytest.raises(SAEFormatError, match="scaling_factor that is not all ones"):
        SAE.load(folder)


def test_a_failed_atomic_write_leaves_neither_a_file_nor_its_temporary(tmp_path):
    from pipeline.sae.io import atomic_write

    target = tmp_path / "cfg.json"

    def half_then_full_disk(path):
        path.write_text('{"d_in": 5')
        raise OSError(28, "No space left on device", str(path))

    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, half_then_full_disk)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda path: path.write_text("{}"))
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.json"] and target.read_text() == "{}"


def test_a_failed_atomic_write_raises_its_own_error_when_the_cleanup_is_refused_too(tmp_path, monkeypatch):
    from pathlib import Path

    from pipeline.sae.io import atomic_write

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: read_only(self))
    with pytest.raises(OSError, match="Read-only file system") as info:
        atomic_write(tmp_path / "cfg.json", read_only)
    assert info.value.__context__ is None  # not "during handling of the above exception, another exception"
