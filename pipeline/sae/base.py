"""The SAE base class and its config: what every architecture shares.

An SAE maps an activation ``x: [..., d_in]`` to latents ``f: [..., d_sae]`` and back to a
reconstruction ``x̂: [..., d_in]``. Every architecture stores the same four parameters, named and
shaped as SAELens stores them (so the weight files are interchangeable):

- ``W_enc: [d_in, d_sae]``, ``b_enc: [d_sae]`` (encoder),
- ``W_dec: [d_sae, d_in]``, ``b_dec: [d_in]`` (decoder; ``b_dec`` is also subtracted from the
  input before encoding when ``apply_b_dec_to_input``).

Subclasses implement the activation function (:meth:`SAE.encode`) and the training pieces that
differ between architectures (:meth:`SAE.training_loss`, initialisation, decoder constraints).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError
from pipeline.fieldtypes import check_dataclass_types

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_name(name: str) -> torch.dtype:
    """Map ``"float32"`` (or SAELens's older ``"torch.float32"``) to a torch dtype.

    Raises:
        ConfigError: the name is not one of float32, float64, float16, bfloat16.
    """
    key = name.removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(
            f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}."
        )
    return DTYPES[key]


def closest_name_hint(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` when a valid name is close to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's modules (not its training schedule).

    Fields:
        architecture: registry name, e.g. ``"standard"`` or ``"topk"``.
        d_in: width of the activations the SAE reads (the hook's last dimension).
        d_sae: number of latents.
        k: active latents per token (``topk``; an integer) or on average over a batch
            (``batchtopk``, ``matryoshka``; may be fractional); None for the L1/L0 architectures.
        hook_name: TransformerLens hook the activations come from, e.g. ``blocks.6.hook_resid_post``.
        model_name: model the activations come from.
        dtype: parameter dtype name (float32, float64, float16, bfloat16).
        device: torch device the parameters live on.
        apply_b_dec_to_input: subtract ``b_dec`` from ``x`` before encoding.
        normalize_activations: SAELens field, recorded only. ``"none"`` means the SAE takes raw
            activations; ``"expected_average_only_in"`` means inputs must be scaled by the
            dataset's norm-scaling factor first (use :meth:`SAE.fold_activation_scale` to remove
            that requirement).
        k_aux: AuxK latents per token (``topk`` only); None means ``d_in // 2``
            (Gao et al. 2024, appendix A.2).
        aux_k_coefficient: weight α of the AuxK loss (TopK family); Gao et al. use 1/32.
        rescale_acts_by_decoder_norm: TopK family: free decoder rows, ranked and reported in units
            of ``h · ||W_dec,i||`` (SAELens's field; see :class:`~pipeline.sae.topk.TopKFamilySAE`).
            False keeps the rows at unit norm. Saved SAEs always have it False (norms folded).
        topk_threshold_lr: EMA rate of the inference threshold learnt by ``batchtopk`` and
            ``matryoshka`` (Bussmann et al. 2024, §3.2; SAELens's name and default).
        matryoshka_widths: increasing prefix widths ``m_1 < ... < m_n = d_sae`` (``matryoshka``).
        jumprelu_init_threshold: initial threshold θ of every latent (``jumprelu``).
        jumprelu_bandwidth: width ε of the straight-through rectangle kernel (``jumprelu``).
        jumprelu_sparsity_loss_mode: ``"step"`` (L0 via the step function, Rajamanoharan et al.
            2024b) or ``"tanh"`` (Anthropic's tanh penalty) for ``jumprelu``.
        jumprelu_tanh_scale: c in ``tanh(c · f_i ||W_dec,i||)`` (``tanh`` mode).
        jumprelu_unit_norm_decoder: ``step`` mode: keep ``W_dec`` rows at unit norm (Gemma Scope's
            recipe) instead of leaving them free (SAELens's; the default).
        pre_act_loss_coefficient: weight of Anthropic's pre-activation loss on dead latents
            (``jumprelu``; None disables it).
        use_ghost_grads: add the ghost-grad loss on dead latents (``standard``; Jermyn &
            Templeton 2024, "Ghost grads").
        metadata: free-form provenance written into ``cfg.json``'s ``metadata`` (context_size,
            prepend_bos, dataset, ...). Values must be JSON-serialisable.
    """

    architecture: str
    d_in: int
    d_sae: int
    k: int | float | None = None
    hook_name: str = ""
    model_name: str = ""
    dtype: str = "float32"
    device: str = "cpu"
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    k_aux: int | None = None
    aux_k_coefficient: float = 1.0 / 32.0
    rescale_acts_by_decoder_norm: bool = False
    topk_threshold_lr: float = 0.01
    matryoshka_widths: list[int] = field(default_factory=list)
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    jumprelu_sparsity_loss_mode: str = "step"
    jumprelu_tanh_scale: float = 4.0
    jumprelu_unit_norm_decoder: bool = False
    pre_act_loss_coefficient: float | None = None
    use_ghost_grads: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_dataclass_types(self)  # cfg.json files come from anywhere
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        dtype_from_name(self.dtype)
        self.dtype = self.dtype.removeprefix("torch.")
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ConfigError(
                f"normalize_activations={self.normalize_activations!r} is not supported; use "
                "'none' (raw activations) or 'expected_average_only_in' (inputs pre-scaled)."
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready flat dict of every field (``metadata`` copied)."""
        out = dataclasses.asdict(self)
        out["metadata"] = dict(self.metadata)
        out["matryoshka_widths"] = list(self.matryoshka_widths)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: a key is unknown (the message suggests the closest field name) or a
                required field (architecture, d_in, d_sae) is missing.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(
                    f"unknown SAE config key {key!r}{closest_name_hint(key, names)}; "
                    f"valid keys: {', '.join(names)}."
                )
        missing = [n for n in ("architecture", "d_in", "d_sae") if n not in data]
        if missing:
            raise ConfigError(f"SAE config is missing required key(s) {missing}; add them.")
        return cls(**data)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)


@dataclass
class SparseLatents:
    """Latents stored as the ``k`` active entries per token (TopK training path).

    Fields:
        values: ``[batch, k]`` activations (after ReLU, so some may be 0).
        indices: ``[batch, k]`` int64 latent ids in ``[0, d_sae)``.
        d_sae: number of latents, for :meth:`to_dense`.
    """

    values: Tensor
    indices: Tensor
    d_sae: int

    def to_dense(self) -> Tensor:
        """``[batch, d_sae]`` with zeros outside the selected entries."""
        dense = self.values.new_zeros(*self.values.shape[:-1], self.d_sae)
        return dense.scatter(-1, self.indices, self.values)


@dataclass
class TrainStepOutput:
    """What :meth:`SAE.training_loss` returns to the trainer.

    ``loss = mse_loss + sparsity_coefficient * sparsity_loss + aux_k_coefficient * aux_loss``;
    only ``loss`` carries gradients, the parts are detached scalars for logging.

    Fields:
        loss: scalar to call ``backward()`` on.
        mse_loss: ``||x - x̂||²`` summed over d_in, averaged over the batch.
        sparsity_loss: unweighted sparsity penalty (0 for ``topk``).
        aux_loss: unweighted auxiliary loss (AuxK for ``topk``; 0 for ``standard``).
        feature_acts: ``[batch, d_sae]`` dense latents, or :class:`SparseLatents` for ``topk``;
            pass the whole output to :meth:`SAE.firing_counts` rather than reading it.
        sae_out: ``[batch, d_in]`` reconstruction (detached).
        extra: further named scalars to log (e.g. ``ghost_grad_loss``, ``topk_threshold``,
            ``inner_mse_loss_<width>``), as floats.
    """

    loss: Tensor
    mse_loss: Tensor
    sparsity_loss: Tensor
    aux_loss: Tensor
    feature_acts: Tensor | SparseLatents
    sae_out: Tensor
    extra: dict[str, float] = field(default_factory=dict)

    @classmethod
    def build(cls, loss: Tensor, mse_loss: Tensor, feature_acts: Tensor | SparseLatents, sae_out: Tensor,
              sparsity_loss: Tensor | None = None, aux_loss: Tensor | None = None,
              extra: dict[str, float] | None = None) -> TrainStepOutput:
        """The output with every part but ``loss`` detached; absent losses are 0."""
        zero = mse_loss.new_zeros(())
        acts = feature_acts if isinstance(feature_acts, SparseLatents) else feature_acts.detach()
        return cls(loss=loss, mse_loss=mse_loss.detach(),
                   sparsity_loss=(zero if sparsity_loss is None else sparsity_loss).detach(),
                   aux_loss=(zero if aux_loss is None else aux_loss).detach(),
                   feature_acts=acts, sae_out=sae_out.detach(), extra=dict(extra or {}))


def count_true_per_column(mask: Tensor) -> Tensor:
    """``[d]`` int64: the True entries of each column of ``mask: [n, d]`` (bool).

    ``mask.sum(0)`` first widens every entry to int64 (8 bytes per bool: ~60 ms for a 4096 x 3072
    batch on 2 cores). Here 8 columns travel in one int64 word, each in its own byte, and rows are
    summed in blocks of 128, so a byte counts to at most 128 and never carries into its neighbour;
    the per-block byte counts are then summed as usual (~15 ms).
    """
    n, d = mask.shape
    full = n - n % 128
    if d % 8 or not mask.is_contiguous() or full == 0:
        return mask.sum(0)
    words = mask[:full].view(torch.uint8).view(torch.int64).view(full // 128, 128, d // 8)
    counts = words.sum(1).view(torch.uint8).view(full // 128, d).sum(0)
    return counts + mask[full:].sum(0) if full < n else counts


class _EncoderPre(torch.autograd.Function):
    """``h = (x - c) W_enc + b_enc`` with ``c = b_dec`` (``subtract_b_dec``) or 0.

    Autograd would get ``∂L/∂b_dec`` by forming ``∂L/∂(x - c) = (∂L/∂h) W_encᵀ: [batch, d_in]``
    (a product as large as the encoder's) and summing it over the batch; by linearity it is
    ``-W_enc Σ_b ∂L/∂h_b``, a matrix-vector product. That product is the only difference: the
    other gradients are autograd's. ``∂L/∂x`` is formed only when ``x`` requires grad.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, subtract_b_dec):  # type: ignore[override]
        sae_in = x - b_dec if subtract_b_dec else x
        ctx.save_for_backward(sae_in, W_enc)
        ctx.subtract_b_dec = subtract_b_dec
        return (sae_in @ W_enc).add_(b_enc)  # not addmm, which first copies b_enc into every row

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ W_enc.t() if ctx.needs_input_grad[0] else None
        grad_W_enc = sae_in.reshape(-1, sae_in.shape[-1]).t() @ grad_rows if ctx.needs_input_grad[1] else None
        per_latent = grad_rows.sum(0) if ctx.needs_input_grad[2] or ctx.needs_input_grad[3] else None
        grad_b_enc = per_latent if ctx.needs_input_grad[2] else None
        grad_b_dec = -(W_enc @ per_latent) if ctx.needs_input_grad[3] and ctx.subtract_b_dec else None
        return grad_x, grad_W_enc, grad_b_enc, grad_b_dec, None


class SAE(nn.Module):
    """Base class: parameters, encode/decode/forward, save/load, and the training interface.

    Construct through a subclass (``StandardSAE(cfg)``, ``TopKSAE(cfg)``) or load with
    :meth:`SAE.load`, which picks the subclass from ``cfg.json``.
    """

    architecture: ClassVar[str] = ""
    # The TrainConfig field that weights sparsity_loss ("l1_coefficient", "l0_coefficient") and
    # its warm-up field; None when the architecture fixes sparsity itself (TopK family).
    sparsity_coefficient_name: ClassVar[str | None] = None
    sparsity_warm_up_name: ClassVar[str | None] = None
    # Whether the architecture implements cfg.rescale_acts_by_decoder_norm (the TopK family).
    rescales_by_decoder_norm: ClassVar[bool] = False

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ConfigError(
                f"{type(self).__name__} needs architecture={self.architecture!r}, got "
                f"{cfg.architecture!r}; use get_architecture({cfg.architecture!r}) instead."
            )
        if self.sparsity_coefficient_name is not None and cfg.k is not None:  # penalty architectures
            raise ConfigError(
                f"k={cfg.k} is set but architecture {cfg.architecture!r} has no k; remove k or use a TopK-family "
                "architecture (topk, batchtopk, matryoshka)."
            )
        if cfg.rescale_acts_by_decoder_norm and not self.rescales_by_decoder_norm:
            raise ConfigError(
                f"rescale_acts_by_decoder_norm is only for the TopK family (topk, batchtopk, matryoshka), "
                f"not {cfg.architecture!r}; set it to false."
            )
        self.cfg = cfg
        self.create_parameters({"dtype": cfg.torch_dtype, "device": torch.device(cfg.device)})
        self.reset_parameters()

    def create_parameters(self, kw: dict[str, Any]) -> None:
        """Register the parameters; ``kw`` holds the dtype and device. The default is SAELens's
        four (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``);
        an architecture with other tensors (gated, jumprelu) overrides this. Every registered
        parameter and buffer is saved, under its attribute name, in ``sae_weights.safetensors``."""
        cfg = self.cfg
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))

    # ----------------------------------------------------------------------------- inference
    def reset_parameters(self) -> None:
        """Initialise the parameters (architecture-specific)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_tied_weights(self, decoder_row_norm: float) -> None:
        """``W_dec`` rows: random directions of L2 norm ``decoder_row_norm``; ``W_enc = W_dec^T``;
        biases zero (the tied init of Gao et al. 2024 and Anthropic's April 2024 update)."""
        w_dec = torch.randn(self.cfg.d_sae, self.cfg.d_in, dtype=torch.float32)
        w_dec *= decoder_row_norm / w_dec.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w_dec)
        self.W_enc.copy_(w_dec.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def sae_in(self, x: Tensor) -> Tensor:
        """``x: [..., d_in]`` cast to the parameter dtype, minus ``b_dec`` if configured."""
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def hidden_pre(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``(x - b_dec) W_enc + b_enc``: ``[..., d_in] → [..., d_sae]``,
        through :class:`_EncoderPre` (same values and gradients as plain autograd, one product
        fewer in the backward) unless autocast is on."""
        x = x.to(self.W_enc.dtype)
        if torch.is_autocast_enabled(x.device.type):
            return self.sae_in(x) @ self.W_enc + self.b_enc
        return _EncoderPre.apply(x, self.W_enc, self.b_enc, self.b_dec, self.cfg.apply_b_dec_to_input)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``f: [..., d_in] → [..., d_sae]`` (dense), any number of leading dims."""
        raise NotImplementedError

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Reconstruction ``x̂ = f W_dec + b_dec``: ``[..., d_sae] → [..., d_in]``."""
        return feature_acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """``decode(encode(x))``: ``[..., d_in] → [..., d_in]`` in the parameter dtype."""
        return self.decode(self.encode(x))

    def _check_d_in(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input's last dimension is {x.shape[-1]} but this SAE has d_in={self.cfg.d_in}; "
                f"feed activations of hook {self.cfg.hook_name or '(unknown)'}."
            )

    # ------------------------------------------------------------------------------ training
    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float, dead_mask: Tensor | None
    ) -> TrainStepOutput:
        """Loss of one batch ``x: [batch, d_in]`` (see :class:`TrainStepOutput`).

        Args:
            sparsity_coefficient: λ of the sparsity penalty (ignored by ``topk``).
            dead_mask: ``[d_sae]`` bool, True for latents the trainer counts as dead (used by
                AuxK; ignored by ``standard``). None means no latent is dead.
        """
        raise NotImplementedError

    @staticmethod
    def firing_counts(out: TrainStepOutput) -> Tensor:
        """``[d_sae]`` int64: how many tokens of the batch activated each latent (f > 0)."""
        acts = out.feature_acts
        if isinstance(acts, SparseLatents):
            active = acts.indices[acts.values > 0]
            return torch.bincount(active.flatten(), minlength=acts.d_sae)
        return count_true_per_column((acts > 0).reshape(-1, acts.shape[-1]))

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """Data-dependent init from a sample ``[n, d_in]`` (architecture-specific ``b_dec``)."""
        raise NotImplementedError

    def before_optimizer_step(self) -> None:
        """Hook run after ``backward()`` and before ``optimizer.step()`` (default: nothing)."""

    def after_optimizer_step(self) -> None:
        """Hook run after ``optimizer.step()`` (default: nothing)."""

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale · x`` take raw ``x``.

        Derivation (``c = b_dec`` if ``apply_b_dec_to_input`` else 0, σ the activation):
        the trained SAE computes ``f = σ((s x - c) W_enc + b_enc) = σ((x - c/s)(s W_enc) + b_enc)``,
        so ``W_enc ← s W_enc`` and ``b_dec ← b_dec / s`` give the same latents on raw x
        (``b_enc`` is unchanged). Its reconstruction of ``s x`` is ``f W_dec + b_dec``; dividing by
        s reconstructs raw x: ``x̂ = f (W_dec / s) + b_dec / s``, so ``W_dec ← W_dec / s``.
        SAELens's ``fold_activation_norm_scaling_factor`` applies the same three updates.

        Afterwards ``cfg.normalize_activations`` is ``"none"``. For unit-norm-decoder
        architectures the decoder rows now have norm ``1/s``: fold only after training.

        Raises:
            ConfigError: ``scale`` is not a finite positive number.
        """
        scale = float(scale)
        if not (scale > 0 and torch.isfinite(torch.tensor(scale))):
            raise ConfigError(f"activation scale must be finite and > 0, got {scale}.")
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)
        self.cfg.normalize_activations = "none"

    @torch.no_grad()
    def reinit_latents(self, ids: Tensor, directions: Tensor, encoder_norm: float) -> None:
        """Restart latents ``ids: [n]`` along unit ``directions: [n, d_in]`` (dead-latent resampling).

        ``W_dec[ids] ← directions`` (unit norm), ``W_enc[:, ids] ← encoder_norm · directionsᵀ``, and every other
        per-latent ``[d_sae]`` tensor of the SAE (biases, gate parameters) is reset at ``ids`` to its
        value after :meth:`reset_parameters` (Bricken et al. 2023, "Towards Monosemanticity",
        appendix "Neuron resampling").
        """
        fresh = type(self)(dataclasses.replace(self.cfg, device=str(self.W_dec.device)))
        self.W_dec[ids] = directions.to(self.W_dec.dtype)
        self.W_enc[:, ids] = (encoder_norm * directions).T.to(self.W_enc.dtype)
        for name, tensor in self.named_parameters():
            if name != "b_dec" and tensor.dim() == 1 and tensor.shape[0] == self.cfg.d_sae:
                tensor[ids] = getattr(fresh, name)[ids].to(tensor.dtype)

    # ------------------------------------------------------------------------------------ io
    def export(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """The config and tensors to save (default: ``self.cfg`` and every parameter and buffer).

        An architecture saved as another (BatchTopK → JumpReLU, as SAELens does) overrides this.
        """
        return self.cfg, {name: t.detach() for name, t in self.state_dict().items()}

    @classmethod
    def saelens_cfg_fields(cls, cfg: SAEConfig) -> dict[str, Any]:
        """Architecture-specific top-level keys of SAELens's ``cfg.json`` (default none)."""
        return {}

    @classmethod
    def fields_from_saelens(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """SAEConfig fields read from a SAELens ``cfg.json`` dict ``raw`` (inverse of
        :meth:`saelens_cfg_fields`; default none)."""
        return {}

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, device: str = "cpu"):
        """``(sae, cfg_dict, sparsity)`` for a published SAELens release: the tuple SAELens ≤ 5's
        ``SAE.from_pretrained`` returned (SAELens 6 names it ``from_pretrained_with_cfg_and_sparsity``
        and returns the SAE alone from ``from_pretrained``).

        See :func:`pipeline.sae.pretrained.from_pretrained` (resolution, caching, errors).
        """
        from pipeline.sae.pretrained import from_pretrained

        return from_pretrained(release, sae_id, device=device)

    from_pretrained_with_cfg_and_sparsity = from_pretrained  # SAELens 6's name for the tuple form

    def save(self, path: str | Path, sparsity: Tensor | None = None) -> Path:
        """Write the SAE as a SAELens folder (see :mod:`pipeline.sae.io`); returns the folder.

        Args:
            sparsity: optional ``[d_sae]`` log10 feature density, the tensor SAELens stores in
                ``sparsity.safetensors`` (see :func:`pipeline.sae.io.log_feature_density`).
        """
        from pipeline.sae.io import save_sae

        return save_sae(self, path, sparsity=sparsity)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SAE:
        """Load a SAELens-format folder; returns the subclass named by ``cfg.json``.

        Raises:
            SAEFormatError: missing files, malformed cfg.json, or tensors that disagree with it;
                also when called on a subclass whose architecture differs from the folder's.
        """
        from pipeline.errors import SAEFormatError
        from pipeline.sae.io import load_sae

        sae = load_sae(path, device=device)
        if not isinstance(sae, cls):
            raise SAEFormatError(
                f"{path} holds a {sae.cfg.architecture!r} SAE, not {cls.architecture!r}; "
                "load it with SAE.load(path)."
            )
        return sae
