"""Direct logit attribution of SAE latents, and the tokens each latent's decoder row promotes.

Convention (the usual linearisation of the final norm, TransformerLens's
``ActivationCache.apply_ln_to_stack``): the model computes ``logit_t = N(r) · W_U[:, t] + b_U[t]``
from its final residual stream ``r`` with ``N(r) = w ⊙ P r / s + b_ln``, where ``P`` centres
(LayerNorm: ``P = I - 11ᵀ/d_model``) or is the identity (RMSNorm), ``w``/``b_ln`` are the final
norm's weight and bias (absent ones are 1 and 0, e.g. after TransformerLens folds them into
``W_U``), and ``s`` is its scale (``ln_final.hook_scale``). Freezing ``s`` at its value in the clean
run at the attributed position makes the map linear, ``g(v) = (w ⊙ P v / s) · u`` with ``u =
W_U[:, target]`` (minus ``W_U[:, baseline]`` for a logit difference). Splitting the hook's
activation ``x = Σ_i f_i W_dec[i] + b_dec + e`` (``e = x - x̂``, the SAE's error) gives exactly::

    g(x) + (b_ln · u + b_U · u) = Σ_i f_i g(W_dec[i])  +  g(e)  +  [g(b_dec) + b_ln · u + b_U · u]
            (total)               (latent contributions)  (error)           (bias)

``total`` is the direct-path logit (difference) of the hook's activation: what the logit would be
if the layers after the hook added nothing to the residual stream. For a hook on the final
residual stream (``blocks.{n_layers-1}.hook_resid_post``) it is the model's logit itself; for an
earlier hook the later layers' own direct effects make up the rest (``model_logit - total``).
Only the direct path is measured: effects through later layers are not (Elhage et al. 2021;
Bricken et al. 2023, "logit weights"; Neuronpedia's "top positive/negative logits" use
``W_dec[i] @ W_U`` in the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from pipeline.analysis.features import check_feature_ids
from pipeline.analysis.matching import check_sae_fits_model, tokenize
from pipeline.errors import ConfigError, ModelError
from pipeline.sae import SAE

_CENTRED_NORMS = ("LN", "LNPre")  # TransformerLens's normalization_type values that subtract the mean
_LOGIT_TOLERANCE = 1e-3  # relative; the check that the final norm is read as the model computes it


@dataclass
class Unembed:
    """The model's final norm and unembedding, as the linear map of the module docstring.

    Fields:
        centre: whether the norm subtracts the mean (LayerNorm).
        w: ``[d_model]`` norm weight (ones when the model has none).
        b_ln: ``[d_model]`` norm bias (zeros when none).
        W_U: ``[d_model, d_vocab]``; b_U: ``[d_vocab]``. All float64.
    """

    centre: bool
    w: Tensor
    b_ln: Tensor
    W_U: Tensor
    b_U: Tensor

    def direction(self, v: Tensor) -> Tensor:
        """``w ⊙ P v`` for ``v: [..., d_model]`` (float64): what the norm does to a residual vector, up to 1/s."""
        v = v.double()
        return self.w * (v - v.mean(-1, keepdim=True) if self.centre else v)


def unembed_of(model: Any) -> Unembed:
    """Read the final norm and unembedding of a ``HookedTransformer`` or ``TransformerBridge``."""
    d_model = model.cfg.d_model
    norm = getattr(model, "ln_final", None)
    module = getattr(norm, "_original_component", norm)  # TransformerBridge wraps the HF module
    w = _first_tensor(module, ("w", "weight"))
    b = _first_tensor(module, ("b", "bias"))
    ones, zeros = torch.ones(d_model, dtype=torch.float64), torch.zeros(d_model, dtype=torch.float64)
    return Unembed(centre=model.cfg.normalization_type in _CENTRED_NORMS,
                   w=ones if w is None else w.detach().double().cpu(),
                   b_ln=zeros if b is None else b.detach().double().cpu(),
                   W_U=model.W_U.detach().double().cpu(), b_U=model.b_U.detach().double().cpu())


def _first_tensor(module: Any, names: tuple[str, ...]) -> Tensor | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, Tensor):
            return value
    return None


@dataclass
class LogitAttribution:
    """Direct contributions to one logit (or logit difference) at one position.

    Fields:
        prompt; position (index into the prompt's tokens; its logits predict the next token).
        target, baseline: token strings (baseline None for a plain logit); target_id, baseline_id.
        features: ``[n_active]`` int64 latents active at the position; activations ``[n_active]``.
        contributions: ``[n_active]`` float64 ``f_i g(W_dec[i])``, in logit units (nats).
        error, bias, total: floats as in the module docstring (``total = Σ contributions + error + bias``).
        model_logit: the model's actual logit (difference) at the position.
    """

    prompt: str
    position: int
    target: str
    target_id: int
    baseline: str | None
    baseline_id: int | None
    features: Tensor
    activations: Tensor
    contributions: Tensor
    error: float
    bias: float
    total: float
    model_logit: float

    def top(self, n: int = 10, *, negative: bool = False) -> list[tuple[int, float, float]]:
        """``[(feature, activation, contribution)]``: the n largest contributions (the n most
        negative with ``negative``)."""
        order = torch.argsort(self.contributions, descending=not negative)[:n]
        return [(int(self.features[i]), float(self.activations[i]), float(self.contributions[i])) for i in order]


def single_token(model: Any, token: str | int) -> tuple[int, str]:
    """``(id, string)`` of a token given as an id or a string that is exactly one token.

    Raises:
        ConfigError: a string of several tokens (they are listed) or an id outside the vocabulary.
    """
    if isinstance(token, int):
        token_id = token
        if not 0 <= token_id < model.cfg.d_vocab:
            raise ConfigError(f"token id {token_id} is outside the vocabulary (0 to {model.cfg.d_vocab - 1}).")
        return token_id, _token_string(model, token_id)
    ids = model.to_tokens(token, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        raise ConfigError(f"{token!r} is {len(ids)} tokens {model.to_str_tokens(token, prepend_bos=False)}, not one; "
                          "pass a single token (mind the leading space, e.g. ' Paris').")
    return ids[0], token


@torch.no_grad()
def logit_attribution(model: Any, sae: SAE, prompt: str, target: str | int, *, baseline: str | int | None = None,
                      position: int = -1, model_name: str | None = None) -> LogitAttribution:
    """Each active latent's direct contribution to the ``target`` logit (minus ``baseline``'s) at ``position``.

    See the module docstring for the formula and how the final norm is handled.

    Raises:
        ConfigError: SAE and model do not fit, the hook is not ``d_model`` wide (no direct path
            to the logits), a target that is not one token, or a position outside the prompt.
        ModelError: the model's final norm does not behave as LayerNorm/RMSNorm (checked by
            recomputing the model's own logit).
    """
    hook = check_sae_fits_model(sae, model, model_name=model_name)
    if sae.cfg.d_in != model.cfg.d_model:
        raise ConfigError(f"logit attribution needs a residual-stream-wide hook (d_model {model.cfg.d_model}); "
                          f"{hook!r} is {sae.cfg.d_in} wide. Use an SAE on hook_resid_*, hook_mlp_out or hook_attn_out.")
    tokens = tokenize(model, sae, prompt)
    if not -tokens.shape[1] <= position < tokens.shape[1]:
        raise ConfigError(f"position {position} is outside the prompt's {tokens.shape[1]} tokens.")
    position %= tokens.shape[1]
    target_id, target_str = single_token(model, target)
    baseline_id, baseline_str = single_token(model, baseline) if baseline is not None else (None, None)
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    logits, cache = model.run_with_cache(tokens, names_filter=[hook, final, "ln_final.hook_scale"])
    unembed = unembed_of(model)
    u = _logit_direction(unembed, target_id, baseline_id)
    scale = _frozen_scale(cache, position)
    model_logit = _logit_of(logits[0, position], target_id, baseline_id)
    _check_final_norm(unembed, cache[final][0, position], scale, u, model_logit)
    parts = _decompose(sae, unembed, cache[hook][0, position], scale, u)
    return LogitAttribution(prompt=prompt, position=position, target=target_str, target_id=target_id,
                            baseline=baseline_str, baseline_id=baseline_id, model_logit=model_logit, **parts)


def _logit_direction(unembed: Unembed, target_id: int, baseline_id: int | None) -> tuple[Tensor, float]:
    """``(u [d_model], b_U · u)`` for the target logit or the target-minus-baseline difference."""
    u, bias = unembed.W_U[:, target_id].clone(), float(unembed.b_U[target_id])
    if baseline_id is not None:
        u -= unembed.W_U[:, baseline_id]
        bias -= float(unembed.b_U[baseline_id])
    return u, bias


def _logit_of(logits: Tensor, target_id: int, baseline_id: int | None) -> float:
    value = float(logits[target_id])
    return value - float(logits[baseline_id]) if baseline_id is not None else value


def _frozen_scale(cache: Any, position: int) -> float:
    """The final norm's scale ``s`` at ``position`` in the clean run (1 for a model without a final norm)."""
    try:
        return float(cache["ln_final.hook_scale"][0, position])
    except KeyError:
        return 1.0


