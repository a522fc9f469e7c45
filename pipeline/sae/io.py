"""Save and load SAE folders in the layout SAELens 6.x writes, so either tool reads the other's.

A folder holds:

- ``cfg.json`` — SAELens's flat config: ``d_in``, ``d_sae``, ``dtype``, ``device``,
  ``apply_b_dec_to_input``, ``normalize_activations``, ``reshape_activations``, ``architecture``,
  the architecture's own keys (``SAE.saelens_cfg_fields``: for ``topk`` ``k`` and
  ``rescale_acts_by_decoder_norm``), and a ``metadata`` dict
  (``sae_lens_version``, ``hook_name``, ``model_name``, ... plus our own ``sae_pipeline`` entry
  with the training fields SAELens has no key for).
- ``sae_weights.safetensors`` — exactly the tensors the architecture registers, under SAELens's
  names: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
  plus ``threshold [d_sae]`` (jumprelu; batchtopk and matryoshka are saved as jumprelu, as SAELens
  saves them) or, for gated, ``b_gate``, ``r_mag``, ``b_mag`` in place of ``b_enc``.
- ``sparsity.safetensors`` (optional) — one tensor ``sparsity [d_sae]``: log10 feature density,
  as SAELens's trainer writes it (:func:`log_feature_density`).

Only JSON and safetensors are ever read (never pickle), and every mismatch between the files
raises :class:`~pipeline.errors.SAEFormatError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from pipeline import __version__
from pipeline.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME, SPARSITY_FILENAME
from pipeline.errors import ConfigError, SAEFormatError
from pipeline.sae.base import SAE, DTYPES, SAEConfig
from pipeline.sae.registry import ALIASES, ARCHITECTURES

# The SAELens release whose folder layout we write; SAELens reads folders without a version (or
# older than 6.0) through a legacy converter, so we state the layout we follow.
SAELENS_FORMAT_VERSION = "6.54.12"
PIPELINE_METADATA_KEY = "sae_pipeline"
_LAYOUT_METADATA_KEYS = ("sae_lens_version", "sae_lens_training_version", "hook_name", "model_name")


def log_feature_density(firing_fraction: Tensor, eps: float = 1e-10) -> Tensor:
    """``log10(p + eps)`` of per-latent firing fractions ``p: [d_sae]`` in [0, 1] → float32 [d_sae].

    The quantity SAELens stores as ``sparsity`` (``_log_feature_sparsity`` in its trainer);
    ``eps`` keeps never-firing latents finite (-10).
    """
    return torch.log10(firing_fraction.detach().double() + eps).float().cpu()


def atomic_write(target: Path, write) -> None:
    """Write through a temporary sibling then rename, so a crash never leaves half a file; a write
    that fails (a full disk) removes its temporary file, so the space comes back."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only filesystem refuses the cleanup too: the write's error is the one to raise
            pass
        raise
    os.replace(tmp, target)


# SAEConfig fields that only training reads; kept in metadata.sae_pipeline so a reloaded SAE
# resumes or fine-tunes with the same settings (SAELens has no keys for them).
TRAINING_FIELDS = ("k_aux", "aux_k_coefficient", "topk_threshold_lr", "matryoshka_widths",
                   "jumprelu_init_threshold", "jumprelu_bandwidth", "jumprelu_sparsity_loss_mode",
                   "jumprelu_tanh_scale", "jumprelu_unit_norm_decoder", "pre_act_loss_coefficient",
                   "use_ghost_grads")


def sae_cfg_dict(cfg: SAEConfig) -> dict[str, Any]:
    """``cfg`` as the ``cfg.json`` dict SAELens writes for this architecture."""
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": SAELENS_FORMAT_VERSION,
        "hook_name": cfg.hook_name,
        "model_name": cfg.model_name,
        **cfg.metadata,
    }
    ours: dict[str, Any] = {"version": __version__}
    ours.update({name: getattr(cfg, name) for name in TRAINING_FIELDS})
    ours["matryoshka_widths"] = list(cfg.matryoshka_widths)
    metadata[PIPELINE_METADATA_KEY] = ours
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": "none",
        "metadata": metadata,
    }
    out.update(ARCHITECTURES[cfg.architecture].saelens_cfg_fields(cfg))
    out["architecture"] = cfg.architecture
    return out


