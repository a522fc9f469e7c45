"""from_pretrained: registry facts, loading from a Hugging Face cache layout, and its errors.

Never touches the network: every test points HF_HUB_CACHE at tmp_path, and downloads are either
forbidden (HF_HUB_OFFLINE=1, with hf_hub_download replaced by a function that fails the test) or
served by a fake that writes into the same cache layout.
"""

import fnmatch
import hashlib
import json
from importlib.resources import files
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file

from pipeline.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from pipeline.errors import ConfigError, SAEFormatError
from pipeline.sae import SAE, SAEConfig, StandardSAE
from pipeline.sae import pretrained
from pipeline.sae.io import log_feature_density
from pipeline.sae.pretrained import (
    PretrainedSAENotFoundError,
    from_pretrained,
    list_releases,
    list_sae_ids,
    resolve,
)

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
GPT2_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"
GPT2_ID = "blocks.8.hook_resid_pre"
REVISION = "1f0c2a9d3e4b5c6d7e8f90a1b2c3d4e5f6a7b8c9"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; any download attempt fails the test."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError(f"network download attempted: {args} {kwargs}")

    monkeypatch.setattr(pretrained, "hf_hub_download", no_download)
    return cache


def random_standard_sae(**cfg_kw) -> StandardSAE:
    torch.manual_seed(0)
    sae = StandardSAE(SAEConfig("standard", d_in=16, d_sae=32, hook_name=GPT2_ID,
                                model_name="gpt2-small", **cfg_kw))
    with torch.no_grad():
        for name in PARAMS:
            getattr(sae, name).copy_(torch.randn_like(getattr(sae, name)))
    return sae