def _check_final_norm(unembed: Unembed, r: Tensor, scale: float, u: tuple[Tensor, float], model_logit: float) -> None:
    """Recompute the model's own logit from its final residual ``r`` with the linearised norm."""
    direction, b_u = u
    mine = float(unembed.direction(r.cpu()) @ direction) / scale + float(unembed.b_ln @ direction) + b_u
    if abs(mine - model_logit) > _LOGIT_TOLERANCE * max(1.0, abs(model_logit)):
        raise ModelError(
            f"this model's final norm is not read as LayerNorm/RMSNorm w ⊙ P r / s + b: recomputed logit "
            f"{mine:.4f} vs the model's {model_logit:.4f}, so a direct logit attribution would be wrong. "
            "Logit attribution supports TransformerLens models whose ln_final is LN, LNPre, RMS or RMSPre."
        )


def _decompose(sae: SAE, unembed: Unembed, x: Tensor, scale: float, u: tuple[Tensor, float]) -> dict[str, Any]:
    """The fields of :class:`LogitAttribution` that split the hook's activation ``x: [d_in]``."""
    direction, b_u = u
    x = x.to(sae.W_enc.device).float()
    f = sae.encode(x).double().cpu()
    x_hat = sae.decode(f.to(sae.W_dec.dtype).to(sae.W_dec.device)).double().cpu()
    g = lambda v: unembed.direction(v) @ direction / scale  # noqa: E731  (the linear map g of the docstring)
    active = torch.nonzero(f).flatten()
    # each latent's term f_i W_dec[i] through the SAE's own decode, so architectures that rescale rows stay exact
    scaled_rows = torch.zeros(len(active), sae.cfg.d_sae, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    scaled_rows[torch.arange(len(active)), active.to(scaled_rows.device)] = f[active].to(scaled_rows)
    terms = (sae.decode(scaled_rows) - sae.b_dec).detach().double().cpu()
    contributions = g(terms)
    error = float(g(x.double().cpu() - x_hat))
    bias = float(g(sae.b_dec.detach().cpu())) + float(unembed.b_ln @ direction) + b_u
    return dict(features=active, activations=f[active], contributions=contributions, error=error, bias=bias,
                total=float(contributions.sum()) + error + bias)


@dataclass
class TokenEffects:
    """The tokens whose logits a latent's decoder row raises and lowers most along the direct path.

    Fields: feature; promoted, suppressed: ``[(token string, logit weight)]``, strongest first, where
    the logit weight is ``(w ⊙ P W_dec[f]) · W_U[:, t]`` (the final norm's weight applied, its
    positive scale left out since it does not change the ranking; Bricken et al. 2023 "logit weights").
    """

    feature: int
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]


