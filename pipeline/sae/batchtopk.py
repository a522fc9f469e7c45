"""The ``batchtopk`` SAE: keep the ``k·B`` largest activations of a whole batch of B tokens.

Recipe (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv:2412.06410; section
numbers refer to that paper), with ``h = (x - b_dec) W_enc + b_enc`` (:meth:`SAE.hidden_pre`):

- training activation (§3.1):  ``f = BatchTopK_k(ReLU(h))`` over the ``[B, d_sae]`` batch: the
  ``n = int(k · B)`` largest entries of ``ReLU(h)`` survive, the rest are 0, so tokens get
  different numbers of latents and the batch averages k (``k`` may be fractional). ``int``
  truncates as SAELens 6.54.12 does, so ``k · B`` in floating point can lose one (0.29 · 100
  gives 28).
- decode:  ``x̂ = f W_dec + b_dec`` with ``W_dec`` rows at unit norm, or, under
  ``rescale_acts_by_decoder_norm``, ``h`` replaced by ``h · ||W_dec,i||`` in the selection and
  ``x̂ = Σ f_i W_dec,i / ||W_dec,i|| + b_dec`` — the decoder handling of ``topk``
  (:class:`~pipeline.sae.topk.TopKFamilySAE`).
- loss:  ``L = ||x - x̂||²₂ + α L_aux`` with ``topk``'s AuxK (Gao et al. 2024, appendix A.2;
  :func:`~pipeline.sae.topk.aux_k_loss`: per-token top ``k_aux`` dead latents, ReLU applied).
- inference (§3.2):  a JumpReLU with one global threshold θ, ``f = ReLU(h) · 1[h > θ]``, so a
  token's latents no longer depend on the rest of its batch. The paper sets θ to the mean over
  batches of the smallest positive selected activation, ``θ = E_X[min{f_ij(X) : f_ij(X) > 0}]``.
  We follow SAELens 6.54.12 instead so that thresholds match it: a float64 buffer
  ``topk_threshold``, starting at 0, is updated after every training forward as an exponential
  moving average ``θ ← (1 - r) θ + r · min{f_ij > 0}`` with ``r = topk_threshold_lr``
  (skipped when no entry is positive), which weighs late batches more than the paper's mean.
- init:  as ``topk`` (random unit decoder rows, ``W_enc = W_decᵀ``, ``b_enc = 0``, geometric-median
  ``b_dec``).

Saving (:meth:`BatchTopKSAE.export`): like SAELens's ``save_inference_model``, the folder holds a
``jumprelu`` SAE — ``W_enc, b_enc, W_dec, b_dec`` and ``threshold = full([d_sae], θ)`` in the SAE
dtype — which :meth:`SAE.load` returns as a :class:`~pipeline.sae.jumprelu.JumpReLUSAE` whose
``encode`` equals :meth:`BatchTopKSAE.encode`. ``metadata`` records ``training_architecture`` and
``training_architecture_details`` (k, ``topk_threshold_lr``), as SAELens does.

Folding an activation scale s leaves ``h`` unchanged (see :meth:`SAE.fold_activation_scale`), so θ
stays as it is. Under ``rescale_acts_by_decoder_norm`` θ is in units of ``h · ||W_dec,i||``; the
decoder norms are folded into the encoder first (:meth:`TopKFamilySAE.fold_decoder_norms`, which
keeps those units), so θ still stays. (SAELens folds the scale without folding the norms and
divides θ by s instead.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.sae.base import SAEConfig, TrainStepOutput
from pipeline.sae.jumprelu import jumprelu
from pipeline.sae.topk import TopKFamilySAE, rank_scores, aux_k_loss, aux_recon_dense, reconstruction_mse


def batch_topk(pre: Tensor, k: float) -> Tensor:
    """``BatchTopK_k(ReLU(pre))`` (Bussmann et al. 2024, §3.1): ``pre: [B, d_sae]`` → same shape
    and dtype, keeping the ``int(k · B)`` largest entries of ``ReLU(pre)`` over the whole batch.

    Raises:
        ValueError: ``int(k · B)`` is 0 (the batch is too small to select any latent).
    """
    acts = torch.relu(pre)
    n_tokens = acts.shape[:-1].numel()
    n_keep = int(k * n_tokens)
    if n_keep == 0:
        raise ValueError(
            f"BatchTopK with k={k} keeps int(k · {n_tokens}) = 0 activations of this batch; "
            "train on batches of at least ceil(1 / k) tokens."
        )
    flat = acts.flatten()
    top = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)


class BatchTopKSAE(TopKFamilySAE):
    """BatchTopK SAE (see the module docstring); parameters as :class:`SAE` plus the float64
    scalar buffer ``topk_threshold``.

    Raises:
        ConfigError: ``k`` is not a number in ``(0, d_sae]``, ``topk_threshold_lr`` is not in
            ``(0, 1]``, or ``k_aux`` is not positive.
    """

    architecture = "batchtopk"

    def __init__(self, cfg: SAEConfig) -> None:
        k = cfg.k
        if k is None or isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= cfg.d_sae:
            raise ConfigError(
                f"architecture {cfg.architecture!r} needs k, the mean number of active latents per "
                f"token, in (0, d_sae={cfg.d_sae}] (fractions allowed), got k={k!r}."
            )
        if not 0 < cfg.topk_threshold_lr <= 1:
            raise ConfigError(f"topk_threshold_lr must be in (0, 1], got {cfg.topk_threshold_lr!r}.")
        super().__init__(cfg)

    def create_parameters(self, kw: dict[str, Any]) -> None:
        """SAELens's four parameters plus ``topk_threshold``: a float64 scalar buffer, 0 at start."""
        super().create_parameters(kw)
        self.register_buffer("topk_threshold", torch.zeros((), dtype=torch.float64, device=kw["device"]))

    def encode(self, x: Tensor) -> Tensor:
        """Inference latents ``ReLU(h) · 1[h > θ]`` with the learnt global θ (§3.2):
        ``[..., d_in] → [..., d_sae]`` dense, parameter dtype (θ cast to it)."""
        self._check_d_in(x)
        return jumprelu(rank_scores(self.hidden_pre(x), self.decoder_norms()), self.topk_threshold)

    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """Loss of ``x: [batch, d_in]``: ``mse_loss + aux_k_coefficient · aux_loss`` plus
        :meth:`nested_losses`; then updates ``topk_threshold`` from this batch's latents.

        ``feature_acts`` is the dense ``[batch, d_sae]`` BatchTopK latents; ``extra`` holds
        ``topk_threshold`` (after the update) and every nested loss. ``sparsity_coefficient`` is
        ignored (k fixes the sparsity); ``dead_mask: [d_sae]`` bool selects the AuxK candidates.

        Raises:
            ValueError: ``x`` is not ``[batch, d_in]``, or the batch is too small for k.
        """
        x, dead_mask = self._training_inputs(x, dead_mask)
        pre = self.hidden_pre(x)
        feature_acts = batch_topk(rank_scores(pre, self.decoder_norms()), self.cfg.k)
        sae_out = self.decode(feature_acts)
        mse_loss = reconstruction_mse(sae_out, x)
        aux_loss = aux_k_loss(x, sae_out, aux_recon_dense(self, pre, dead_mask))
        nested = self.nested_losses(x, feature_acts)
        loss = mse_loss + self.cfg.aux_k_coefficient * aux_loss + sum(nested.values())
        self.update_threshold(feature_acts)
        extra = {"topk_threshold": float(self.topk_threshold)}
        extra.update({name: float(value.detach()) for name, value in nested.items()})
        return TrainStepOutput.build(
            loss, mse_loss, feature_acts, sae_out,
            aux_loss=aux_loss, extra=extra,
        )

    def nested_losses(self, x: Tensor, feature_acts: Tensor) -> dict[str, Tensor]:
        """Further named loss terms added unweighted to the loss (none here; ``matryoshka``
        adds its prefix reconstructions)."""
        return {}

    @torch.no_grad()
    def update_threshold(self, feature_acts: Tensor) -> None:
        """``θ ← (1 - r) θ + r · min{f_ij : f_ij > 0}`` in float64, ``r = topk_threshold_lr``
        (SAELens 6.54.12's EMA; no change when no entry of ``feature_acts: [B, d_sae]`` is > 0)."""
        lr = self.cfg.topk_threshold_lr
        smallest = feature_acts.masked_fill(feature_acts <= 0, float("inf")).min().to(torch.float64)
        updated = (1 - lr) * self.topk_threshold + lr * smallest
        self.topk_threshold.copy_(torch.where(torch.isfinite(smallest), updated, self.topk_threshold))

    def training_details(self) -> dict[str, Any]:
        """Training fields a JumpReLU config has no room for, written to ``metadata``."""
        return {"k": self.cfg.k, "topk_threshold_lr": self.cfg.topk_threshold_lr}

    def export_unit_decoder(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """A ``jumprelu`` config (k removed, ``training_architecture`` and its details added to
        ``metadata``) and tensors ``W_enc, b_enc, W_dec, b_dec`` plus ``threshold [d_sae]`` filled
        with θ in the SAE dtype — what SAELens's ``save_inference_model`` writes."""
        metadata = {**self.cfg.metadata, "training_architecture": self.architecture,
                    "training_architecture_details": self.training_details()}
        cfg = dataclasses.replace(self.cfg, architecture="jumprelu", k=None, metadata=metadata)
        tensors = {name: getattr(self, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
        tensors["threshold"] = torch.full_like(tensors["b_enc"], float(self.topk_threshold))
        return cfg, tensors
