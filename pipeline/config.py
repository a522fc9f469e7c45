"""Typed configs for the stages, loaded from YAML or dicts with clear errors.

Field names follow SAELens where the concept is the same (``d_in``, ``d_sae``, ``l1_coefficient``,
``l1_warm_up_steps``, ``lr_warm_up_steps``, ``train_batch_size_tokens``, ``training_tokens``,
``context_size``, ``prepend_bos``, ``normalize_activations``, ...), so a SAELens user's config reads
the same here. An unknown field is an error naming the closest valid field; a SAELens field that has
no meaning when training from a cache is accepted with a warning that says why it is ignored.
"""

from __future__ import annotations

import difflib
import math
import typing
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from pipeline.cache import COMPRESSIONS
from pipeline.errors import ConfigError
from pipeline.fieldtypes import check_field_type, union_members
from pipeline.sae.registry import ARCHITECTURES

C = TypeVar("C", bound="_Config")

STORAGE_DTYPES = ("float16", "bfloat16", "float32")
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)
NORMALIZE_ACTIVATIONS = ("expected_average_only_in", "none")
LR_SCHEDULERS = ("constant", "cosineannealing")
B_DEC_INITS = ("geometric_median", "mean", "zeros")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Numbers written as strings (YAML reads ``3e-4`` as a string) become the field's number type;
    then the value must have the field's type (:func:`~pipeline.fieldtypes.check_field_type`).

    Raises:
        ConfigError: the value cannot be read as the field's type.
    """
    value = _coerce_number(name, value, hint)
    check_field_type(name, value, hint)
    return value


def _coerce_number(name: str, value: Any, hint: Any) -> Any:
    types_ = [t for t in union_members(hint) if t is not type(None)]
    if value is None:
        return None
    if bool in types_:
        return _coerce_bool(name, value)
    numeric = float if float in types_ else int if int in types_ else None
    if numeric is None or isinstance(value, bool) or not isinstance(value, (str, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and (numeric is float or number.is_integer()):
        return numeric(number)
    raise ConfigError(f"{name} must be {'a number' if numeric is float else 'an integer'}, got {value!r}.")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(f"{name} must be true or false, got {value!r}.")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one
    silently, so ``grid: {k: [8, 16]}`` written twice would drop a sweep's points unseen)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the base constructor names it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (YAML keeps only the last); give it once", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file.

    Raises:
        ConfigError: the file is missing, is not valid YAML (a key given twice in one mapping
            included), or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file.")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of field: value.")
    return data


def check_device(device: str) -> None:
    """Raise ConfigError for a device string torch cannot use on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device ({e}); use e.g. cpu or cuda.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu.")


