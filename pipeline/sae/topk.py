"""The ``topk`` SAE: keep the k largest pre-activations per token (Gao et al. 2024).

Recipe (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv:2406.04093;
section numbers refer to that paper):

- encode (§2.3, eq. 3):  ``f = ReLU(TopK((x - b_dec) W_enc + b_enc))`` — the k largest
  pre-activations survive, then ReLU zeroes any negative survivor (the order SAELens and the
  paper's reference code use).
- decode:  ``x̂ = f W_dec + b_dec``; ``W_dec`` rows are kept at unit norm (§2.1, appendix A.4):
  the gradient component parallel to each row is removed before the optimiser step, and rows are
  renormalised after it. Or, with ``rescale_acts_by_decoder_norm`` (SAELens's training default,
  and ours), rows are free and TopK ranks ``h_i · ||W_dec,i||`` (see :class:`TopKFamilySAE`).
- loss:  ``L = ||x - x̂||²₂ + α · L_aux`` (squared error summed over d_in and averaged over the
  batch, the same normalisation as ``standard``, so losses compare across architectures).
- AuxK (appendix A.2):  ``e = x - x̂`` (detached), ``ê = f_aux W_dec`` where ``f_aux`` keeps the
  ``k_aux`` largest pre-activations among *dead* latents (ReLU applied, as in the paper's
  reference code; no ``b_dec``, which is already in ``x̂``), ``L_aux = ||e - ê||²₂``;
  ``k_aux = d_in // 2`` by default, capped by the number of dead latents; ``α = 1/32``;
  ``L_aux = 0`` when no latent is dead.
- init (§2.1, appendix A.1):  ``W_dec`` rows random unit vectors, ``W_enc = W_decᵀ``,
  ``b_enc = 0``, ``b_dec`` = geometric median of a data sample (:func:`geometric_median`).

Training path: the encoder matmul is dense (``[batch, d_in] @ [d_in, d_sae]``), but after TopK
only ``k`` latents per token carry gradient, so :func:`pipeline.sae.sparse.encode_active` computes
the encoder backward from the selected entries and the decoder runs through the k
selected rows of ``W_dec``. :func:`topk_training_forward_dense` is the plain reference; tests
check the two agree in outputs and gradients. Set ``TopKSAE.use_sparse_kernels = False`` to train
on the reference path.

Shared with ``batchtopk`` and ``matryoshka``: :class:`TopKFamilySAE` (unit-norm decoder, init,
``b_dec``), :func:`aux_recon_dense`, :func:`aux_k_loss` and :func:`reconstruction_mse`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.sae.base import SAE, SAEConfig, SparseLatents, TrainStepOutput
from pipeline.sae.sparse import ActiveLatents, csr_kernels_apply, decode_active, encode_active


def geometric_median(points: Tensor, n_iter: int = 100, eps: float = 1e-8) -> Tensor:
    """Geometric median ``argmin_y Σ_i ||x_i - y||₂`` of ``points: [n, d]`` → ``[d]``.

    Weiszfeld's algorithm (Weiszfeld 1937): ``y ← Σ w_i x_i / Σ w_i`` with
    ``w_i = 1 / max(||x_i - y||, eps)``, started from the mean, in float64. Gao et al. 2024
    (appendix A.1) initialise ``b_dec`` this way, following Bricken et al. 2023.
    """
    x = points.double()
    y = x.mean(0)
    for _ in range(n_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * y.norm().clamp_min(1.0):
            y = y_new
            break
        y = y_new
    return y.to(points.dtype)


@dataclass
class TopKForward:
    """Intermediate results of one TopK training forward pass.

    Fields:
        values: ``[batch, k]`` selected latents after ReLU.
        indices: ``[batch, k]`` int64 selected latent ids.
        sae_out: ``[batch, d_in]`` reconstruction.
        aux_recon: ``[batch, d_in]`` AuxK reconstruction ``ê`` (no ``b_dec``), or None when no
            latent is dead.
    """

    values: Tensor
    indices: Tensor
    sae_out: Tensor
    aux_recon: Tensor | None


def _encode_decode_selected(sae: TopKSAE, sae_in: Tensor, indices: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """``(ReLU(selected), Σ_j ReLU(selected)[b, j] W_dec[indices[b, j]])``: the selected
    latents ``[batch, m]`` with the sparse encoder backward attached, and their decoding
    ``[batch, d_in]`` (no ``b_dec``). Both backward passes go through one :class:`ActiveLatents`
    (one sort); the decoder uses ``F.embedding_bag`` where the CSR kernels do not apply (CUDA,
    half precision, autocast), the same sums in another order."""
    active = ActiveLatents.from_topk(indices, sae.cfg.d_sae)
    weights = torch.relu(encode_active(sae_in, sae.W_enc, sae.b_enc, sae.b_dec, active, selected.reshape(-1),
                                       sae.cfg.apply_b_dec_to_input))
    if csr_kernels_apply(sae.W_dec) and weights.dtype == sae.W_dec.dtype:
        return weights.view_as(selected), decode_active(weights, sae.W_dec, active)
    weights = weights.view_as(selected)
    return weights, F.embedding_bag(indices, sae.W_dec, per_sample_weights=weights, mode="sum")


def _dead_topk(pre: Tensor, dead_ids: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """Top ``k_aux`` of ``pre: [batch, d_sae]`` among latents ``dead_ids: [n_dead]``.

    Returns ``(values, positions)``, both ``[batch, k_aux]``; ``positions`` index ``dead_ids``.
    Selecting the dead columns first keeps the sort over ``n_dead`` columns, not ``d_sae``.
    """
    top = pre.index_select(-1, dead_ids).topk(k_aux, dim=-1, sorted=False)
    return top.values, top.indices


def row_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``scores: [..., d]``: ``(values, indices)``, both
    ``[..., k]``, in no particular order; the values are exactly ``scores.topk(k, dim=-1)``'s (among
    tied entries either may be picked).

    On CPU, two narrow selections replace one wide one. Each row is read as ``s`` segments of
    ``d/s`` columns, and *block* ``j`` holds the ``s`` entries at position ``j`` of every segment
    (columns ``j, j + d/s, ...``). The top ``k`` entries lie in the ``k`` blocks with the largest
    maxima: an entry of any other block is at most its block's maximum, which the ``k`` chosen maxima
    all reach, so ``k`` entries at least as large precede it. So ``topk`` runs over the ``d/s``
    block maxima (a reduction over whole rows of segments, vectorised) and then over the ``k·s``
    entries of the chosen blocks. ``s`` is the divisor of ``d`` nearest ``sqrt(d/k)``. Batch 4096,
    2 cores: d 4608, k 32: 36 → 27 ms; k 128: 90 → 48 ms; d 2304, k 64: 44 → 25 ms
    (``torch.topk`` costs ~5 ns per entry here, spent sorting within each row). Elsewhere, or when
    ``d`` has no such divisor, it is ``torch.topk``.

    Raises:
        RuntimeError: ``k > d`` (``torch.topk``'s "selected index k out of range").
    """
    d = scores.shape[-1]
    s = _segments(d, k) if scores.device.type == "cpu" else 1
    if s == 1:
        top = scores.topk(k, dim=-1, sorted=False)
        return top.values, top.indices
    rows = scores.reshape(-1, d).contiguous()
    n, width = rows.shape[0], d // s
    segments = rows.view(n, s, width)
    blocks = segments.amax(1).topk(k, dim=-1, sorted=False).indices  # [n, k]
    candidates = segments.gather(2, blocks.unsqueeze(1).expand(n, s, k))  # [n, s, k]: the blocks' entries
    top = candidates.view(n, s * k).topk(k, dim=-1, sorted=False)
    segment = top.indices.div(k, rounding_mode="floor")
    columns = segment * width + blocks.gather(1, top.indices - segment * k)
    shape = (*scores.shape[:-1], k)
    return top.values.view(shape), columns.view(shape)