@torch.no_grad()
def token_effects(model: Any, sae: SAE, features: Sequence[int], n: int = 10) -> dict[int, TokenEffects]:
    """:class:`TokenEffects` of each latent in ``features``, with ``n`` tokens each way.

    Raises:
        ConfigError: latent ids out of range, or an SAE whose d_in is not the model's d_model.
    """
    features = check_feature_ids(sae, features)
    if sae.cfg.d_in != model.cfg.d_model:
        raise ConfigError(f"token effects need a residual-stream-wide SAE (d_model {model.cfg.d_model}); "
                          f"this one has d_in {sae.cfg.d_in}.")
    unembed = unembed_of(model)
    weights = unembed.direction(sae.W_dec.detach().cpu()[features]) @ unembed.W_U  # [n_features, d_vocab]
    out = {}
    for row, feature in zip(weights, features):
        top, bottom = torch.topk(row, n), torch.topk(row, n, largest=False)
        out[feature] = TokenEffects(feature, _named(model, top), _named(model, bottom))
    return out


def _named(model: Any, top: Any) -> list[tuple[str, float]]:
    return [(_token_string(model, int(i)), float(v)) for v, i in zip(top.values, top.indices)]


def _token_string(model: Any, token_id: int) -> str:
    """The token's text, or ``<id>`` for a model without a tokenizer."""
    return model.to_string([token_id]) if getattr(model, "tokenizer", None) is not None else f"<{token_id}>"
