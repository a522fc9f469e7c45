"""Reconstruction and downstream metrics of an SAE, each a plain function with its formula.

Conventions: ``x, x_hat: [n_tokens, d_in]`` (leading dims are flattened), ``feature_acts:
[n_tokens, d_sae]``; every metric is a Python float computed in float64. The names match
SAELens's evaluation output (``l0``, ``mse``, ``explained_variance``, ``cosine_similarity``,
``ce_loss_recovered``) so tables line up.

:class:`ReconstructionStats` streams the same metrics over many batches with running float64
sums and gives exactly the one-shot values (up to float64 rounding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.analysis.splice import replace_activation, splice_sae
from pipeline.sae import SAE
from pipeline.sae.base import count_true_per_column

RECONSTRUCTION_KEYS = ("l0", "mse", "explained_variance", "cosine_similarity", "dead_fraction", "n_tokens")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1]).double()


def l0(feature_acts: Tensor) -> float:
    """Mean number of nonzero latents per token: ``L0 = (1/n) Σ_t |{i : f_{t,i} ≠ 0}|``.

    ``feature_acts: [..., d_sae]``. The sparsity measure of Bricken et al. 2023 and SAELens.
    """
    flat = feature_acts.reshape(-1, feature_acts.shape[-1])
    return float((flat != 0).sum(dtype=torch.float64) / flat.shape[0])


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean squared error per element: ``(1/(n·d_in)) Σ_t Σ_d (x - x̂)²``.

    SAELens's ``mse`` metric (``F.mse_loss`` with mean reduction). Note the training loss sums
    over d_in instead; multiply by d_in to compare.
    """
    diff = _flat(x) - _flat(x_hat)
    return float(diff.pow(2).mean())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    """Fraction of variance explained: ``EV = 1 - Σ_t ||x_t - x̂_t||² / Σ_t ||x_t - x̄||²``.

    ``x̄: [d_in]`` is the per-dimension mean over the evaluated tokens, and both sums are pooled
    over tokens and dimensions (so ``EV = 1 - FVU``, the fraction of variance unexplained of
    Gao et al. 2024 §2.2 "normalized MSE"). ``x̂ = x̄`` gives 0, ``x̂ = x`` gives 1; worse than
    the mean gives < 0. Returns nan when the tokens have zero variance.
    """
    xf, hf = _flat(x), _flat(x_hat)
    residual = (xf - hf).pow(2).sum()
    total = (xf - xf.mean(0)).pow(2).sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


def cosine_similarity(x: Tensor, x_hat: Tensor, eps: float = 1e-12) -> float:
    """Mean over tokens of ``cos(x_t, x̂_t) = x_t·x̂_t / (||x_t|| ||x̂_t||)`` (norms clamped by eps)."""
    xf, hf = _flat(x), _flat(x_hat)
    cos = (xf * hf).sum(-1) / (xf.norm(dim=-1) * hf.norm(dim=-1)).clamp_min(eps)
    return float(cos.mean())


def dead_fraction(firing_counts: Tensor) -> float:
    """Fraction of latents that never fired: ``|{i : c_i = 0}| / d_sae`` for counts ``c: [d_sae]``."""
    return float((firing_counts == 0).sum(dtype=torch.float64) / firing_counts.numel())


class ReconstructionStats:
    """Streaming :func:`l0`, :func:`mse`, :func:`explained_variance`, :func:`cosine_similarity`,
    :func:`dead_fraction` over batches.

    The total variance about the pooled mean is accumulated with Chan et al.'s (1979) parallel
    update of per-dimension sums of squared deviations,
    ``M2 ← M2 + M2_b + δ² · n·n_b / (n + n_b)``, ``δ = mean_b - mean``, which avoids the
    cancellation of ``Σx² - n·mean²`` when activations have a large mean.

    >>> stats = ReconstructionStats(d_sae)
    >>> for x in batches: stats.update(x, sae(x), feature_acts=sae.encode(x))
    >>> stats.compute()  # keys: RECONSTRUCTION_KEYS
    """

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae
        self.n_tokens = 0
        self.sq_err = 0.0
        self.n_elements = 0
        self.cos_sum = 0.0
        self.active_sum = 0.0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.firing_counts = torch.zeros(d_sae, dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        x: Tensor,
        x_hat: Tensor,
        *,
        feature_acts: Tensor | None = None,
        firing_counts: Tensor | None = None,
    ) -> None:
        """Add a batch ``x, x_hat: [..., d_in]`` with either ``feature_acts: [..., d_sae]`` or
        ``firing_counts: [d_sae]`` (tokens of this batch on which each latent was nonzero).

        Raises:
            ValueError: neither or both of feature_acts / firing_counts given, or shapes differ.
        """
        if (feature_acts is None) == (firing_counts is None):
            raise ValueError("pass exactly one of feature_acts or firing_counts.")
        if x.shape != x_hat.shape:
            raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} must have the same shape.")
        xf, hf = _flat(x).cpu(), _flat(x_hat).cpu()
        n_b = xf.shape[0]
        if n_b == 0:
            return
        if feature_acts is not None:
            firing_counts = count_true_per_column(feature_acts.reshape(-1, feature_acts.shape[-1]) != 0)
        counts = firing_counts.detach().cpu().to(torch.int64)
        if counts.shape != (self.d_sae,):
            raise ValueError(f"firing counts must have shape [{self.d_sae}], got {list(counts.shape)}.")
        self.firing_counts += counts
        self.active_sum += float(counts.sum())
        self.sq_err += float((xf - hf).pow(2).sum())
        self.n_elements += xf.numel()
        cos = (xf * hf).sum(-1) / (xf.norm(dim=-1) * hf.norm(dim=-1)).clamp_min(1e-12)
        self.cos_sum += float(cos.sum())
        mean_b = xf.mean(0)
        m2_b = (xf - mean_b).pow(2).sum(0)
        if self.mean is None:
            self.mean, self.m2 = mean_b, m2_b
        else:
            n = self.n_tokens
            delta = mean_b - self.mean
            self.m2 = self.m2 + m2_b + delta.pow(2) * (n * n_b / (n + n_b))
            self.mean = self.mean + delta * (n_b / (n + n_b))
        self.n_tokens += n_b

    def compute(self) -> dict[str, float | int]:
        """Metrics so far, keys :data:`RECONSTRUCTION_KEYS` (nan for an empty accumulator)."""
        n = self.n_tokens
        if n == 0:
            return {key: (0 if key == "n_tokens" else float("nan")) for key in RECONSTRUCTION_KEYS}
        total = float(self.m2.sum())
        return {
            "l0": self.active_sum / n,
            "mse": self.sq_err / self.n_elements,
            "explained_variance": 1.0 - self.sq_err / total if total > 0 else float("nan"),
            "cosine_similarity": self.cos_sum / n,
            "dead_fraction": dead_fraction(self.firing_counts),
            "n_tokens": n,
        }