@dataclass
class _Config:
    """Shared YAML/dict loading and validation."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None) -> C:
        """Build from a dict; unknown keys raise ConfigError naming the closest valid field."""
        data = dict(data or {})
        data = cls._translate(data)
        names = [f.name for f in fields(cls) if f.init]
        for key in list(data):
            if key in cls._ignored_fields():
                warnings.warn(f"config field {key!r} is ignored: {cls._ignored_fields()[key]}", stacklevel=2)
                del data[key]
            elif key not in names:
                close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ConfigError(
                    f"unknown {cls.__name__} field {key!r}.{hint} Valid fields: {', '.join(names)}."
                )
        hints = typing.get_type_hints(cls)
        data = {key: _coerce(key, value, hints[key]) for key, value in data.items()}
        try:
            cfg = cls(**data)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{cls.__name__}: {e}") from e
        cfg.validate()
        if hasattr(cfg, "device"):
            check_device(cfg.device)
        return cfg

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, overrides: dict[str, Any] | None = None) -> C:
        """Load ``path`` (a YAML mapping), apply ``overrides`` (None values are skipped), validate."""
        data = read_yaml_mapping(path)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def _ignored_fields(cls) -> dict[str, str]:
        """SAELens fields accepted for familiarity but meaningless here: name -> why ignored."""
        return {}

    @classmethod
    def _translate(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""

    def _check_positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}.")


@dataclass
class HarvestConfig(_Config):
    """Stage 1: which model, hooks and text to run, and how to store the activations."""

    model_name: str = "smollm2-135m"
    hook_names: list[str] = field(default_factory=lambda: ["blocks.8.hook_resid_post"])
    dataset_path: str = "shakespeare"
    dataset_name: str | None = None
    dataset_split: str = "train"
    text_column: str = "text"
    context_size: int = 128
    prepend_bos: bool = False
    separator: str = "eos"
    n_tokens: int = 200_000
    holdout_tokens: int | None = None  # None: min(16,384, n_tokens // 10)
    store_batch_size_prompts: int = 16
    dtype: str = "float16"
    model_dtype: str = "float32"
    device: str = "cpu"
    chunk_tokens: int = 4096
    chunks_per_shard: int = 8
    compression: str = "lz4"  # lz4 | zstd | none: see pipeline.cache.COMPRESSIONS
    compression_level: int = 3
    output_path: str = "data/harvests/default"
    overwrite: bool = False
    break_lock: bool = False

    @classmethod
    def _translate(cls, data: dict[str, Any]) -> dict[str, Any]:
        if "hook_name" in data:  # SAELens configs name a single hook
            if "hook_names" in data:
                raise ConfigError("give either hook_name or hook_names, not both.")
            data["hook_names"] = [data.pop("hook_name")]
        if "training_tokens" in data and "n_tokens" not in data:  # SAELens CacheActivationsRunnerConfig
            data["n_tokens"] = data.pop("training_tokens")
        if isinstance(data.get("hook_names"), str):
            data["hook_names"] = [h.strip() for h in data["hook_names"].split(",") if h.strip()]
        return data

    def validate(self) -> None:
        self._check_positive("context_size", "n_tokens", "store_batch_size_prompts", "chunk_tokens",
                             "chunks_per_shard")
        self._check_choice("dtype", STORAGE_DTYPES)
        self._check_choice("model_dtype", STORAGE_DTYPES)
        self._check_choice("separator", ("eos", "bos", "none"))
        self._check_choice("compression", COMPRESSIONS)
        if not self.hook_names:
            raise ConfigError("hook_names is empty; name at least one hook, e.g. blocks.8.hook_resid_post.")
        if len(set(self.hook_names)) != len(self.hook_names):
            raise ConfigError(f"hook_names has duplicates: {self.hook_names}.")
        if self.n_tokens < self.context_size:
            raise ConfigError(
                f"n_tokens ({self.n_tokens}) is smaller than one sequence of context_size "
                f"({self.context_size}); raise n_tokens or lower context_size."
            )
        if self.holdout_tokens is not None and not 0 <= self.holdout_tokens < self.n_tokens:
            raise ConfigError(
                f"holdout_tokens ({self.holdout_tokens}) must be >= 0 and below n_tokens ({self.n_tokens}): "
                "lower it (--set holdout_tokens=N; 0 holds none out) or raise n_tokens."
            )
        if not 1 <= self.compression_level <= 22:
            raise ConfigError(f"compression_level must be in 1..22, got {self.compression_level}.")


    @property
    def resolved_holdout_tokens(self) -> int:
        """Tokens kept out of training (rounded up to whole chunks by the cache)."""
        return min(16_384, self.n_tokens // 10) if self.holdout_tokens is None else self.holdout_tokens


# Which training fields each architecture reads; a non-default value of a field no chosen
# architecture reads is warned about (never silently dropped).
ARCHITECTURE_FIELDS: dict[str, tuple[str, ...]] = {
    "k": ("topk", "batchtopk", "matryoshka"),
    "aux_loss_coefficient": ("topk", "batchtopk", "matryoshka"),
    "rescale_acts_by_decoder_norm": ("topk", "batchtopk", "matryoshka"),
    "l1_coefficient": ("standard", "gated"),
    "l1_warm_up_steps": ("standard", "gated"),
    "use_ghost_grads": ("standard",),
    "l0_coefficient": ("jumprelu",),
    "l0_warm_up_steps": ("jumprelu",),
    "jumprelu_init_threshold": ("jumprelu",),
    "jumprelu_bandwidth": ("jumprelu",),
    "jumprelu_sparsity_loss_mode": ("jumprelu",),
    "jumprelu_tanh_scale": ("jumprelu",),
    "jumprelu_unit_norm_decoder": ("jumprelu",),
    "pre_act_loss_coefficient": ("jumprelu",),
    "topk_threshold_lr": ("batchtopk", "matryoshka"),
    "matryoshka_widths": ("matryoshka",),
}
# SAELens LanguageModelSAERunnerConfig fields (6.x and older) about producing activations, which
# the harvest fixed, and runner settings that mean nothing here: accepted with a warning.
_SAELENS_ACTIVATION_FIELDS = (
    "model_class_name", "hook_eval", "hook_head_index", "hook_layer", "hook_point", "hook_point_layer",
    "dataset_trust_remote_code", "streaming", "is_dataset_tokenized", "use_chat_formatting",
    "use_cached_activations", "cached_activations_path", "seqpos_slice", "disable_concat_sequences",
    "sequence_separator_token", "activations_mixing_fraction", "llm_device", "act_store_device",
    "prefetch_llm_batches", "autocast_lm", "compile_llm", "llm_compilation_mode", "model_kwargs",
    "model_from_pretrained_kwargs", "n_batches_for_norm_estimate",
)
_SAELENS_RUNNER_FIELDS = (
    "compile_sae", "sae_compilation_mode", "n_restart_cycles", "n_eval_batches",
    "eval_batch_size_prompts", "save_final_checkpoint", "verbose", "sae_lens_version",
    "sae_lens_training_version", "eval_every_n_wandb_logs", "wandb_id", "wandb_log_frequency_eval",
)
ACTIVATION_FNS = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}


@dataclass
class TrainConfig(_Config):
    """Stage 2: one SAE trained from a cache. Names as in SAELens's LanguageModelSAERunnerConfig.

    Architecture-specific fields (see ``ARCHITECTURE_FIELDS``) keep SAELens's names and defaults:
    ``k`` (TopK family; fractional allowed for batchtopk/matryoshka), ``l1_coefficient`` (standard,
    gated), ``l0_coefficient`` and ``jumprelu_*`` (jumprelu), ``topk_threshold_lr``,
    ``matryoshka_widths``. ``n_checkpoints`` checkpoints land in ``checkpoint_path`` (default
    ``<output_path>/checkpoints``); ``resume_from_checkpoint`` (a checkpoint folder, or ``"latest"``)
    continues a run exactly.
    """

    cache_path: str = "data/harvests/default"
    hook_name: str | None = None
    architecture: str = "topk"
    d_in: int | None = None
    d_sae: int = 4608
    k: float = 32
    l1_coefficient: float = 5.0
    l1_warm_up_steps: int = 0
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_tanh_scale: float = 4.0
    jumprelu_unit_norm_decoder: bool = False
    pre_act_loss_coefficient: float | None = None
    topk_threshold_lr: float = 0.01
    matryoshka_widths: list[int] = field(default_factory=list)
    aux_loss_coefficient: float = 1 / 32
    rescale_acts_by_decoder_norm: bool = True
    use_ghost_grads: bool = False
    apply_b_dec_to_input: bool = True
    lr: float = 4e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float | None = 1.0
    lr_scheduler_name: str = "constant"
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0
    train_batch_size_tokens: int = 4096
    training_tokens: int = 1_000_000
    normalize_activations: str = "expected_average_only_in"
    b_dec_init_method: str = "geometric_median"
    dead_feature_window: int = 250
    feature_sampling_window: int = 100
    dense_feature_threshold: float = 0.1
    resample_dead_latents: bool = False
    exclude_special_tokens: bool = True
    shuffle_buffer_tokens: int = 262_144
    num_workers: int = 2
    prefetch_batches: int = 4
    seed: int = 42
    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = False  # SAELens's name: forward and backward matmuls in bfloat16, fp32 weights
    output_path: str = "data/saes/default"
    n_checkpoints: int = 0
    checkpoint_path: str | None = None
    resume_from_checkpoint: str | None = None
    log_every: int = 50
    log_to_wandb: bool = False
    wandb_project: str = "sae-pipeline"
    wandb_entity: str | None = None
    run_name: str | None = None
    wandb_log_frequency: int = 10
    overwrite: bool = False

    @classmethod
    def _ignored_fields(cls) -> dict[str, str]:
        cache = "activations come from the Zarr cache, which fixes it at harvest time"
        return {
            "context_size": cache,
            "store_batch_size_prompts": cache,
            "prepend_bos": cache,
            "dataset_path": cache,
            "model_name": cache,
            "n_batches_in_buffer": "the loader's shuffle_buffer_tokens sets the mixing buffer",
            "decoder_init_norm": "each architecture initialises its decoder as its paper does",
            "dead_feature_threshold": "a latent is dead after dead_feature_window steps without firing "
                                      "(SAELens 6 never reads this field either)",
            "lr_end": "cosine annealing ends at lr/10 (SAELens's default lr_end)",
            "lp_norm": "the sparsity penalties are the L1 (lp_norm 1) or L0 of their papers",
            "from_pretrained_path": "training starts from a fresh SAE; fine-tuning one is not supported",
            **{name: cache for name in _SAELENS_ACTIVATION_FIELDS},
            **{name: "a SAELens runner setting with no effect when training from a cache"
               for name in _SAELENS_RUNNER_FIELDS},
        }

    @classmethod
    def _translate(cls, data: dict[str, Any]) -> dict[str, Any]:
        for section in ("sae", "logger"):  # SAELens 6 nests these; their fields are ours, flat
            if isinstance(data.get(section), dict):
                data = {**data.pop(section), **data}
        widths = data.get("matryoshka_widths")
        if isinstance(widths, str):
            data["matryoshka_widths"] = [_coerce("matryoshka_widths", w.strip(" []"), int)
                                         for w in widths.split(",") if w.strip(" []")]
        elif isinstance(widths, int):
            data["matryoshka_widths"] = [widths]
        if data.get("architecture") == "jumprelu" and "l1_coefficient" in data and "l0_coefficient" not in data:
            warnings.warn("l1_coefficient is read as l0_coefficient for jumprelu (SAELens <= 5 named the "
                          "JumpReLU L0 weight l1_coefficient)", stacklevel=3)
            data["l0_coefficient"] = data.pop("l1_coefficient")
        kwargs = dict(data.pop("activation_fn_kwargs", None) or {})
        if "k" in kwargs:
            data.setdefault("k", kwargs.pop("k"))
        if kwargs:
            raise ConfigError(f"activation_fn_kwargs has unsupported keys {sorted(kwargs)}; only 'k' is used.")
        if data.get("architecture") == "matryoshka_batchtopk":  # SAELens's name
            data["architecture"] = "matryoshka"
        act = data.pop("activation_fn", None)
        if act is not None:
            cls._check_activation_fn(act, data)
        arch, defaults = data.get("architecture", cls.architecture), cls()
        for name, archs in ARCHITECTURE_FIELDS.items():
            if arch not in archs and name in data and data[name] != getattr(defaults, name):
                warnings.warn(f"config field {name!r} is ignored by architecture {arch!r} "
                              f"(it is read by {', '.join(archs)})", stacklevel=3)
        return data

    @staticmethod
    def _check_activation_fn(act: str, data: dict[str, Any]) -> None:
        """SAELens's older ``activation_fn`` must agree with ``architecture`` (or implies it)."""
        if act not in ACTIVATION_FNS:
            raise ConfigError(f"activation_fn {act!r} is not supported; use one of {', '.join(ACTIVATION_FNS)} "
                              "or set architecture directly.")
        arch = data.setdefault("architecture", ACTIVATION_FNS[act])
        expected = "topk" if arch == "matryoshka" else arch if arch in ("topk", "batchtopk") else "relu"
        if act != expected and not (act == "jumprelu" and arch == "jumprelu"):
            raise ConfigError(
                f"activation_fn {act!r} does not match architecture {arch!r} (expects {expected!r}); "
                "set architecture: topk for activation_fn: topk, or architecture: standard for relu."
            )

    def validate(self) -> None:
        self._check_choice("architecture", ARCHITECTURE_NAMES)
        self._check_choice("normalize_activations", NORMALIZE_ACTIVATIONS)
        self._check_choice("lr_scheduler_name", LR_SCHEDULERS)
        self._check_choice("b_dec_init_method", B_DEC_INITS)
        self._check_choice("dtype", ("float32", "bfloat16"))
        self._check_choice("jumprelu_sparsity_loss_mode", ("step", "tanh"))
        self._check_positive("d_sae", "k", "lr", "train_batch_size_tokens", "training_tokens",
                             "shuffle_buffer_tokens", "num_workers", "prefetch_batches", "log_every",
                             "dead_feature_window", "feature_sampling_window", "d_in",
                             "jumprelu_bandwidth", "wandb_log_frequency", "max_grad_norm")
        for name in ("l1_coefficient", "l0_coefficient", "aux_loss_coefficient", "n_checkpoints",
                     "jumprelu_init_threshold", "topk_threshold_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("l1_warm_up_steps", "l0_warm_up_steps", "lr_warm_up_steps", "lr_decay_steps", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("lr", "l1_coefficient", "l0_coefficient", "aux_loss_coefficient", "jumprelu_init_threshold"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if not 0 <= self.dense_feature_threshold <= 1:
            raise ConfigError(f"dense_feature_threshold is a firing fraction in [0, 1], got {self.dense_feature_threshold}.")
        if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in self.matryoshka_widths):
            raise ConfigError(f"matryoshka_widths must be a list of positive integers such as [128, 512, 4608], "
                              f"got {self.matryoshka_widths!r}.")
        if self.architecture in ARCHITECTURE_FIELDS["k"] and self.k > self.d_sae:
            raise ConfigError(f"k ({self.k:g}) must not exceed d_sae ({self.d_sae}): lower k or raise d_sae.")
        if self.architecture == "topk" and not float(self.k).is_integer():
            raise ConfigError(f"topk needs a whole k, got {self.k}; use batchtopk for a fractional average k.")
        if self.shuffle_buffer_tokens < 2 * self.train_batch_size_tokens:
            raise ConfigError(
                f"shuffle_buffer_tokens ({self.shuffle_buffer_tokens}) must be at least twice "
                f"train_batch_size_tokens ({self.train_batch_size_tokens}) for batches to be mixed."
            )
        if self.n_checkpoints > self.total_steps:
            raise ConfigError(f"n_checkpoints ({self.n_checkpoints}) exceeds the {self.total_steps} training steps.")

    @property
    def total_steps(self) -> int:
        return -(-self.training_tokens // self.train_batch_size_tokens)

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go: ``checkpoint_path`` or ``<output_path>/checkpoints``."""
        return Path(self.checkpoint_path) if self.checkpoint_path else Path(self.output_path) / "checkpoints"


@dataclass
class EvalConfig(_Config):
    """Evaluate one SAE on the cache's holdout slice (and CE loss recovered with the model)."""

    sae_path: str = "data/saes/default"
    cache_path: str | None = None
    n_eval_tokens: int | None = None
    ce_loss: bool = True
    n_ce_sequences: int = 32
    batch_size_prompts: int = 8
    device: str = "cpu"
    output_path: str | None = None

    def validate(self) -> None:
        self._check_positive("n_eval_tokens", "n_ce_sequences", "batch_size_prompts")
