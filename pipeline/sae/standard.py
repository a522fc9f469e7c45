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
- ghost grads (``cfg.use_ghost_grads``; Jermyn & Templeton 2024, Anthropic circuits update,
  "Ghost Grads: An Improvement on Resampling"): an extra loss that gives dead latents a gradient.
  With ``D`` the dead latents, ``h = (x - b_dec) W_enc + b_enc`` and residual ``r = x - x̂``:

  1. ghost activations ``exp(h_D)`` (exponential instead of ReLU, dead latents only);
  2. ghost output ``ĝ = exp(h_D) W_dec[D]``, rescaled per token to half the residual's norm,
     ``g = sg(||r|| / (2 ||ĝ||)) ĝ``;
  3. ``L_ghost_raw = mean_b Σ_d (g - sg(r))²``;
  4. rescaled to equal the MSE numerically, ``L_ghost = sg(L_mse / L_ghost_raw) · L_ghost_raw``,
     and added to the loss (sg = stop-gradient).

  SAELens ≤ 3 (``calculate_ghost_grad_loss``) implements steps 1–3 the same way (its per-token
  ``1e-6`` in step 2 aside) but divides element-wise in step 4, on ``[batch, d_in]`` squared
  errors; we rescale with one batch-level ratio, the plain reading of the update's instruction
  to make the ghost loss numerically equal to the MSE, which avoids element-wise divisions by
  near-zero ghost errors (SAELens's per-element ratio is unbounded; ours is at most 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.sae.base import SAE, TrainStepOutput
from pipeline.sae.sparse import ActiveLatents, csr_kernels_apply, decode_active, encode_active
from pipeline.sae.topk import reconstruction_mse

DECODER_INIT_NORM = 0.1  # April 2024 update: decoder rows start at norm 0.1
# Largest fraction of a batch's latents that may be active for a training step to run on the active
# latents only (pipeline.sae.sparse). On one CPU thread at batch 4096, d_in 384, d_sae 3072 the
# sparse step took 0.55x the dense one at 2% active, 0.83x at 5%, and broke even near 7%.
SPARSE_MAX_DENSITY = 0.05


class _ReLUWeightedL1(torch.autograd.Function):
    """``f = ReLU(h)`` and ``s = mean_b Σ_i f_bi n_i`` (``h: [batch, d_sae]``, ``n = ||W_dec,i||``) as
    one node, ReLU applied to ``h`` in place.

    Backward: ``∂L/∂h = 1[f > 0] ⊙ (∂L/∂f + (∂L/∂s / batch) n)`` and ``∂L/∂n = (∂L/∂s / batch) Σ_b f_b``:
    autograd's graph of the same expression forms the ``[batch, d_sae]`` outer product of the L1
    term and adds it separately (two more passes over the batch's latents and one more tensor).
    """

    @staticmethod
    def forward(ctx, hidden_pre, norms):  # type: ignore[override]
        f = hidden_pre.relu_()
        ctx.mark_dirty(f)
        ctx.save_for_backward(f, norms)
        return f, (f @ norms).mean()

    @staticmethod
    def backward(ctx, grad_f, grad_s):  # type: ignore[override]
        f, norms = ctx.saved_tensors
        rows = f.reshape(-1, f.shape[-1])
        per_row = grad_s / rows.shape[0]
        grad_norms = rows.sum(0) * per_row
        if grad_f is None or not grad_f.is_contiguous():
            grad = (norms * per_row).expand_as(f) if grad_f is None else grad_f + norms * per_row
            return torch.ops.aten.threshold_backward(grad, f, 0.0), grad_norms
        # In training_loss f feeds only the decoder product, whose backward hands over a fresh
        # ∂L/∂f: both passes run in place in it rather than in two new [batch, d_sae] tensors
        # (each a fresh mmap, page-faulted in: ~9% of a d_sae 3072 step on 2 cores).
        grad = grad_f.add_(norms * per_row)
        return torch.ops.aten.threshold_backward.grad_input(grad, f, 0.0, grad_input=grad), grad_norms


class StandardSAE(SAE):
    """ReLU SAE; parameters as in :class:`pipeline.sae.base.SAE`."""

    architecture = "standard"
    use_sparse_kernels = True  # False: always the dense graph (the reference the tests compare with)
    sparsity_coefficient_name = "l1_coefficient"
    sparsity_warm_up_name = "l1_warm_up_steps"

    def reset_parameters(self) -> None:
        self.init_tied_weights(DECODER_INIT_NORM)

    def encode(self, x: Tensor) -> Tensor:
        """``f = ReLU((x - b_dec) W_enc + b_enc)``: ``[..., d_in] → [..., d_sae]``, parameter dtype."""
        self._check_d_in(x)
        return torch.relu(self.hidden_pre(x))

    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """April-update loss of ``x: [batch, d_in]``, plus ghost grads when configured.

        ``mse_loss = mean_b Σ_d (x - x̂)²``, ``sparsity_loss = mean_b Σ_i f_i ||W_dec,i||₂``,
        ``loss = mse_loss + sparsity_coefficient · sparsity_loss`` (+ ``ghost_grad_loss`` when
        ``cfg.use_ghost_grads``; then ``extra["ghost_grad_loss"]`` is reported, 0.0 when no latent
        is dead). ``dead_mask: [d_sae]`` bool (None: none dead) is read by ghost grads only.

        Raises:
            ValueError: ``x``'s last dimension is not ``d_in``.
        """
        self._check_d_in(x)
        x = x.to(self.W_enc.dtype)
        hidden_pre = self.hidden_pre(x)
        if self._sparse_capable(x):
            pre = hidden_pre.detach()
            # the density of every 16th token decides (a pure function of the batch, so resumed and
            # grouped runs take the same path); the full nonzero pass only when sparse
            if float((pre[::16] > 0).float().mean()) <= SPARSE_MAX_DENSITY:
                active = (pre > 0).view(-1).nonzero().squeeze(1)
                return self._sparse_training_loss(x, pre, active, sparsity_coefficient)
        if self.cfg.use_ghost_grads:  # ghost grads read the raw pre-activations
            feature_acts = torch.relu(hidden_pre)
            sparsity_loss = (feature_acts @ self.W_dec.norm(dim=1)).mean()
        else:
            feature_acts, sparsity_loss = _ReLUWeightedL1.apply(hidden_pre, self.W_dec.norm(dim=1))
        sae_out = self.decode(feature_acts)
        mse_loss = reconstruction_mse(sae_out, x)
        loss = mse_loss + sparsity_coefficient * sparsity_loss
        extra: dict[str, float] = {}
        if self.cfg.use_ghost_grads:
            ghost = self.ghost_grad_loss(x, sae_out, hidden_pre, mse_loss, dead_mask)
            if ghost is not None:
                loss = loss + ghost
            extra["ghost_grad_loss"] = 0.0 if ghost is None else float(ghost.detach())
        return TrainStepOutput.build(
            loss, mse_loss, feature_acts, sae_out,
            sparsity_loss=sparsity_loss, extra=extra,
        )

    def _sparse_capable(self, x: Tensor) -> bool:
        """Whether this step may run on the active latents only (:mod:`pipeline.sae.sparse`): CPU
        float32/float64 (MKL's sparse kernels), no autocast, no ghost grads (which need every dead
        latent's pre-activation in the graph)."""
        return (self.use_sparse_kernels and x.dim() == 2 and not self.cfg.use_ghost_grads
                and csr_kernels_apply(self.W_enc))

    def _sparse_training_loss(self, x: Tensor, pre: Tensor, active: Tensor, sparsity_coefficient: float
                              ) -> TrainStepOutput:
        """:meth:`training_loss` (no ghost grads) from the detached pre-activations ``pre: [batch,
        d_sae]`` and the flat positions ``active: [nnz]`` of their positive entries: the same loss,
        and gradients equal to float rounding, through the active latents only."""
        pairs = ActiveLatents.from_flat(active, *pre.shape)
        values = encode_active(self.sae_in(x).detach(), self.W_enc, self.b_enc, self.b_dec, pairs,
                               pre.view(-1)[active], self.cfg.apply_b_dec_to_input)
        sae_out = decode_active(values, self.W_dec, pairs) + self.b_dec
        mse_loss = reconstruction_mse(sae_out, x)
        sparsity_loss = (values * self.W_dec.norm(dim=1)[pairs.cols]).sum() / x.shape[0]
        loss = mse_loss + sparsity_coefficient * sparsity_loss
        return TrainStepOutput.build(loss, mse_loss, pre.relu_(), sae_out, sparsity_loss=sparsity_loss, extra={})

    def ghost_grad_loss(
        self, x: Tensor, sae_out: Tensor, hidden_pre: Tensor, mse_loss: Tensor, dead_mask: Tensor | None
    ) -> Tensor | None:
        """Ghost-grad loss (module docstring, steps 1–4); None when no latent is dead.

        Args:
            x: ``[batch, d_in]`` input; ``sae_out``: its ``[batch, d_in]`` reconstruction.
            hidden_pre: ``[batch, d_sae]`` encoder pre-activations (with their graph).
            mse_loss: the scalar MSE the ghost loss is rescaled to.
            dead_mask: ``[d_sae]`` bool, True for dead latents.

        ``exp`` is taken after subtracting each token's (detached) largest dead pre-activation:
        the per-token rescaling of step 2 cancels that constant factor exactly, in value and
        gradient, and it keeps ``exp`` from overflowing.
        """
        if dead_mask is None or not bool(dead_mask.any()):
            return None
        dead = dead_mask.to(device=hidden_pre.device, dtype=torch.bool)
        pre_dead = hidden_pre[:, dead]
        acts = torch.exp(pre_dead - pre_dead.detach().amax(-1, keepdim=True))
        ghost_out = acts @ self.W_dec[dead]
        residual = (x - sae_out).detach()
        tiny = torch.finfo(ghost_out.dtype).tiny
        scale = residual.norm(dim=-1) / (2 * ghost_out.detach().norm(dim=-1).clamp_min(tiny))
        raw = (scale[:, None] * ghost_out - residual).pow(2).sum(-1).mean()
        # ||g - r|| ≥ ||r|| / 2 per token, so raw ≥ mse / 4 and the ratio below is at most 4.
        return (mse_loss.detach() / raw.detach().clamp_min(tiny)) * raw

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """``b_dec ← mean(x_sample)`` over ``[n, d_in]`` (the centring Bricken et al. use)."""
        self._check_d_in(x_sample)
        self.b_dec.copy_(x_sample.double().mean(0).to(self.b_dec.dtype))