def put_in_cache(cache: Path, repo_id: str, repo_folder: str, source: Path) -> Path:
    """Lay ``source``'s files out as huggingface_hub does: content-addressed blobs, snapshot
    symlinks under ``snapshots/<revision>/<repo_folder>/``, and ``refs/main`` naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION / repo_folder
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(blob)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)  # no newline, as huggingface_hub writes it
    return snapshot


def legacy_gpt2_cfg(d_in: int, d_sae: int) -> dict:
    """A pre-6.0 SAELens cfg.json shaped like gpt2-small-res-jb's (no architecture, hook_point,
    dtype 'torch.float32', training keys, the training device)."""
    return {
        "model_name": "gpt2-small", "hook_point": GPT2_ID, "hook_point_layer": 8,
        "hook_point_head_index": None, "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False, "context_size": 128, "use_cached_activations": False,
        "d_in": d_in, "n_batches_in_buffer": 128, "total_training_tokens": 300_000_000,
        "store_batch_size": 32, "device": "cuda", "seed": 42, "dtype": "torch.float32",
        "b_dec_init_method": "geometric_median", "expansion_factor": d_sae // d_in,
        "l1_coefficient": 8e-05, "lr": 0.0004, "lr_warm_up_steps": 5000, "train_batch_size": 4096,
        "use_ghost_grads": False, "feature_sampling_window": 1000, "dead_feature_window": 5000,
        "dead_feature_threshold": 1e-08, "log_to_wandb": True, "d_sae": d_sae,
        "run_name": f"{d_sae}-L1-8e-05-LR-0.0004-Tokens-3.000e+08",
    }


def assert_params_equal(sae, expected: dict[str, torch.Tensor]) -> None:
    for name in PARAMS:
        assert torch.equal(getattr(sae, name).detach(), expected[name]), name


# ------------------------------------------------------------------------------------ registry


def saelens_registry() -> dict:
    text = files("sae_lens").joinpath("pretrained_saes.yaml").read_text()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def test_registry_matches_saelens_releases():
    ours = yaml.safe_load(files("pipeline.sae").joinpath("pretrained_saes.yaml").read_text())
    theirs = saelens_registry()
    assert len(ours["releases"]) >= 10
    for name, release in ours["releases"].items():
        upstream = theirs[name]
        assert upstream.get("conversion_func") is None, name  # plain cfg.json + safetensors folders
        assert release["repo_id"] == upstream["repo_id"], name
        assert release["model"] == upstream["model"], name
        upstream_saes = {s["id"]: s for s in upstream["saes"]}
        assert list(release["saes"]) == list(upstream_saes), name
        for sae_id, sae in release["saes"].items():
            assert sae["path"] == upstream_saes[sae_id]["path"], (name, sae_id)
            assert sae.get("norm_scaling_factor") == upstream_saes[sae_id].get("norm_scaling_factor")
    for pattern in ours["unsupported"]:  # every exclusion names real SAELens releases ...
        assert fnmatch.filter(theirs, pattern), pattern
        assert not fnmatch.filter(ours["releases"], pattern), pattern  # ... none we list


def test_list_releases_and_ids():
    releases = list_releases()
    assert releases == sorted(releases)
    assert {"gpt2-small-res-jb", "pythia-70m-deduped-res-sm", "gemma-2b-res-jb"} <= set(releases)
    assert not [r for r in releases if r.startswith("gemma-scope")]
    ids = list_sae_ids("gpt2-small-res-jb")
    assert ids == [f"blocks.{i}.hook_resid_pre" for i in range(12)] + ["blocks.11.hook_resid_post"]
    assert resolve("gpt2-small-res-jb", GPT2_ID) == pretrained.PretrainedSAE(
        "gpt2-small-res-jb", GPT2_ID, GPT2_REPO, GPT2_ID, "gpt2-small", None
    )


def test_package_data_is_declared():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"pipeline.sae" = ["pretrained_saes.yaml"]' in text


# ------------------------------------------------------------------------------------- loading


def test_loads_saved_sae_and_sparsity_from_hub_cache(hub, tmp_path):
    sae = random_standard_sae()
    sparsity = log_feature_density(torch.rand(32))
    sae.save(tmp_path / "src", sparsity=sparsity)
    put_in_cache(hub, GPT2_REPO, GPT2_ID, tmp_path / "src")

    loaded, cfg_dict, loaded_sparsity = from_pretrained("gpt2-small-res-jb", GPT2_ID)

    assert type(loaded) is StandardSAE
    assert loaded.cfg == sae.cfg
    assert_params_equal(loaded, {n: getattr(sae, n).detach() for n in PARAMS})
    assert cfg_dict == json.loads((tmp_path / "src" / SAE_CFG_FILENAME).read_text())
    assert (cfg_dict["d_in"], cfg_dict["d_sae"], cfg_dict["architecture"]) == (16, 32, "standard")
    assert torch.equal(loaded_sparsity, sparsity)
    via_class = SAE.from_pretrained("gpt2-small-res-jb", GPT2_ID)  # the classmethod delegates here
    assert_params_equal(via_class[0], {n: getattr(sae, n).detach() for n in PARAMS})
    assert via_class[1] == cfg_dict


def test_loads_legacy_gpt2_res_jb_folder(hub, tmp_path):
    sae = random_standard_sae()
    src = tmp_path / "src"
    src.mkdir()
    weights = {n: getattr(sae, n).detach().clone().contiguous() for n in PARAMS}
    save_file(weights, src / SAE_WEIGHTS_FILENAME)
    legacy = legacy_gpt2_cfg(16, 32)
    (src / SAE_CFG_FILENAME).write_text(json.dumps(legacy))
    put_in_cache(hub, GPT2_REPO, GPT2_ID, src)

    loaded, cfg_dict, sparsity = from_pretrained("gpt2-small-res-jb", GPT2_ID, device="cpu")

    assert sparsity is None
    assert cfg_dict == legacy  # returned as stored, pre-6.0 keys and all
    assert type(loaded) is StandardSAE
    assert (loaded.cfg.hook_name, loaded.cfg.model_name) == (GPT2_ID, "gpt2-small")
    assert (loaded.cfg.dtype, loaded.cfg.device, loaded.cfg.apply_b_dec_to_input) == ("float32", "cpu", True)
    assert loaded.W_enc.device.type == "cpu"
    assert_params_equal(loaded, weights)
    x = torch.randn(5, 16)
    expected = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    torch.testing.assert_close(loaded.encode(x), expected)


def test_folds_registered_norm_scaling_factor(hub, tmp_path):
    sae_id = "blocks.8.hook_mlp_out"
    entry = resolve("gpt2-small-mlp-tm", sae_id)
    assert entry.path == "sae_group_gpt2_blocks.8.hook_mlp_out_24576:v1"
    scale = entry.norm_scaling_factor
    assert scale == 0.9123762783479742
    sae = random_standard_sae(normalize_activations="expected_average_only_in")
    sae.save(tmp_path / "src")
    put_in_cache(hub, "tommmcgrath/gpt2-small-mlp-out-saes", entry.path, tmp_path / "src")

    loaded, cfg_dict, _ = from_pretrained("gpt2-small-mlp-tm", sae_id)

    saved = {n: getattr(sae, n).detach() for n in PARAMS}
    torch.testing.assert_close(loaded.W_enc, saved["W_enc"] * scale)
    torch.testing.assert_close(loaded.b_enc, saved["b_enc"])
    torch.testing.assert_close(loaded.W_dec, saved["W_dec"] / scale)
    torch.testing.assert_close(loaded.b_dec, saved["b_dec"] / scale)
    assert loaded.cfg.normalize_activations == "none"
    assert cfg_dict["normalize_activations"] == "none"
    x = torch.randn(4, 16)  # raw x through the folded SAE == (scale·x) through the trained one, / scale
    trained = random_standard_sae(normalize_activations="expected_average_only_in")
    torch.testing.assert_close(loaded(x), trained(x * scale) / scale, rtol=1e-5, atol=1e-5)


def test_warns_when_scaled_sae_has_no_registered_factor(hub, tmp_path):
    sae = random_standard_sae(normalize_activations="expected_average_only_in")
    sae.save(tmp_path / "src")
    put_in_cache(hub, GPT2_REPO, GPT2_ID, tmp_path / "src")
    with pytest.warns(UserWarning, match="norm scaling factor"):
        loaded, cfg_dict, _ = from_pretrained("gpt2-small-res-jb", GPT2_ID)
    assert loaded.cfg.normalize_activations == "expected_average_only_in"
    assert cfg_dict["normalize_activations"] == "expected_average_only_in"
    assert_params_equal(loaded, {n: getattr(sae, n).detach() for n in PARAMS})


def test_repo_id_release_uses_sae_id_as_folder(hub, tmp_path):
    sae = random_standard_sae()
    sae.save(tmp_path / "src")
    put_in_cache(hub, "someone/my-saes", "layer_3", tmp_path / "src")
    loaded, _, sparsity = from_pretrained("someone/my-saes", "layer_3")
    assert sparsity is None
    assert_params_equal(loaded, {n: getattr(sae, n).detach() for n in PARAMS})


def test_hf_home_is_used_without_hf_hub_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert pretrained.hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert pretrained.hub_cache_dir() == tmp_path / "elsewhere"


def test_downloads_into_the_cache_when_online(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sae = random_standard_sae()
    sae.save(tmp_path / "remote")  # what the "Hub" serves: no sparsity file
    calls = []

    def fake_download(repo_id, filename, cache_dir):
        calls.append((repo_id, filename, Path(cache_dir)))
        source = tmp_path / "remote" / Path(filename).name
        if not source.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        staging = tmp_path / f"staging{len(calls)}"  # one file per "download"
        staging.mkdir()
        (staging / source.name).write_bytes(source.read_bytes())
        return str(put_in_cache(Path(cache_dir), repo_id, str(Path(filename).parent), staging) / source.name)

    monkeypatch.setattr(pretrained, "hf_hub_download", fake_download)
    monkeypatch.setattr(pretrained, "network_reachable", lambda host: True)
    loaded, _, sparsity = from_pretrained("gpt2-small-res-jb", GPT2_ID)

    assert [c[:2] for c in calls] == [(GPT2_REPO, f"{GPT2_ID}/{name}") for name in
                                      (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME)]
    assert all(c[2] == cache for c in calls)
    assert sparsity is None
    assert_params_equal(loaded, load_file(tmp_path / "remote" / SAE_WEIGHTS_FILENAME))


# -------------------------------------------------------------------------------------- errors


def test_no_cache_offline_error_says_what_to_download_and_where(hub):
    with pytest.raises(PretrainedSAENotFoundError) as info:
        from_pretrained("gpt2-small-res-jb", GPT2_ID)
    assert isinstance(info.value, SAEFormatError)
    msg = str(info.value)
    command = f"hf download {GPT2_REPO} {GPT2_ID}/cfg.json {GPT2_ID}/sae_weights.safetensors --cache-dir {hub}"
    for needed in (GPT2_REPO, f"{GPT2_ID}/cfg.json", f"{GPT2_ID}/sae_weights.safetensors",
                   f"{GPT2_ID}/sparsity.safetensors", str(hub), "models--jbloom--GPT2-Small-SAEs-Reformatted",
                   command, f"https://huggingface.co/{GPT2_REPO}/resolve/main/{GPT2_ID}/sae_weights.safetensors",
                   "SAE.load(folder)", "HF_HUB_OFFLINE"):
        assert needed in msg, needed


def test_partial_cache_names_only_the_missing_file(hub, tmp_path):
    random_standard_sae().save(tmp_path / "src")
    (tmp_path / "src" / SAE_WEIGHTS_FILENAME).unlink()
    put_in_cache(hub, GPT2_REPO, GPT2_ID, tmp_path / "src")
    with pytest.raises(PretrainedSAENotFoundError) as info:
        from_pretrained("gpt2-small-res-jb", GPT2_ID)
    msg = str(info.value)
    assert f"{GPT2_ID}/sae_weights.safetensors: not in the cache, and HF_HUB_OFFLINE is set" in msg
    assert f"{GPT2_ID}/cfg.json: not in the cache" not in msg


def test_failed_download_reports_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def unreachable(repo_id, filename, cache_dir):
        raise LocalEntryNotFoundError("Connection refused")

    monkeypatch.setattr(pretrained, "hf_hub_download", unreachable)
    monkeypatch.setattr(pretrained, "network_reachable", lambda host: True)
    with pytest.raises(PretrainedSAENotFoundError) as info:
        from_pretrained("pythia-70m-deduped-res-sm", "blocks.3.hook_resid_post")
    msg = str(info.value)
    assert "ctigges/pythia-70m-deduped__res-sm_processed" in msg
    assert "3-res-sm/cfg.json: the Hub could not be reached (Connection refused)" in msg
    assert "unset HF_HUB_OFFLINE" not in msg


def test_unknown_release_suggests_the_closest(hub):
    with pytest.raises(ConfigError) as info:
        from_pretrained("gpt2-small-res-jbb", GPT2_ID)
    msg = str(info.value)
    assert "unknown SAE release 'gpt2-small-res-jbb' (did you mean 'gpt2-small-res-jb'?)" in msg
    assert "known releases: gemma-2b-it-res-jb, gemma-2b-res-jb," in msg


def test_unknown_sae_id_suggests_the_closest(hub):
    with pytest.raises(ConfigError) as info:
        from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pr")
    msg = str(info.value)
    assert "(did you mean 'blocks.8.hook_resid_pre'?)" in msg
    assert "its 13 SAE ids: blocks.0.hook_resid_pre" in msg


@pytest.mark.parametrize(("release", "reason"), [
    ("gemma-scope-2b-pt-res-canonical", "params.npz"),
    ("gemma-scope-2-1b-pt-res", "params.safetensors"),
    ("gpt2-small-resid-post-v5-32k", "layer_norm"),
    ("gemma-2-2b-res-matryoshka-dc", "jumprelu"),
])
def test_left_out_saelens_releases_say_why(hub, release, reason):
    with pytest.raises(SAEFormatError, match=f"SAELens release '{release}' is not supported: .*{reason}"):
        from_pretrained(release, "anything")


def test_no_network_fails_fast_without_trying_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(pretrained, "network_reachable", lambda host: False)
    monkeypatch.setattr(pretrained, "hf_hub_download", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(PretrainedSAENotFoundError, match="huggingface.co cannot be reached"):
        from_pretrained("pythia-70m-deduped-res-sm", "blocks.3.hook_resid_post")
