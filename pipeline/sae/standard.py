"""The ``standard`` ReLU SAE with an L1 penalty weighted by decoder norms.

Recipe (Bricken et al. 2023, "Towards Monosemanticity", with Anthropic's April 2024 circuits
update, "Update on how we train SAEs"):

- encode:  ``f = ReLU((x - b_dec) W_enc + b_enc)`` (the ``- b_dec`` only if
  ``apply_b_dec_to_input``)
- decode:  ``x̂ = f W_dec + b_dec``
- loss:    ``L = ||x - x̂||²₂ + λ Σ_i f_i ||W_dec,i||₂`` (April update, eq. for L; squared error
  summed over d_in, both terms averaged over the batch). Weighting by the decoder norm replaces
  the older unit-norm constraint, so ``W_dec`` is left unconstrained.
- init:    ``W_dec`` rows are random directions of norm 0.1 (April update), ``W_enc = W_decᵀ``,
  ``b_enc = 0``; ``b_dec`` = mean of a data sample (:meth:`initialize_from_activations`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.sae.base import SAE, SAEConfig, TrainStepOutput

DECODER_INIT_NORM = 0.1  # April 2024 update: decoder rows start at norm 0.1


class StandardSAE(SAE):
    """ReLU SAE; parameters as in :class:`pipeline.sae.base.SAE`."""

    architecture = "standard"

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is not None:
            raise ConfigError(
                f"k={cfg.k} is set but architecture 'standard' has no k; remove k or use 'topk'."
            )
        super().__init__(cfg)

    def reset_parameters(self) -> None:
        self.init_tied_weights(DECODER_INIT_NORM)

    def encode(self, x: Tensor) -> Tensor:
        """``f = ReLU((x - b_dec) W_enc + b_enc)``: ``[..., d_in] → [..., d_sae]``, parameter dtype."""
        self._check_d_in(x)
        return torch.relu(self.hidden_pre(x))

    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """April-update loss of ``x: [batch, d_in]``.

        ``mse_loss = mean_b Σ_d (x - x̂)²``, ``sparsity_loss = mean_b Σ_i f_i ||W_dec,i||₂``,
        ``loss = mse_loss + sparsity_coefficient · sparsity_loss``; ``dead_mask`` is unused.
        """
        self._check_d_in(x)
        x = x.to(self.W_enc.dtype)
        feature_acts = self.encode(x)
        sae_out = self.decode(feature_acts)
        mse_loss = (sae_out - x).pow(2).sum(-1).mean()
        sparsity_loss = (feature_acts @ self.W_dec.norm(dim=1)).mean()
        loss = mse_loss + sparsity_coefficient * sparsity_loss
        return TrainStepOutput(
            loss=loss,
            mse_loss=mse_loss.detach(),
            sparsity_loss=sparsity_loss.detach(),
            aux_loss=loss.new_zeros(()).detach(),
            feature_acts=feature_acts.detach(),
            sae_out=sae_out.detach(),
        )

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """``b_dec ← mean(x_sample)`` over ``[n, d_in]`` (the centring Bricken et al. use)."""
        self._check_d_in(x_sample)
        self.b_dec.copy_(x_sample.double().mean(0).to(self.b_dec.dtype))