@torch.no_grad()
def ce_loss_recovered(
    model: Any,
    sae: SAE,
    tokens: Tensor,
    hook_name: str,
    batch_size: int = 8,
    exclude_positions_mask: Tensor | None = None,
) -> dict[str, float]:
    """Next-token cross-entropy with the hook's activation replaced by the SAE's reconstruction.

    ``ce_loss_recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 when splicing the SAE in
    costs nothing, 0 when it is as bad as zero-ablating the activation. This is the "CE loss
    recovered" of Bloom et al. (SAELens, ``get_recons_loss`` / ``ce_loss_score``) and the "loss
    recovered" of Bricken et al. 2023.

    Args:
        model: a TransformerLens ``HookedTransformer`` or ``TransformerBridge``; called as
            ``model(tokens, return_type="loss")``, with the SAE (or zeros) spliced in at
            ``hook_name`` by :mod:`pipeline.analysis.splice` for the other two runs.
        sae: the SAE; the hook's trailing dims are flattened into its d_in (``attn.hook_z``).
        tokens: ``[n_seqs, ctx]`` int token ids.
        hook_name: the hook whose activations the SAE reads.
        batch_size: sequences per forward pass.
        exclude_positions_mask: optional ``[n_seqs, ctx]`` bool; True positions keep their clean
            activation in the SAE and zero-ablation runs (e.g. BOS, whose outlier norm SAEs are
            usually not trained on — SAELens's ``ignore_tokens``). The loss still averages all
            predicted tokens.

    Returns:
        ``{"ce_loss_clean", "ce_loss_with_sae", "ce_loss_zero_ablation", "ce_loss_recovered"}``
        in nats per token (the recovered score is a ratio; nan if CE_zero == CE_clean).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [n_seqs, ctx], got shape {tuple(tokens.shape)}.")
    if exclude_positions_mask is not None and exclude_positions_mask.shape != tokens.shape:
        raise ValueError(
            f"exclude_positions_mask {tuple(exclude_positions_mask.shape)} must match tokens {tuple(tokens.shape)}."
        )
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n_seqs = tokens.shape[0]
    for start in tqdm(range(0, n_seqs, batch_size), desc="ce_loss_recovered", leave=False):
        batch = tokens[start : start + batch_size]
        keep = None if exclude_positions_mask is None else exclude_positions_mask[start : start + batch_size]
        # Every sequence has ctx - 1 predicted tokens, so weighting batch means by their
        # sequence count gives the mean over all tokens.
        weight = batch.shape[0] / n_seqs
        totals["clean"] += weight * float(model(batch, return_type="loss"))
        with splice_sae(model, sae, hook_name=hook_name, keep_mask=keep):
            totals["sae"] += weight * float(model(batch, return_type="loss"))
        with replace_activation(model, hook_name, torch.zeros_like, keep):
            totals["zero"] += weight * float(model(batch, return_type="loss"))
    denom = totals["zero"] - totals["clean"]
    recovered = (totals["zero"] - totals["sae"]) / denom if denom != 0 else float("nan")
    return {
        "ce_loss_clean": totals["clean"],
        "ce_loss_with_sae": totals["sae"],
        "ce_loss_zero_ablation": totals["zero"],
        "ce_loss_recovered": recovered,
    }
