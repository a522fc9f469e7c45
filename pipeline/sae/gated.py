"""The ``gated`` SAE: a gate decides which latents fire, a magnitude path decides how strongly.

Recipe (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", arXiv:2404.16014; equation numbers refer to that paper). With
``x̃ = x - b_dec`` (or ``x`` when ``apply_b_dec_to_input`` is off):

- gate (eq. 6):       ``π_gate(x) = x̃ W_enc + b_gate``
- magnitude (eq. 7, weight sharing ``W_mag = W_enc ⊙ exp(r_mag)`` column-wise):
  ``π_mag(x) = x̃ (W_enc ⊙ exp(r_mag)) + b_mag``
- latents (eq. 8):    ``f = 1[π_gate > 0] ⊙ ReLU(π_mag)``
- decode:             ``x̂ = f W_dec + b_dec``
- loss (eq. 9, with the decoder-norm-weighted sparsity term SAELens 6 uses):

  ``L = ||x - x̂||²₂ + λ Σ_i ReLU(π_gate)_i ||W_dec,i||₂ + ||x - (ReLU(π_gate) W_dec + b_dec)||²₂``

  (every term summed over its last dimension and averaged over the batch; no stop-gradient
  anywhere). The last term is the paper's auxiliary reconstruction L_aux, which gives the gate
  path the gradient the Heaviside in eq. 8 cannot. The paper penalises ``λ ||ReLU(π_gate)||₁``
  with decoder rows constrained to unit norm and runs L_aux through a *frozen* copy of the
  decoder. Here, as in SAELens 6.54.12 (``GatedTrainingSAE.calculate_aux_loss``), the constraint
  is dropped and latent i's penalty is weighted by ``||W_dec,i||``; the paper's first author
  says that then the decoder must be seen the same way by both terms, "either unfreeze the
  decoder in the auxiliary task, or freeze the decoder weights where they appear in the sparsity
  penalty; both attain reasonably similar performance, and are definitely better than having
  the decoder weights frozen in one place but not the other" (Rajamanoharan 2024, comment on
  the paper's LessWrong post, lesswrong.com/posts/vdoiWXeouGsZEYgrg, comment N6C2nFatJfeq9hrxM).
  SAELens unfreezes both, and so do we, so that a given ``l1_coefficient`` is the same objective
  with the same gradients in both tools. (Frozen in both terms, nothing held the decoder norms
  back: on the anchor bench at λ = 20, ``||W_dec,i||`` grew from 0.1 to 2.1 on average (up to
  14) while ``W_enc`` shrank, and the SAE collapsed to held-out L0 4 with 63% dead latents.
  Frozen only in L_aux, the penalty shrank ``W_dec`` for free and L0 climbed towards ``d_sae``.)

Parameters, named and shaped as SAELens stores them (weight files interchange): ``W_enc
[d_in, d_sae]``, ``b_gate [d_sae]``, ``r_mag [d_sae]``, ``b_mag [d_sae]``, ``W_dec [d_sae,
d_in]``, ``b_dec [d_in]``; there is no ``b_enc``.

Init (SAELens's ``GatedTrainingSAE`` with its default ``decoder_init_norm = 0.1``, the April
2024 Anthropic heuristic): ``W_dec`` rows random directions of norm 0.1, ``W_enc = W_decᵀ``,
``b_gate = r_mag = b_mag = 0``; ``b_dec`` = mean of a data sample
(:meth:`GatedSAE.initialize_from_activations`). Dead latents get nothing beyond the base class.

Folding an activation scale s (:meth:`SAE.fold_activation_scale`) needs only the base updates:
``(s x - b_dec) W_enc = (x - b_dec/s)(s W_enc)``, and the same holds for ``W_enc ⊙ exp(r_mag)``,
so ``b_gate``, ``r_mag`` and ``b_mag`` stay as they are (SAELens folds the same way).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.sae.base import SAE, TrainStepOutput

DECODER_INIT_NORM = 0.1  # SAELens TrainingSAEConfig.decoder_init_norm default


class GatedSAE(SAE):
    """Gated SAE (see the module docstring for the equations and parameters)."""

    architecture = "gated"
    sparsity_coefficient_name = "l1_coefficient"
    sparsity_warm_up_name = "l1_warm_up_steps"

    def create_parameters(self, kw: dict[str, Any]) -> None:
        """``W_enc, b_gate, r_mag, b_mag, W_dec, b_dec`` (SAELens's names and shapes; no ``b_enc``)."""
        cfg = self.cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows: random directions of norm 0.1; ``W_enc = W_decᵀ``; all biases and ``r_mag`` 0."""
        w_dec = torch.randn(self.cfg.d_sae, self.cfg.d_in, dtype=torch.float32)
        w_dec *= DECODER_INIT_NORM / w_dec.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_dec.T)
        for bias in (self.b_gate, self.r_mag, self.b_mag, self.b_dec):
            bias.zero_()

    # ----------------------------------------------------------------------------- inference
    def _pre_activations(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(π_gate, π_mag)``, both ``[..., d_sae]``, from ``x: [..., d_in]`` (eqs. 6–7).

        ``x̃ (W_enc ⊙ exp(r_mag)) = (x̃ W_enc) ⊙ exp(r_mag)`` (``r_mag`` scales columns), so one
        matmul serves both paths.
        """
        shared = self.sae_in(x) @ self.W_enc
        return shared + self.b_gate, shared * self.r_mag.exp() + self.b_mag

    def gate_pre(self, x: Tensor) -> Tensor:
        """Gate pre-activations ``π_gate = (x - b_dec) W_enc + b_gate``: ``[..., d_in] → [..., d_sae]``."""
        return self.sae_in(x) @ self.W_enc + self.b_gate

    def hidden_pre(self, x: Tensor) -> Tensor:
        """Magnitude pre-activations ``π_mag = (x - b_dec)(W_enc ⊙ exp(r_mag)) + b_mag``
        (what SAELens's gated ``encode_with_hidden_pre`` returns): ``[..., d_in] → [..., d_sae]``."""
        return self._pre_activations(x)[1]

    @staticmethod
    def _combine(pi_gate: Tensor, pi_mag: Tensor) -> Tensor:
        """``f = 1[π_gate > 0] ⊙ ReLU(π_mag)`` (eq. 8); the gate carries no gradient."""
        return (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``f = 1[π_gate > 0] ⊙ ReLU(π_mag)``: ``[..., d_in] → [..., d_sae]``, parameter dtype.

        Raises:
            ValueError: ``x``'s last dimension is not ``d_in``.
        """
        self._check_d_in(x)
        return self._combine(*self._pre_activations(x))

    # ------------------------------------------------------------------------------ training
    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """Gated loss (eq. 9) of ``x: [batch, d_in]``; ``dead_mask`` is unused.

        ``mse_loss = mean_b Σ_d (x - x̂)²``, ``sparsity_loss = mean_b Σ_i ReLU(π_gate)_i ||W_dec,i||``,
        ``aux_loss = mean_b Σ_d (x - ReLU(π_gate) W_dec - b_dec)²``,
        ``loss = mse_loss + sparsity_coefficient · sparsity_loss + aux_loss``; gradients flow
        through every term (SAELens 6.54.12's gated training loss, in value and gradient).

        Raises:
            ValueError: ``x``'s last dimension is not ``d_in``.
        """
        self._check_d_in(x)
        x = x.to(self.W_enc.dtype)
        pi_gate, pi_mag = self._pre_activations(x)
        feature_acts = self._combine(pi_gate, pi_mag)
        sae_out = self.decode(feature_acts)
        mse_loss = (sae_out - x).pow(2).sum(-1).mean()
        gate_acts = torch.relu(pi_gate)
        # The decoder is live in both gate terms (see the module docstring): freezing it in one
        # or both lets the decoder norms drift against the penalty.
        sparsity_loss = (gate_acts @ self.W_dec.norm(dim=1)).mean()
        aux_loss = (self.decode(gate_acts) - x).pow(2).sum(-1).mean()
        loss = mse_loss + sparsity_coefficient * sparsity_loss + aux_loss
        return TrainStepOutput.build(
            loss, mse_loss, feature_acts, sae_out,
            sparsity_loss=sparsity_loss, aux_loss=aux_loss,
        )

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """``b_dec ← mean(x_sample)`` over ``[n, d_in]`` (as ``standard``).

        Raises:
            ValueError: ``x_sample``'s last dimension is not ``d_in``.
        """
        self._check_d_in(x_sample)
        self.b_dec.copy_(x_sample.double().mean(0).to(self.b_dec.dtype))
