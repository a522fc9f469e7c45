"""Workflow 1: read a model's activations on a text through an SAE, token by token.

::

    model, hook = load_model_for_sae(sae)
    tf = read_features(model, sae, "The Eiffel Tower is in Paris")
    tf.feature_acts            # [pos, d_sae] float32
    tf.top_features(5)         # values, indices: [pos, 5]
    print(format_feature_table(tf, k=5))

Per-token reconstruction figures (SAELens's per-token training metrics): ``mse`` =
``(1/d_in) Σ_d (x - x̂)²``; ``cosine`` = ``x·x̂ / (|x| |x̂|)``; ``explained_variance`` =
``1 - |x - x̂|² / |x - x̄|²`` with ``x̄`` a reference mean (SAELens uses the batch mean; here the
mean over the text's positions unless ``mean=`` gives one, e.g. the cache's
``statistics(hook)["mean"]``, which suits short texts better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from pipeline.analysis.matching import check_sae_fits_model, hook_activations, tokenize
from pipeline.errors import ConfigError
from pipeline.sae import SAE


@dataclass
class TokenFeatures:
    """An SAE's reading of one text.

    Fields:
        tokens: ``[pos]`` int64 token ids (with BOS when the SAE's training data had it).
        str_tokens: the ``pos`` token strings.
        activations: ``[pos, d_in]`` float32, the model's activation at the SAE's hook.
        feature_acts: ``[pos, d_sae]`` float32 latents ``sae.encode(activations)``.
        reconstruction: ``[pos, d_in]`` float32 ``sae.decode(feature_acts)``.
        mean: ``[d_in]`` the reference mean of ``explained_variance`` (see the module docstring).
    """

    tokens: Tensor
    str_tokens: list[str]
    activations: Tensor
    feature_acts: Tensor
    reconstruction: Tensor
    mean: Tensor

    def top_features(self, k: int) -> tuple[Tensor, Tensor]:
        """``(values, indices)``, each ``[pos, k]``: the k largest latents of every token, largest first
        (values may be 0 where fewer than k latents are active)."""
        return torch.topk(self.feature_acts, min(k, self.feature_acts.shape[-1]), dim=-1)

    @property
    def n_active(self) -> Tensor:
        """``[pos]`` int64: latents with a nonzero activation per token (its L0)."""
        return (self.feature_acts != 0).sum(-1)

    @property
    def mse(self) -> Tensor:
        """``[pos]`` mean squared error over d_in, in squared activation units."""
        return (self.activations - self.reconstruction).pow(2).mean(-1)

    @property
    def cosine(self) -> Tensor:
        """``[pos]`` cosine similarity of the activation and its reconstruction."""
        return torch.nn.functional.cosine_similarity(self.activations, self.reconstruction, dim=-1)

    @property
    def explained_variance(self) -> Tensor:
        """``[pos]`` ``1 - |x - x̂|² / |x - x̄|²`` (see the module docstring for x̄)."""
        residual = (self.activations - self.reconstruction).pow(2).sum(-1)
        return 1 - residual / (self.activations - self.mean).pow(2).sum(-1).clamp_min(1e-12)


@torch.no_grad()
def read_features(model: Any, sae: SAE, text: str, *, model_name: str | None = None,
                  mean: Tensor | Sequence[float] | None = None) -> TokenFeatures:
    """Run ``model`` on ``text`` and encode its activations at the SAE's hook.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.
        sae: an SAE of that model (checked, see :func:`~pipeline.analysis.matching.check_sae_fits_model`).
        text: the text; tokenized with BOS when the SAE's training data had it.
        model_name: the name the model was loaded by, to check against the SAE's.
        mean: ``[d_in]`` reference mean for the per-token explained variance (default: the
            mean over the text's positions).

    Raises:
        ConfigError: SAE and model do not fit, or the text is empty or longer than ``n_ctx``.
    """
    hook = check_sae_fits_model(sae, model, model_name=model_name)
    return _read(model, sae, hook, text, mean)


def _read(model: Any, sae: SAE, hook: str, text: str, mean: Tensor | Sequence[float] | None) -> TokenFeatures:
    tokens = tokenize(model, sae, text)
    x = hook_activations(model, tokens, hook)[0]
    f = sae.encode(x.to(sae.W_enc.device)).float()
    x_hat = sae.decode(f).float().to(x.device)
    ref = x.mean(0) if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    return TokenFeatures(tokens=tokens[0].cpu(), str_tokens=list(model.to_str_tokens(tokens[0])),
                         activations=x.cpu(), feature_acts=f.cpu(), reconstruction=x_hat.cpu(), mean=ref.cpu())


def format_feature_table(tf: TokenFeatures, k: int = 5) -> str:
    """A text table, one row per token: position, token, L0, cosine, explained variance, and the
    top-k latents as ``index:activation`` (active ones only)."""
    values, indices = tf.top_features(k)
    rows = [f"{'pos':>4}  {'token':<16} {'L0':>4} {'cos':>6} {'EV':>7}  top features (id:activation)"]
    for p, token in enumerate(tf.str_tokens):
        top = "  ".join(f"{int(i)}:{float(v):.2f}" for v, i in zip(values[p], indices[p]) if v > 0)
        rows.append(f"{p:>4}  {_shown(token):<16} {int(tf.n_active[p]):>4} {float(tf.cosine[p]):>6.3f} "
                    f"{float(tf.explained_variance[p]):>7.3f}  {top or '-'}")
    return "\n".join(rows)


def _shown(token: str, width: int = 16) -> str:
    """A token as a quoted literal (newlines and spaces visible), cut to ``width`` characters."""
    text = repr(token)
    return text if len(text) <= width else text[: width - 1] + "…"


@dataclass
class TextMaxActivations:
    """The largest activation of some latents on each of some texts.

    Fields:
        features: the ``n_features`` latent ids.
        values: ``[n_texts, n_features]`` float32, max over the text's positions.
        positions: ``[n_texts, n_features]`` int64, the position of that max (first if tied).
        tokens: ``[n_texts][n_features]`` the token string at that position.
    """

    features: list[int]
    values: Tensor
    positions: Tensor
    tokens: list[list[str]]

    def ranking(self, feature: int) -> list[int]:
        """Text indices ordered by their max activation of ``feature``, largest first."""
        column = self.values[:, self.features.index(feature)]
        return torch.argsort(column, descending=True, stable=True).tolist()


@torch.no_grad()
def max_activation_over_texts(model: Any, sae: SAE, texts: Sequence[str], features: Sequence[int], *,
                              model_name: str | None = None) -> TextMaxActivations:
    """Which texts activate a latent: the max activation of each of ``features`` on each text.

    Raises:
        ConfigError: no texts, a latent id outside ``[0, d_sae)``, or an SAE/model mismatch.
    """
    features = check_feature_ids(sae, features)
    if not texts:
        raise ConfigError("no texts given; pass at least one.")
    hook = check_sae_fits_model(sae, model, model_name=model_name)
    values, positions, tokens = [], [], []
    for text in texts:
        tf = _read(model, sae, hook, text, None)
        best, where = tf.feature_acts[:, features].max(0)
        values.append(best)
        positions.append(where)
        tokens.append([tf.str_tokens[int(p)] for p in where])
    return TextMaxActivations(features, torch.stack(values), torch.stack(positions), tokens)


def check_feature_ids(sae: SAE, features: Sequence[int]) -> list[int]:
    """``features`` as a list of ints, each checked to lie in ``[0, d_sae)``.

    Raises:
        ConfigError: empty, or an id out of range (the message gives the valid range).
    """
    ids = [int(f) for f in features]
    if not ids:
        raise ConfigError("no latent ids given; pass at least one (e.g. --feature 12).")
    bad = [f for f in ids if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise ConfigError(f"latent id(s) {bad} out of range: this SAE has d_sae {sae.cfg.d_sae}, "
                          f"so ids run from 0 to {sae.cfg.d_sae - 1}.")
    return ids