def _segments(d: int, k: int) -> int:
    """How many segments :func:`row_topk` cuts a row of ``d`` into for ``k`` (1: none)."""
    if not 0 < k <= d:
        return 1  # torch.topk answers (k = 0: empty; k > d: its error)
    target = math.sqrt(d / k)
    fits = [s for s in range(2, 17) if d % s == 0 and d // s >= k]
    return min(fits, key=lambda s: abs(s - target)) if target >= 2 and fits else 1


# AuxK runs densely on the [batch, n_dead] block of dead latents while it is at most this many
# times wider than the k_aux selected entries: a contiguous matmul beats the gather/scatter of
# the sparse kernels by about that factor per multiply-add on CPU.
AUX_DENSE_MAX_RATIO = 8


def _aux_k(sae: TopKSAE, n_dead: int) -> int:
    """``k_aux`` (``cfg.k_aux`` or ``d_in // 2``) capped by the number of dead latents."""
    k_aux = sae.cfg.k_aux if sae.cfg.k_aux is not None else sae.cfg.d_in // 2
    return min(k_aux, n_dead)


def topk_training_forward_sparse(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None) -> TopKForward:
    """Training forward on ``x: [batch, d_in]`` through the k selected latents only (fast path)."""
    norms = sae.decoder_norms()
    with torch.no_grad():
        sae_in = sae.sae_in(x)
        # The ranking scores h·||W_dec,i|| straight from the matmul, with the norms folded into the
        # [d_in, d_sae] weights rather than multiplied into the [batch, d_sae] result; a selected h is
        # its score over its (positive) norm.
        # (A @ W).add_(b), not addmm: addmm first copies b into every row of the output (~10% of the
        # product's time at d_sae 4608 on CPU).
        scores = ((sae_in @ sae.W_enc).add_(sae.b_enc) if norms is None
                  else (sae_in @ (sae.W_enc * norms)).add_(sae.b_enc * norms))
        top_values, top_indices = row_topk(scores, sae.cfg.k)
        # under autocast ``scores`` are bfloat16; the selected entries continue in the weights' dtype
        raw = (top_values if norms is None else top_values / norms[top_indices]).to(sae.W_dec.dtype)
    # ReLU(h) weighs the rows of W_dec as they are; latents are reported as ReLU(h)·||W_dec,i||.
    weights, decoded = _encode_decode_selected(sae, sae_in, top_indices, raw)
    sae_out = decoded + sae.b_dec
    values = weights if norms is None else weights * norms[top_indices]
    aux_recon = None
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead > 0:
        k_aux = _aux_k(sae, n_dead)
        dead_ids = dead_mask.nonzero().squeeze(1)
        if n_dead <= AUX_DENSE_MAX_RATIO * k_aux:
            # Few dead latents: plain autograd on the narrow [batch, n_dead] block.
            pre_dead = torch.addmm(
                sae.b_enc.index_select(0, dead_ids), sae.sae_in(x), sae.W_enc.index_select(1, dead_ids)
            )
            if k_aux == n_dead:  # every dead latent is selected; skip the sort
                block = torch.relu(pre_dead)
            else:
                dead_norms = None if norms is None else norms.index_select(0, dead_ids)
                aux_idx = rank_scores(pre_dead.detach(), dead_norms).topk(k_aux, dim=-1, sorted=False).indices
                block = torch.zeros_like(pre_dead).scatter(-1, aux_idx, torch.relu(pre_dead.gather(-1, aux_idx)))
            aux_recon = block @ sae.W_dec.index_select(0, dead_ids)
        else:
            with torch.no_grad():
                aux_scores, positions = _dead_topk(scores, dead_ids, k_aux)
                aux_ids = dead_ids[positions]
                aux_raw = (aux_scores if norms is None else aux_scores / norms[aux_ids]).to(sae.W_dec.dtype)
            _, aux_recon = _encode_decode_selected(sae, sae_in, aux_ids, aux_raw)
    return TopKForward(values, top_indices, sae_out, aux_recon)


def rank_scores(pre: Tensor, norms: Tensor | None) -> Tensor:
    """What TopK selection ranks: ``pre`` itself, or ``pre · ||W_dec,i||`` (``norms: [d_sae]`` or
    the matching slice) under ``rescale_acts_by_decoder_norm``."""
    return pre if norms is None else pre * norms


def aux_recon_dense(sae: TopKFamilySAE, pre: Tensor, dead_mask: Tensor | None) -> Tensor | None:
    """AuxK reconstruction ``ê = f_aux W_dec`` from dense pre-activations ``pre: [batch, d_sae]``.

    ``f_aux`` keeps, per token, the ``k_aux`` largest entries of ``pre`` (ranked as
    :func:`rank_scores` says) among latents with ``dead_mask: [d_sae]`` True, ReLU applied (Gao et al.
    2024, appendix A.2). Returns
    ``[batch, d_in]`` in the parameter dtype, or None when no latent is dead.
    """
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead == 0:
        return None
    masked = rank_scores(pre.detach(), sae.decoder_norms()).masked_fill(~dead_mask, float("-inf"))
    aux_idx = masked.topk(_aux_k(sae, n_dead), dim=-1, sorted=False).indices
    aux_dense = torch.zeros_like(pre).scatter(-1, aux_idx, torch.relu(pre.gather(-1, aux_idx)))
    return aux_dense @ sae.W_dec


def topk_training_forward_dense(sae: TopKSAE, x: Tensor, dead_mask: Tensor | None) -> TopKForward:
    """Reference training forward: dense ``[batch, d_sae]`` latents and plain matmuls."""
    pre = sae.hidden_pre(x)
    norms = sae.decoder_norms()
    indices = rank_scores(pre.detach(), norms).topk(sae.cfg.k, dim=-1, sorted=False).indices
    weights = torch.relu(pre.gather(-1, indices))
    dense = torch.zeros_like(pre).scatter(-1, indices, weights)
    sae_out = dense @ sae.W_dec + sae.b_dec
    values = weights if norms is None else weights * norms[indices]
    return TopKForward(values, indices, sae_out, aux_recon_dense(sae, pre, dead_mask))


def reconstruction_mse(sae_out: Tensor, x: Tensor) -> Tensor:
    """``mean_b Σ_d (x - x̂)²`` of ``[batch, d_in]`` tensors: the squared error every
    architecture trains on (summed over d_in, averaged over tokens; SAELens's normalisation).
    ``F.mse_loss`` does it in one pass each way (half the time of the sub/pow/sum graph)."""
    return F.mse_loss(sae_out, x, reduction="sum") / (x.numel() // x.shape[-1])


def aux_k_loss(x: Tensor, sae_out: Tensor, aux_recon: Tensor | None) -> Tensor:
    """AuxK loss ``L_aux = mean_b ||e - ê||²₂`` with ``e = x - x̂`` detached (Gao et al. 2024,
    appendix A.2); a zero scalar when ``aux_recon`` is None (no dead latent)."""
    if aux_recon is None:
        return sae_out.new_zeros(())
    return reconstruction_mse(aux_recon, (x - sae_out).detach())


@torch.no_grad()
def remove_parallel_grad(W_dec: Tensor) -> None:
    """Remove from each row's gradient its component along the row, in place.

    ``g_i ← g_i - (g_i·w_i / w_i·w_i) w_i`` (Bricken et al. 2023; Gao et al. 2024 A.4), so a step
    moves rows tangentially to the unit sphere and the renormalisation after it is small.
    ``W_dec: [d_sae, d_in]``; nothing happens when it has no gradient.
    """
    grad = W_dec.grad
    if grad is None:
        return
    coef = (grad * W_dec).sum(1, keepdim=True) / (W_dec * W_dec).sum(1, keepdim=True).clamp_min(1e-30)
    grad.sub_(coef * W_dec)


@torch.no_grad()
def normalize_rows(W_dec: Tensor) -> None:
    """Rescale every row of ``W_dec: [d_sae, d_in]`` to unit L2 norm, in place."""
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


class TopKFamilySAE(SAE):
    """What ``topk``, ``batchtopk`` and ``matryoshka`` share: the decoder-norm handling, tied
    init, a geometric-median ``b_dec`` and AuxK's ``k_aux``.

    Decoder norms, two ways (``cfg.rescale_acts_by_decoder_norm``):

    - False (Gao et al. 2024, §2.1 and A.4): ``W_dec`` rows are kept at unit norm — the gradient
      component parallel to each row is removed before the optimiser step and rows are
      renormalised after it.
    - True (SAELens's TopK training default, same name): ``W_dec`` is free. Selection ranks
      ``h_i · ||W_dec,i||``, the reconstruction is ``Σ_selected ReLU(h_i) W_dec,i + b_dec``, and the
      reported latent is ``f_i = ReLU(h_i) · ||W_dec,i||`` (what the latent would be with that row
      rescaled to unit norm, so ``x̂ = Σ f_i W_dec,i / ||W_dec,i|| + b_dec``). :meth:`fold_decoder_norms`
      turns it into the unit-norm form exactly (saving does this).

    Raises:
        ConfigError: ``k_aux`` is set and not positive.
    """

    rescales_by_decoder_norm = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k_aux is not None and cfg.k_aux <= 0:
            raise ConfigError(f"k_aux must be positive (or None for d_in // 2), got {cfg.k_aux}.")
        super().__init__(cfg)

    def reset_parameters(self) -> None:
        self.init_tied_weights(1.0)  # unit-norm decoder rows (kept so unless rescaling)

    def decoder_norms(self) -> Tensor | None:
        """``[d_sae]`` row norms ``||W_dec,i||`` (no gradient) when ``rescale_acts_by_decoder_norm``,
        else None (rows are unit norm)."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            return None
        return self.W_dec.detach().norm(dim=1).clamp_min(1e-12)

    def decoder_weights(self, feature_acts: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """Reported latents ``feature_acts: [..., stop - start]`` (latents ``start:stop``) turned into
        the weights of the rows of ``W_dec`` in the reconstruction (divided by the row norms when
        rescaling; unchanged otherwise)."""
        norms = self.decoder_norms()
        return feature_acts if norms is None else feature_acts / norms[start:stop]

    def decode(self, feature_acts: Tensor) -> Tensor:
        """``x̂ = (f / ||W_dec||) W_dec + b_dec`` when rescaling, else ``f W_dec + b_dec``:
        ``[..., d_sae] → [..., d_in]``."""
        return self.decoder_weights(feature_acts.to(self.W_dec.dtype)) @ self.W_dec + self.b_dec

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make the decoder unit norm without changing any latent or reconstruction: with
        ``n = ||W_dec,i||``, ``W_enc[:, i] ← n W_enc[:, i]``, ``b_enc ← n b_enc``, ``W_dec,i ← W_dec,i / n``
        (SAELens's ``fold_W_dec_norm`` for TopK). Sets ``rescale_acts_by_decoder_norm`` to False."""
        norms = self.decoder_norms()
        if norms is None:
            return
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)
        self.W_dec.div_(norms[:, None])
        self.cfg.rescale_acts_by_decoder_norm = False

    @torch.no_grad()
    def fold_activation_scale(self, scale: float) -> None:
        """:meth:`SAE.fold_activation_scale` after :meth:`fold_decoder_norms` (so a BatchTopK
        threshold, in units of the rescaled latents, stays valid)."""
        self.fold_decoder_norms()
        super().fold_activation_scale(scale)

    def export(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """What :meth:`export_unit_decoder` gives for a copy with the decoder norms folded (so saved
        SAEs always have unit-norm rows and plain TopK/JumpReLU encoders, as SAELens saves them)."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            return self.export_unit_decoder()
        folded = copy.deepcopy(self)
        folded.fold_decoder_norms()
        return folded.export_unit_decoder()

    def export_unit_decoder(self) -> tuple[SAEConfig, dict[str, Tensor]]:
        """The config and tensors to save once decoder norms are folded (default: all of them)."""
        return super().export()

    def _training_inputs(self, x: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x: [batch, d_in]`` cast to the parameter dtype and ``dead_mask: [d_sae]`` as bool on
        ``x``'s device (None stays None).

        Raises:
            ValueError: ``x`` is not 2-D or its last dimension is not ``d_in``.
        """
        self._check_d_in(x)
        if x.dim() != 2:
            raise ValueError(f"training_loss takes x: [batch, d_in], got shape {tuple(x.shape)}.")
        if dead_mask is not None:
            dead_mask = dead_mask.to(device=x.device, dtype=torch.bool)
        return x.to(self.W_enc.dtype), dead_mask

    @torch.no_grad()
    def initialize_from_activations(self, x_sample: Tensor) -> None:
        """``b_dec ← geometric_median(x_sample)`` over ``[n, d_in]`` (Gao et al. 2024, A.1)."""
        self._check_d_in(x_sample)
        self.b_dec.copy_(geometric_median(x_sample).to(self.b_dec.dtype))

    def before_optimizer_step(self) -> None:
        """Unit-norm mode: project the parallel component out of ``W_dec``'s gradient
        (:func:`remove_parallel_grad`)."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            remove_parallel_grad(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Unit-norm mode: renormalise every ``W_dec`` row to unit L2 norm (:func:`normalize_rows`)."""
        if not self.cfg.rescale_acts_by_decoder_norm:
            normalize_rows(self.W_dec)


class TopKSAE(TopKFamilySAE):
    """TopK SAE; ``cfg.k`` latents are active per token. Parameters as in :class:`SAE`."""

    architecture = "topk"
    use_sparse_kernels: bool = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.k is None or isinstance(cfg.k, bool) or not 0 < cfg.k <= cfg.d_sae:
            raise ConfigError(
                f"architecture 'topk' needs an integer k in [1, d_sae={cfg.d_sae}], got k={cfg.k!r}."
            )
        super().__init__(cfg)

    @classmethod
    def saelens_cfg_fields(cls, cfg: SAEConfig) -> dict:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": cfg.rescale_acts_by_decoder_norm}

    @classmethod
    def fields_from_saelens(cls, raw: dict) -> dict:
        k = raw.get("k")
        if not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= raw["d_sae"]:
            raise ConfigError(f"topk needs an integer 'k' in [1, d_sae], got {k!r}.")
        rescale = raw.get("rescale_acts_by_decoder_norm", False)
        if not isinstance(rescale, bool):
            raise ConfigError(f"topk 'rescale_acts_by_decoder_norm' must be true or false, got {rescale!r}.")
        return {"k": k, "rescale_acts_by_decoder_norm": rescale}

    def encode(self, x: Tensor) -> Tensor:
        """``f = ReLU(TopK(h))`` with ``h = hidden_pre(x)`` (times ``||W_dec,i||`` when rescaling):
        ``[..., d_in] → [..., d_sae]`` dense, parameter dtype."""
        self._check_d_in(x)
        pre = rank_scores(self.hidden_pre(x), self.decoder_norms())
        values, indices = row_topk(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))

    def training_loss(
        self, x: Tensor, *, sparsity_coefficient: float = 0.0, dead_mask: Tensor | None = None
    ) -> TrainStepOutput:
        """Loss of ``x: [batch, d_in]``: ``mse_loss + aux_k_coefficient · aux_loss``.

        ``feature_acts`` is a :class:`SparseLatents` (``[batch, k]`` values and indices).
        ``sparsity_coefficient`` is ignored (TopK fixes L0 = k); ``sparsity_loss`` is 0.
        ``dead_mask: [d_sae]`` bool selects the AuxK candidates.
        """
        x, dead_mask = self._training_inputs(x, dead_mask)
        run = topk_training_forward_sparse if self.use_sparse_kernels else topk_training_forward_dense
        fwd = run(self, x, dead_mask)
        mse_loss = reconstruction_mse(fwd.sae_out, x)
        aux_loss = aux_k_loss(x, fwd.sae_out, fwd.aux_recon)
        loss = mse_loss + self.cfg.aux_k_coefficient * aux_loss
        return TrainStepOutput.build(
            loss, mse_loss, SparseLatents(fwd.values.detach(), fwd.indices, self.cfg.d_sae), fwd.sae_out,
            aux_loss=aux_loss,
        )