def save_sae(sae: SAE, path: str | Path, sparsity: Tensor | None = None) -> Path:
    """Write ``sae`` to folder ``path`` (created if needed) in SAELens layout; returns the folder.

    Args:
        sparsity: optional ``[d_sae]`` log10 feature density (:func:`log_feature_density`).

    Raises:
        SAEFormatError: ``sparsity`` is not a ``[d_sae]`` tensor.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, tensors = sae.export()
    state = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if sparsity is not None and tuple(sparsity.shape) != (sae.cfg.d_sae,):
        raise SAEFormatError(
            f"sparsity must have shape [d_sae]=[{sae.cfg.d_sae}], got {list(sparsity.shape)}; "
            "pass one log10 density per latent."
        )
    cfg_json = sae_cfg_dict(cfg)
    cfg_json["dtype"] = _dtype_name(state["W_dec"].dtype)
    atomic_write(folder / SAE_WEIGHTS_FILENAME, lambda p: save_file(state, p))
    if sparsity is not None:
        tensor = sparsity.detach().float().cpu().contiguous()
        atomic_write(folder / SPARSITY_FILENAME, lambda p: save_file({"sparsity": tensor}, p))
    # cfg.json last: a folder that has one holds the whole SAE, even after a kill mid-save
    atomic_write(folder / SAE_CFG_FILENAME, lambda p: p.write_text(json.dumps(cfg_json, indent=2)))
    return folder


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _require_file(folder: Path, name: str) -> Path:
    target = folder / name
    if not target.is_file():
        raise SAEFormatError(
            f"{target} is missing; an SAE folder needs {SAE_CFG_FILENAME} and "
            f"{SAE_WEIGHTS_FILENAME} (save it with SAE.save or SAELens's save_model)."
        )
    return target


def read_cfg(path: str | Path) -> SAEConfig:
    """Parse ``cfg.json`` of an SAE folder (ours or SAELens's) into an :class:`SAEConfig`.

    Keys SAELens adds for training (``l1_coefficient``, ``decoder_init_norm``, ...) are ignored.
    Configs from before SAELens 6 (``hook_point``, top-level ``hook_name``/``model_name``, no
    ``architecture``, ``activation_fn_kwargs.k``) are mapped as SAELens maps them.

    Raises:
        SAEFormatError: the file is missing, not JSON, lacks a field, or uses an unsupported
            option (``reshape_activations != 'none'``, runtime ``normalize_activations``).
    """
    cfg_path = _require_file(Path(path), SAE_CFG_FILENAME)
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{cfg_path} is not valid JSON ({err}); rewrite it or re-save the SAE.") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}.")

    metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SAEFormatError(f"{cfg_path}: 'metadata' must be an object, got {type(metadata).__name__}.")
    for key in ("activation_fn_kwargs", PIPELINE_METADATA_KEY):
        holder = metadata if key == PIPELINE_METADATA_KEY else raw
        if not isinstance(holder.get(key) or {}, dict):
            raise SAEFormatError(f"{cfg_path}: {key!r} must be an object, got {holder[key]!r}.")
    architecture = raw.get("architecture")
    if not isinstance(architecture, (str, type(None))):
        raise SAEFormatError(f"{cfg_path}: 'architecture' must be a string, got {architecture!r}.")
    kwargs_k = (raw.get("activation_fn_kwargs") or {}).get("k")
    if architecture is None:  # pre-6.0 SAELens: a topk activation or the standard SAE
        architecture = "topk" if raw.get("activation_fn") == "topk" and kwargs_k else "standard"
    if architecture == "topk" and raw.get("k") is None:
        raw["k"] = kwargs_k
    architecture = ALIASES.get(architecture, architecture)
    if architecture not in ARCHITECTURES:
        raise SAEFormatError(
            f"{cfg_path}: architecture {architecture!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}."
        )
    for name in ("d_in", "d_sae"):
        if not isinstance(raw.get(name), int) or isinstance(raw.get(name), bool):
            raise SAEFormatError(f"{cfg_path}: {name!r} must be an integer, got {raw.get(name)!r}.")
    if raw.get("reshape_activations", "none") != "none":
        raise SAEFormatError(
            f"{cfg_path}: reshape_activations={raw['reshape_activations']!r} (hook_z SAEs) is not "
            "supported; load this SAE with SAELens."
        )
    if raw.get("normalize_activations") in (False, None):
        raw["normalize_activations"] = "none"
    if raw.get("normalize_activations") is True:
        raw["normalize_activations"] = "expected_average_only_in"

    ours = metadata.get(PIPELINE_METADATA_KEY) or {}
    extra = {key: value for key, value in metadata.items()
             if key not in _LAYOUT_METADATA_KEYS and key != PIPELINE_METADATA_KEY}
    fields: dict[str, Any] = dict(
        architecture=architecture,
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        hook_name=metadata.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "",
        model_name=metadata.get("model_name") or raw.get("model_name") or "",
        dtype=raw.get("dtype", "float32"),
        device=raw.get("device", "cpu"),
        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", True),
        normalize_activations=raw.get("normalize_activations", "none"),
        metadata=extra,
    )
    fields.update({key: ours[key] for key in TRAINING_FIELDS if ours.get(key) is not None})
    try:
        fields.update(ARCHITECTURES[architecture].fields_from_saelens(raw))
        cfg = SAEConfig(**fields)
    except ConfigError as err:
        raise SAEFormatError(f"{cfg_path}: {err}") from None
    return cfg


def _ignorable_scaling_factor(f, weights_path: Path) -> set[str]:
    """``{"scaling_factor"}`` when the file holds an all-ones one (SAELens wrote it, unused, for a
    while in 2024 and drops it on load), else an empty set.

    Raises:
        SAEFormatError: a ``scaling_factor`` that is not all ones (SAELens's finetuning scaling).
    """
    if "scaling_factor" not in f.keys():
        return set()
    factor = f.get_tensor("scaling_factor")
    if not torch.equal(factor, torch.ones_like(factor)):
        raise SAEFormatError(
            f"{weights_path} holds a finetuning scaling_factor that is not all ones; that SAELens "
            "feature is not supported here: load this SAE with SAELens."
        )
    return {"scaling_factor"}


def _read_weights(weights_path: Path, sae: SAE) -> dict[str, Tensor]:
    """The tensors of ``weights_path``, checked against the names and shapes ``sae`` registers."""
    expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
    try:
        handle = safe_open(str(weights_path), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise SAEFormatError(f"{weights_path} is not a readable safetensors file ({err}); re-save the SAE.") from None
    with handle as f:
        names = set(f.keys()) - _ignorable_scaling_factor(f, weights_path)
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise SAEFormatError(
                f"{weights_path} has tensors {sorted(names)}; a {sae.cfg.architecture!r} SAE needs exactly "
                f"{sorted(expected)} (missing {missing}, unexpected {unexpected}). Re-save the SAE."
            )
        state = {}
        for name, shape in expected.items():
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != shape:
                raise SAEFormatError(
                    f"{weights_path}: {name} has shape {list(tensor.shape)} but cfg.json "
                    f"(d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) requires {list(shape)}; the weights and "
                    "cfg.json belong to different SAEs."
                )
            state[name] = tensor
    if state["W_dec"].dtype != sae.cfg.torch_dtype:
        raise SAEFormatError(
            f"{weights_path}: W_dec is {state['W_dec'].dtype} but cfg.json says dtype="
            f"{sae.cfg.dtype!r}; fix the dtype field or re-save the SAE."
        )
    return state


def load_sae(path: str | Path, device: str = "cpu") -> SAE:
    """Load an SAE folder written by us or by SAELens (architectures in ``ARCHITECTURES``).

    A SAELens TopK SAE saved with ``rescale_acts_by_decoder_norm=True`` selects on
    ``h_i ||W_dec,i||`` and decodes ``f_i / ||W_dec,i||``; the loader folds those norms into the
    encoder (:meth:`~pipeline.sae.topk.TopKFamilySAE.fold_decoder_norms`: same latents and output,
    unit-norm decoder rows, flag False).

    Returns:
        the registered subclass, parameters on ``device`` in cfg.json's dtype.

    Raises:
        SAEFormatError: missing/unreadable files, or tensors that disagree with cfg.json.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise SAEFormatError(f"SAE folder {folder} does not exist; check the path.")
    cfg = read_cfg(folder)
    cfg.device = device
    try:
        sae = ARCHITECTURES[cfg.architecture](cfg)
    except ConfigError as err:
        raise SAEFormatError(f"{folder / SAE_CFG_FILENAME}: {err}") from None
    state = _read_weights(_require_file(folder, SAE_WEIGHTS_FILENAME), sae)
    targets = sae.state_dict()  # shares storage with the parameters and buffers
    with torch.no_grad():
        for name, tensor in state.items():
            targets[name].copy_(tensor)
    if cfg.rescale_acts_by_decoder_norm:
        sae.fold_decoder_norms()
    return sae


def load_sparsity(path: str | Path) -> Tensor | None:
    """The ``[d_sae]`` log10 feature density in ``sparsity.safetensors``, or None if absent.

    Raises:
        SAEFormatError: the file exists but holds no ``sparsity`` tensor.
    """
    target = Path(path) / SPARSITY_FILENAME
    if not target.is_file():
        return None
    with safe_open(str(target), framework="pt", device="cpu") as f:
        if "sparsity" not in f.keys():
            raise SAEFormatError(f"{target} has no 'sparsity' tensor; delete it or re-save the SAE.")
        return f.get_tensor("sparsity")

