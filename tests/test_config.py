"""Config loading: SAELens names, unknown-field suggestions, validation messages."""

from __future__ import annotations

import pytest

from pipeline.config import EvalConfig, HarvestConfig, TrainConfig
from pipeline.errors import ConfigError
from stages.common import load_config, parse_sets


def test_saelens_style_topk_fields_map_onto_ours():
    cfg = TrainConfig.from_dict({"architecture": "topk", "activation_fn": "topk",
                                 "activation_fn_kwargs": {"k": 50}, "d_sae": 2304})
    assert (cfg.architecture, cfg.k, cfg.d_sae) == ("topk", 50, 2304)


def test_mismatched_activation_fn_is_refused():
    with pytest.raises(ConfigError, match="activation_fn 'relu' does not match architecture 'topk'"):
        TrainConfig.from_dict({"architecture": "topk", "activation_fn": "relu"})


def test_unknown_field_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match="'l1_coeficient'.*Did you mean 'l1_coefficient'"):
        TrainConfig.from_dict({"l1_coeficient": 3})
    with pytest.raises(ConfigError, match="Did you mean 'hook_names'"):
        HarvestConfig.from_dict({"hook_nmes": ["a"]})


def test_saelens_fields_without_meaning_here_warn():
    with pytest.warns(UserWarning, match="context_size.*ignored.*cache"):
        cfg = TrainConfig.from_dict({"context_size": 128, "d_sae": 64, "k": 8})
    assert cfg.d_sae == 64


@pytest.mark.parametrize("data, message", [
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"n_tokens": 100, "context_size": 128}, "smaller than one sequence"),
    ({"hook_names": []}, "hook_names is empty"),
    ({"holdout_tokens": 300_000}, "holdout_tokens"),
    ({"hook_name": "a", "hook_names": ["b"]}, "either hook_name or hook_names"),
])
def test_bad_harvest_values(data, message):
    with pytest.raises(ConfigError, match=message):
        HarvestConfig.from_dict(data)


def test_hook_name_and_training_tokens_saelens_aliases():
    cfg = HarvestConfig.from_dict({"hook_name": "blocks.3.hook_resid_post", "training_tokens": 4096})
    assert cfg.hook_names == ["blocks.3.hook_resid_post"] and cfg.n_tokens == 4096


def test_bad_train_values():
    with pytest.raises(ConfigError, match="k \\(10\\) must not exceed d_sae \\(8\\)"):
        TrainConfig.from_dict({"k": 10, "d_sae": 8})
    with pytest.raises(ConfigError, match="lr must be a positive number"):
        TrainConfig.from_dict({"lr": -1})
    with pytest.raises(ConfigError, match="shuffle_buffer_tokens"):
        TrainConfig.from_dict({"shuffle_buffer_tokens": 4096})


def test_sectioned_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("harvest:\n  n_tokens: 4096\ntrain:\n  d_sae: 128\n  k: 4\n")
    assert load_config(HarvestConfig, "harvest", str(path), {"context_size": 64}).n_tokens == 4096
    assert load_config(TrainConfig, "train", str(path), parse_sets(("lr=3e-4",))).lr == 3e-4
    assert load_config(EvalConfig, "evaluate", str(path), {}).n_ce_sequences == EvalConfig().n_ce_sequences


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_yaml(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="field=value"):
        parse_sets(("lr",))


def test_a_key_given_twice_is_refused_not_silently_dropped(tmp_path):
    from pipeline.config import read_yaml_mapping

    twice = tmp_path / "twice.yaml"
    twice.write_text("grid:\n  k: [8, 16]\n  k: [32]\n")  # PyYAML alone keeps k: [32] and drops two points
    with pytest.raises(ConfigError, match=r"not valid YAML: .*found the key 'k' twice .*line 3"):
        read_yaml_mapping(twice)
    twice.write_text("lr: 0.001\nlr: 0.0004\n")
    with pytest.raises(ConfigError, match="found the key 'lr' twice"):
        TrainConfig.from_yaml(twice)
    # a merge key may be overridden, and the same key in two mappings is no repeat
    merged = tmp_path / "merged.yaml"
    merged.write_text("a: &b {k: 8, d_sae: 256}\nc:\n  <<: *b\n  k: 16\nd: {k: 8}\n")
    assert read_yaml_mapping(merged) == {"a": {"k": 8, "d_sae": 256}, "c": {"k": 16, "d_sae": 256}, "d": {"k": 8}}


def test_booleans_and_devices_are_checked():
    assert HarvestConfig.from_dict({"prepend_bos": "yes"}).prepend_bos is True
    assert HarvestConfig.from_dict({"prepend_bos": 0}).prepend_bos is False
    with pytest.raises(ConfigError, match="prepend_bos must be true or false, got 'maybe'"):
        HarvestConfig.from_dict({"prepend_bos": "maybe"})
    with pytest.raises(ConfigError, match="not a torch device"):
        TrainConfig.from_dict({"device": "gpu0"})


def test_misspelled_section_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("harvest:\n  n_tokens: 4096\ntrian:\n  d_sae: 10\n")
    with pytest.raises(ConfigError, match="unknown section 'trian'. Did you mean 'train'"):
        load_config(TrainConfig, "train", str(path), {})


def test_fields_the_architecture_ignores_warn():
    with pytest.warns(UserWarning, match="'k' is ignored by architecture 'standard'"):
        TrainConfig.from_dict({"architecture": "standard", "k": 8})


