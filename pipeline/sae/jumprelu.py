"""The ``jumprelu`` SAE: a learnt per-latent threshold below which a latent is zeroed.

Recipe (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
Sparse Autoencoders", arXiv:2407.14435, the Gemma Scope architecture; equation numbers refer to
that paper). With ``h = (x - b_dec) W_enc + b_enc`` (:meth:`SAE.hidden_pre`) and ``H`` the
Heaviside step ``H(z) = 1[z > 0]``:

- encode (eq. 4, 8):  ``f = JumpReLU_θ(h) = h · H(h - θ)``, θ ∈ R^{d_sae} (``threshold``). We
  compute ``ReLU(h) · H(h - θ)``, which is the same for θ ≥ 0 (training keeps θ ≥ 0) and is
  what SAELens's inference ``JumpReLUSAE`` computes for any θ.
- decode:  ``x̂ = f W_dec + b_dec``.
- loss (eq. 9):  ``L = ||x - x̂||²₂ + λ · S + c_pre · P`` (every term summed over its last
  dimension and averaged over the batch), where the sparsity penalty ``S`` is

  * ``"step"`` (eq. 10):  ``S = Σ_i H(h_i - θ_i)`` = the L0 norm of f;
  * ``"tanh"`` (Anthropic, circuits updates of January/February 2025):
    ``S = Σ_i tanh(c · f_i · ||W_dec,i||₂)`` with ``c = jumprelu_tanh_scale``;

  and ``P`` is Anthropic's pre-activation loss, on dead latents only as SAELens 6.54.12 applies
  it (``calculate_pre_act_loss``): ``P = Σ_i dead_i · ReLU(θ_i - h_i) · ||W_dec,i||₂``
  (``pre_act_loss_coefficient`` = c_pre; None disables it).
- gradients through the jump (straight-through estimators, eq. 11–12) with the rectangle
  kernel ``K(z) = rect(z) = 1[-½ < z < ½]`` and bandwidth ε = ``jumprelu_bandwidth``:

  * eq. 11:  ``ð/ðθ JumpReLU_θ(h) := -(θ/ε) K((h - θ)/ε)``, ``∂/∂h = H(h - θ)`` (exact);
  * eq. 12:  ``ð/ðθ H(h - θ) := -(1/ε) K((h - θ)/ε)``, and 0 towards ``h``, so the ``step``
    penalty trains only θ (DeepMind's recipe; SAELens's ``jumprelu_ste_to_input=False``).

- θ is projected to ``θ ← max(θ, 0)`` at the start of every :meth:`JumpReLUSAE.training_loss`
  (where SAELens 6.54.12 does it) and again after every optimiser step, so a saved SAE never
  holds a negative threshold. θ is stored in at least float32 whatever the SAE dtype (SAELens
  keeps it float32: Adam's small steps on θ round away in bfloat16) and cast to the dtype of
  ``h`` where it is used.

Decoder and init. The two penalties come from recipes that treat the decoder differently, and
each mode follows its own:

- ``"step"``: the penalty does not involve ``W_dec``. Rows start as random unit vectors and are
  left free by default, as SAELens 6.54.12 leaves them. With ``jumprelu_unit_norm_decoder``
  they are kept at unit norm as DeepMind's recipe does (Gemma Scope, Lieberum et al. 2024,
  arXiv:2408.05147, ships unit-norm decoder rows): like ``topk`` with unit-norm rows, the
  gradient's parallel component is removed before each step and rows are renormalised after. On
  the anchor benchmark (θ₀ 1.5, λ 1, 1M tokens) free rows reached held-out EV 0.842 at L0 20.2;
  unit-norm rows 0.835 at the same L0 (θ₀ 1.35) and 0.828 at L0 16.9 (θ₀ 1.5).
- ``"tanh"``: the penalty carries ``||W_dec,i||`` so that it cannot be dodged by shrinking f and
  growing W_dec; the decoder is unconstrained and its rows start at norm 0.1 (SAELens's
  ``decoder_init_norm`` default, Anthropic's April 2024 update), as in SAELens.

In both, ``W_enc = W_decᵀ``, ``b_enc = 0``, θ = ``jumprelu_init_threshold``, and ``b_dec`` is a
geometric median of data (:meth:`JumpReLUSAE.initialize_from_activations`).

Folding an activation scale s (:meth:`SAE.fold_activation_scale`) leaves ``h`` unchanged —
``(s x - b_dec) W_enc = (x - b_dec/s)(s W_enc)`` — so θ is unchanged too.

Saved tensors (SAELens's names): ``W_enc, b_enc, W_dec, b_dec, threshold [d_sae]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.sae.base import SAE, SAEConfig, TrainStepOutput
from pipeline.sae.topk import geometric_median, normalize_rows, reconstruction_mse, remove_parallel_grad

SPARSITY_LOSS_MODES = ("step", "tanh")
TANH_DECODER_INIT_NORM = 0.1  # SAELens TrainingSAEConfig.decoder_init_norm default


def jumprelu(h: Tensor, threshold: Tensor) -> Tensor:
    """``ReLU(h) · H(h - θ)`` (eq. 4): ``h: [..., d_sae]``, ``threshold``: ``[d_sae]`` or a scalar
    tensor, cast to ``h``'s dtype before comparing. Returns ``h``'s shape and dtype; no STE."""
    return torch.relu(h) * (h > threshold.to(h.dtype))


def rectangle_kernel(h: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """``(1/ε) · K((h - θ)/ε)`` with ``K(z) = 1[-½ < z < ½]``: the kernel of eq. 11–12.

    ``h: [..., d_sae]``, ``threshold: [d_sae]`` → ``[..., d_sae]`` in ``h``'s dtype.
    """
    z = (h - threshold) / bandwidth
    return ((z > -0.5) & (z < 0.5)).to(h.dtype) / bandwidth


def _per_latent_sum(t: Tensor) -> Tensor:
    """``[..., d_sae]`` summed over every leading dimension → ``[d_sae]``."""
    return t.reshape(-1, t.shape[-1]).sum(0)


class _StepSTE(torch.autograd.Function):
    """``H(h - θ)`` forward; backward by eq. 12: ``∂/∂θ = -(1/ε) K((h - θ)/ε)``, nothing to ``h``."""

    @staticmethod
    def forward(ctx, h, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        grad_threshold = -_per_latent_sum(rectangle_kernel(h, threshold, ctx.bandwidth) * grad)
        return None, grad_threshold, None


class _JumpReLUSTE(torch.autograd.Function):
    """``h · H(h - θ)`` forward; backward ``∂/∂h = H(h - θ)`` and, by eq. 11,
    ``∂/∂θ = -(θ/ε) K((h - θ)/ε)``."""

    @staticmethod
    def forward(ctx, h, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        h, threshold = ctx.saved_tensors
        kernel = rectangle_kernel(h, threshold, ctx.bandwidth)
        grad_threshold = -threshold * _per_latent_sum(kernel * grad)
        return (h > threshold).to(grad.dtype) * grad, grad_threshold, None


class JumpReLUSAE(SAE):
    """JumpReLU SAE (see the module docstring): parameters of :class:`SAE` plus ``threshold``.

    Raises:
        ConfigError: ``k`` is set, the sparsity mode is not ``step``/``tanh``, ``bandwidth`` or
            ``tanh_scale`` is not positive, the initial threshold or ``pre_act_loss_coefficient``
            is negative.
    """

    architecture = "jumprelu"
    sparsity_coefficient_name = "l0_coefficient"
    sparsity_warm_up_name = "l0_warm_up_steps"

    def __init__(self, cfg: SAEConfig) -> None:
        _check_config(cfg)
        super().__init__(cfg)

    @property
    def step_mode(self) -> bool:
        return self.cfg.jumprelu_sparsity_loss_mode == "step"

    @property
    def unit_norm_decoder(self) -> bool:
        """True in ``step`` mode with ``jumprelu_unit_norm_decoder`` (Gemma Scope's constraint)."""
        return self.step_mode and self.cfg.jumprelu_unit_norm_decoder

    def create_parameters(self, kw: dict[str, Any]) -> None:
        """SAELens's four tensors plus ``threshold [d_sae]`` in ``promote(dtype, float32)``."""
        super().create_parameters(kw)
        dtype = torch.promote_types(kw["dtype"], torch.float32)
        self.threshold = nn.Parameter(torch.empty(self.cfg.d_sae, dtype=dtype, device=kw["device"]))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Tied init with decoder rows of norm 1 (``step``) or 0.1 (``tanh``); θ = init threshold."""
        self.init_tied_weights(1.0 if self.step_mode else TANH_DECODER_INIT_NORM)
        self.threshold.fill_(self.cfg.jumprelu_init_threshold)

    def encode(self, x: Tensor) -> Tensor:
        """``f = ReLU(h) · H(h - θ)``: ``[..., d_in] → [..., d_sae]`` dense, parameter dtype."""
        self._check_d_in(x)
        return jumprelu(self.hidden_pre(x), self.threshold)

    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """Loss of ``x: [batch, d_in]`` (module docstring, eq. 9).

        ``mse_loss = mean_b Σ_d (x - x̂)²``; ``sparsity_loss`` = S (unweighted, mode-dependent);
        ``aux_loss`` = P, the unweighted pre-activation loss on ``dead_mask: [d_sae]`` (0 when
        disabled or None); ``loss = mse_loss + sparsity_coefficient · S + c_pre · P``.
        ``feature_acts`` is the dense ``[batch, d_sae]`` latents. θ is clamped to ≥ 0 first.
        """
        self._check_d_in(x)
        self.project_threshold()
        x = x.to(self.W_enc.dtype)
        h = self.hidden_pre(x)
        threshold = self.threshold.to(h.dtype)
        feature_acts = _JumpReLUSTE.apply(h, threshold, self.cfg.jumprelu_bandwidth)
        sae_out = self.decode(feature_acts)
        mse_loss = reconstruction_mse(sae_out, x)
        sparsity_loss = self.sparsity_penalty(h, threshold, feature_acts)
        loss = mse_loss + sparsity_coefficient * sparsity_loss
        aux_loss = mse_loss.new_zeros(())
        if self.cfg.pre_act_loss_coefficient is not None and dead_mask is not None:
            aux_loss = self.pre_act_loss(h, threshold, dead_mask.to(h.device))
            loss = loss + self.cfg.pre_act_loss_coefficient * aux_loss
        return TrainStepOutput.build(
            loss, mse_loss, feature_acts, sae_out,
            sparsity_loss=sparsity_loss, aux_loss=aux_loss,
        )

    def sparsity_penalty(self, h: Tensor, threshold: Tensor, feature_acts: Tensor) -> Tensor:
        """Unweighted S, averaged over the batch: ``Σ_i H(h_i - θ_i)`` with the eq. 12 STE
        (``step``, eq. 10) or ``Σ_i tanh(c f_i ||W_dec,i||)`` (``tanh``). ``h, feature_acts:
        [batch, d_sae]``, ``threshold: [d_sae]`` in ``h``'s dtype → scalar."""
        if self.cfg.jumprelu_sparsity_loss_mode == "step":
            per_token = _StepSTE.apply(h, threshold, self.cfg.jumprelu_bandwidth).sum(-1)
        else:
            scaled = self.cfg.jumprelu_tanh_scale * feature_acts * self.W_dec.norm(dim=1)
            per_token = torch.tanh(scaled).sum(-1)
        return per_token.mean()

    def pre_act_loss(self, h: Tensor, threshold: Tensor, dead_mask: Tensor) -> Tensor:
        """Unweighted P = ``mean_b Σ_i dead_i ReLU(θ_i - h_i) ||W_dec,i||`` (Anthropic 2025, as
        SAELens's ``calculate_pre_act_loss``): pulls dead latents' pre-activations up to θ.
        ``h: [batch, d_sae]``, ``dead_mask: [d_sae]`` bool → scalar (0 when nothing is dead)."""
        weights = dead_mask.to(h.dtype) * self.W_dec.norm(dim=1)
        return (torch.relu(threshold - h) @ weights).mean()

    @torch.no_grad()
    def project_threshold(self) -> None:
        """``θ ← max(θ, 0)`` in place (on the data, so θ's gradient is never zeroed by a clamp)."""
        self.threshold.clamp_(min=0.0)

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """``b_dec ← geometric_median(x_sample)`` over ``[n, d_in]`` (as ``topk``)."""
        self._check_d_in(x_sample)
        self.b_dec.copy_(geometric_median(x_sample).to(self.b_dec.dtype))

    def before_optimizer_step(self) -> None:
        """Unit-norm ``step`` mode: project the parallel component out of ``W_dec``'s gradient."""
        if self.unit_norm_decoder:
            remove_parallel_grad(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Clamp θ ≥ 0; in unit-norm ``step`` mode also renormalise ``W_dec`` rows."""
        self.project_threshold()
        if self.unit_norm_decoder:
            normalize_rows(self.W_dec)


def _check_config(cfg: SAEConfig) -> None:
    """Raise :class:`ConfigError` naming the first JumpReLU field that is out of range."""
    if cfg.jumprelu_sparsity_loss_mode not in SPARSITY_LOSS_MODES:
        raise ConfigError(
            f"jumprelu_sparsity_loss_mode={cfg.jumprelu_sparsity_loss_mode!r} is not supported; "
            f"use one of {SPARSITY_LOSS_MODES}."
        )
    for name in ("jumprelu_bandwidth", "jumprelu_tanh_scale"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(cfg, name)!r}.")
    if not cfg.jumprelu_init_threshold >= 0:
        raise ConfigError(f"jumprelu_init_threshold must be >= 0, got {cfg.jumprelu_init_threshold!r}.")
    if cfg.pre_act_loss_coefficient is not None and not cfg.pre_act_loss_coefficient >= 0:
        raise ConfigError(
            f"pre_act_loss_coefficient must be >= 0 (or None to disable), got {cfg.pre_act_loss_coefficient!r}."
        )
