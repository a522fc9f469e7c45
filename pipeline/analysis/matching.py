"""Pairing an SAE with the model it reads: refuse a mismatch, load the model it names, tokenize as it was trained.

Every analysis entry point that runs a model calls :func:`check_sae_fits_model` first, so an SAE of
another model, hook or width fails with one clear :class:`~pipeline.errors.ConfigError` instead of
a shape error deep inside a forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline import models
from pipeline.errors import ConfigError, HookNameError
from pipeline.sae import SAE


def check_sae_fits_model(sae: SAE, model: Any, *, model_name: str | None = None) -> str:
    """The hook ``sae`` reads on ``model``, after checking the pair fits; returns the hook name.

    Args:
        sae: the SAE (its ``cfg.hook_name``, ``cfg.d_in`` and ``cfg.model_name`` are checked).
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        model_name: the name ``model`` was loaded by (e.g. ``"smollm2-135m"``); compared with
            ``sae.cfg.model_name`` when both are known (TransformerLens aliases such as ``gpt2`` /
            ``gpt2-small`` count as the same model). A loaded model does not reliably carry the
            name it was loaded by, so without it the name is not checked.

    Raises:
        ConfigError: the SAE names no hook, the hook does not exist on the model (with the
            closest names), the hook's width differs from ``d_in``, or the model names differ;
            each message names the fix.
    """
    hook = sae.cfg.hook_name
    if not hook:
        raise ConfigError("the SAE's cfg.json names no hook_name, so it is unknown where it reads the model; "
                          "set hook_name in its cfg.json (e.g. 'blocks.8.hook_resid_post').")
    check_model_name(sae, model_name)
    try:
        width = models.d_in_of(model, hook)
    except HookNameError as err:
        raise ConfigError(f"the SAE reads hook {hook!r}, which this model does not have. {err}") from err
    if width != sae.cfg.d_in:
        raise ConfigError(
            f"the SAE has d_in {sae.cfg.d_in} but the model's {hook!r} is {width} wide, so this SAE was "
            f"trained on another model (cfg.json says {sae.cfg.model_name or 'nothing'}); load that model "
            "or an SAE of this one."
        )
    return hook


def check_model_name(sae: SAE, model_name: str | None) -> None:
    """Refuse ``model_name`` when the SAE's ``cfg.model_name`` names another model (see :func:`same_model`).

    Raises:
        ConfigError: the names differ; the message says which model to load.
    """
    if model_name and sae.cfg.model_name and not same_model(model_name, sae.cfg.model_name):
        raise ConfigError(
            f"the SAE was trained on model {sae.cfg.model_name!r} but the model given is {model_name!r}; "
            f"load {sae.cfg.model_name!r} (e.g. --model {sae.cfg.model_name}) or use an SAE of {model_name!r}."
        )


def same_model(a: str, b: str) -> bool:
    """Whether two model names mean the same model: equal ignoring case, or the same TransformerLens
    official model (``gpt2`` and ``gpt2-small``)."""
    if a.strip().lower() == b.strip().lower():
        return True
    from transformer_lens import loading_from_pretrained as loading

    try:
        return loading.get_official_model_name(a) == loading.get_official_model_name(b)
    except ValueError:
        return False


def load_model_for_sae(sae: SAE, model_name: str | None = None, device: str = "cpu") -> tuple[Any, str]:
    """``(model, hook_name)``: the model ``sae`` was trained on (or ``model_name``), checked to fit.

    Raises:
        ConfigError: no model known (the SAE names none and none was given), or a mismatch (see
            :func:`check_sae_fits_model`).
        ModelError: the model cannot be loaded.
    """
    name = model_name or sae.cfg.model_name
    if not name:
        raise ConfigError("the SAE's cfg.json names no model_name; pass the model (--model NAME).")
    check_model_name(sae, model_name)  # before the slow load
    model = models.load_model(name, device=device)
    return model, check_sae_fits_model(sae, model, model_name=name)


def prepend_bos_for(sae: SAE, model: Any) -> bool:
    """Whether to start a text with BOS: as the SAE's training data did (``cfg.json`` metadata
    ``prepend_bos``, SAELens's field), else the model's default."""
    recorded = sae.cfg.metadata.get("prepend_bos")
    return bool(recorded) if recorded is not None else bool(getattr(model.cfg, "default_prepend_bos", True))


def tokenize(model: Any, sae: SAE, text: str) -> Tensor:
    """``text`` as ``[1, pos]`` int64 token ids on the model's device, with BOS as :func:`prepend_bos_for` says.

    Raises:
        ConfigError: the text gives no tokens, or more than the model's context length ``n_ctx``.
    """
    tokens = model.to_tokens(text, prepend_bos=prepend_bos_for(sae, model))
    if tokens.shape[-1] == 0:
        raise ConfigError("the text is empty; pass some text.")
    if tokens.shape[-1] > model.cfg.n_ctx:
        raise ConfigError(f"the text is {tokens.shape[-1]} tokens, more than the model's context of "
                          f"{model.cfg.n_ctx}; shorten it.")
    return tokens.to(torch.long)


@torch.no_grad()
def hook_activations(model: Any, tokens: Tensor, hook_name: str) -> Tensor:
    """The activation at ``hook_name`` for ``tokens: [batch, pos]``: ``[batch, pos, d_in]`` float32
    (trailing dims flattened), from a forward pass stopped right after the hook's block."""
    _, cache = model.run_with_cache(tokens, names_filter=[hook_name],
                                    stop_at_layer=models.stop_at_layer_for([hook_name]))
    act = cache[hook_name]
    return act.reshape(*act.shape[:2], -1).float()