def test_a_flat_saelens_runner_config_is_understood_field_by_field():
    saelens = dict(architecture="topk", activation_fn="topk", activation_fn_kwargs={"k": 50}, d_sae=2304,
                   l1_coefficient=2, l1_warm_up_steps=100, lr=3e-4, lr_scheduler_name="cosineannealing",
                   lr_warm_up_steps=10, lr_decay_steps=20, train_batch_size_tokens=2048,
                   training_tokens=409_600, use_ghost_grads=False, dead_feature_window=500,
                   feature_sampling_window=1000, dead_feature_threshold=1e-6,
                   normalize_activations="expected_average_only_in", n_checkpoints=4,
                   checkpoint_path="ckpts", log_to_wandb=False, wandb_project="proj",
                   store_batch_size_prompts=16, n_batches_in_buffer=64, context_size=128,
                   hook_name="blocks.8.hook_resid_post", d_in=576)
    with pytest.warns(UserWarning) as caught:
        cfg = TrainConfig.from_dict(saelens)
    messages = " | ".join(str(w.message) for w in caught)
    for ignored in ("store_batch_size_prompts", "n_batches_in_buffer", "context_size", "dead_feature_threshold",
                    "'l1_coefficient' is ignored by architecture 'topk'",
                    "'l1_warm_up_steps' is ignored by architecture 'topk'"):
        assert ignored in messages
    assert (cfg.architecture, cfg.k, cfg.d_sae, cfg.d_in, cfg.hook_name) == ("topk", 50, 2304, 576,
                                                                             "blocks.8.hook_resid_post")
    assert (cfg.lr, cfg.lr_scheduler_name, cfg.lr_warm_up_steps, cfg.lr_decay_steps) == (3e-4, "cosineannealing", 10, 20)
    assert (cfg.n_checkpoints, str(cfg.checkpoint_dir), cfg.wandb_project) == (4, "ckpts", "proj")
    assert (cfg.dead_feature_window, cfg.feature_sampling_window, cfg.total_steps) == (500, 1000, 200)


@pytest.mark.parametrize("data, message", [
    ({"architecture": "batchtopk", "k": 40.5, "d_sae": 32}, "k \\(40.5\\) must not exceed d_sae \\(32\\)"),
    ({"architecture": "topk", "k": 2.5}, "topk needs a whole k"),
    ({"architecture": "jumprelu", "jumprelu_sparsity_loss_mode": "quadratic"}, "jumprelu_sparsity_loss_mode must be one of"),
    ({"architecture": "matryoshk"}, "architecture must be one of"),
    ({"activation_fn": "softplus"}, "activation_fn 'softplus' is not supported"),
    ({"n_checkpoints": 10, "training_tokens": 4096 * 5}, "n_checkpoints \\(10\\) exceeds the 5 training steps"),
])
def test_bad_architecture_settings_are_named(data, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_saelens_matryoshka_name_and_fractional_batchtopk_k():
    assert TrainConfig.from_dict({"architecture": "matryoshka_batchtopk"}).architecture == "matryoshka"
    assert TrainConfig.from_dict({"architecture": "batchtopk", "k": "40.5"}).k == 40.5
    with pytest.warns(UserWarning, match="'matryoshka_widths' is ignored by architecture 'topk'"):
        TrainConfig.from_dict({"architecture": "topk", "matryoshka_widths": [8, 16]})


def test_saelens_6_nested_layout_and_older_spellings():
    with pytest.warns(UserWarning) as caught:
        cfg = TrainConfig.from_dict({"sae": {"architecture": "jumprelu", "d_sae": 64, "l1_coefficient": 3.0},
                                     "logger": {"wandb_project": "p", "log_to_wandb": False},
                                     "activation_fn": "relu", "matryoshka_widths": "8, 16",
                                     "verbose": True, "is_dataset_tokenized": True, "lr_end": 1e-5})
    messages = " | ".join(str(w.message) for w in caught)
    assert "l1_coefficient is read as l0_coefficient for jumprelu" in messages
    for name in ("verbose", "is_dataset_tokenized", "lr_end"):
        assert f"'{name}' is ignored" in messages
    assert (cfg.architecture, cfg.d_sae, cfg.l0_coefficient, cfg.wandb_project) == ("jumprelu", 64, 3.0, "p")
    assert cfg.matryoshka_widths == [8, 16]


def test_every_saelens_6_runner_field_is_known_here():
    import dataclasses

    from sae_lens import LanguageModelSAERunnerConfig

    ours = {f.name for f in dataclasses.fields(TrainConfig)} | set(TrainConfig._ignored_fields()) | {"sae", "logger"}
    assert [f.name for f in dataclasses.fields(LanguageModelSAERunnerConfig) if f.name not in ours] == []


def test_autocast_is_a_training_setting_and_compression_a_checked_harvest_choice():
    import warnings

    from pipeline.config import HarvestConfig, TrainConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # SAELens's autocast is honoured, so no "ignored field" warning
        assert TrainConfig.from_dict({"autocast": True}).autocast is True
    base = {"hook_names": ["blocks.0.hook_resid_post"]}
    assert HarvestConfig.from_dict({**base, "compression": "zstd"}).compression == "zstd"
    with pytest.raises(ConfigError, match="compression must be one of lz4, zstd, none"):
        HarvestConfig.from_dict({**base, "compression": "lzma"})
