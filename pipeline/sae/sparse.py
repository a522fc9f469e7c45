"""Training through the active latents only: sparse encoder gradients and a sparse decoder.

After the dense encoder product ``h = (x - c) W_enc + b_enc`` (``c = b_dec`` or 0), a sparse SAE
uses only its active latents — the k selected per token (TopK) or the positive ones (ReLU) — so
everything after that product can cost O(nnz · d_in) instead of O(batch · d_sae · d_in), with
``nnz`` the number of active (token, latent) pairs:

- decoder:  ``x̂_b = Σ_{(b,i) active} f_bi W_dec,i`` — a CSR ``[batch, d_sae]`` times ``W_dec``;
- ``∂L/∂f_bi = g_b · W_dec,i`` (``g = ∂L/∂x̂``) only at the active pairs — a sampled dense
  product (SDDMM, ``torch.sparse.sampled_addmm``);
- ``∂L/∂W_dec,i = Σ_b f_bi g_b`` and ``∂L/∂W_enc[:, i] = Σ_b (∂L/∂h_bi) (x_b - c)`` — the
  latent-major CSR ``[d_sae, batch]`` times ``g`` or ``x - c``; one sort of the active pairs by
  latent serves both;
- ``∂L/∂b_enc,i = Σ_b ∂L/∂h_bi`` and ``∂L/∂b_dec = -W_enc Σ_b ∂L/∂h_b`` (chain rule through
  ``x - b_dec``, which avoids forming ``∂L/∂(x - c): [batch, d_in]``).

These are the dense graph's gradients restricted to the entries that are nonzero in it (an
inactive latent's ``∂L/∂h`` is zero through ReLU or TopK), summed in another order (equal to float
rounding). CPU sparse-CSR products (MKL) have no half-precision kernels: :class:`ActiveLatents`
carries float32 values for float16/bfloat16 inputs.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


class ActiveLatents:
    """The active ``(token, latent)`` pairs of a ``[batch, d_sae]`` latent matrix, token-major.

    ``rows, cols: [nnz]`` int64 (token ids non-decreasing; latents distinct within a token);
    ``crow: [batch + 1]`` int64, the token-major CSR row pointers. Values of the pairs travel
    separately as ``[nnz]`` tensors in the same order.
    """

    def __init__(self, rows: Tensor, cols: Tensor, crow: Tensor, batch: int, d_sae: int):
        self.rows, self.cols, self.crow, self.batch, self.d_sae = rows, cols, crow, batch, d_sae
        self._by_latent: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_topk(cls, indices: Tensor, d_sae: int) -> ActiveLatents:
        """The ``k`` latents ``indices: [batch, k]`` of each token (TopK's selection)."""
        batch, k = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
        crow = torch.arange(0, batch * k + 1, k, device=indices.device)
        return cls(rows, indices.reshape(-1), crow, batch, d_sae)

    @classmethod
    def from_flat(cls, flat: Tensor, batch: int, d_sae: int) -> ActiveLatents:
        """The entries ``flat: [nnz]`` (increasing) of a flattened ``[batch, d_sae]`` matrix, e.g.
        ``(h > 0).view(-1).nonzero()``; their values are ``h.view(-1)[flat]``."""
        rows = torch.div(flat, d_sae, rounding_mode="floor")
        crow = torch.zeros(batch + 1, dtype=torch.int64, device=flat.device)
        crow[1:] = torch.bincount(rows, minlength=batch).cumsum(0)
        return cls(rows, flat - rows * d_sae, crow, batch, d_sae)

    def by_token(self, values: Tensor) -> Tensor:
        """CSR ``[batch, d_sae]`` holding ``values: [nnz]``."""
        return _csr(self.crow, self.cols, _accumulating(values), (self.batch, self.d_sae))

    def by_latent(self, values: Tensor) -> Tensor:
        """CSR ``[d_sae, batch]``: the transpose of :meth:`by_token` (its sort is done once)."""
        if self._by_latent is None:
            order = self.cols.argsort()
            crow = torch.zeros(self.d_sae + 1, dtype=torch.int64, device=self.cols.device)
            crow[1:] = torch.bincount(self.cols, minlength=self.d_sae).cumsum(0)
            self._by_latent = (order, crow, self.rows[order])
        order, crow, tokens = self._by_latent
        return _csr(crow, tokens, _accumulating(values)[order], (self.d_sae, self.batch))

    def per_latent(self, values: Tensor) -> Tensor:
        """``[d_sae]``: ``values: [nnz]`` summed per latent."""
        return torch.zeros(self.d_sae, dtype=values.dtype, device=values.device).index_add_(0, self.cols, values)


def csr_kernels_apply(weight: Tensor) -> bool:
    """Whether MKL's CSR products serve a step on ``weight``: CPU, float32/float64, no autocast
    (which would cast their operands to bfloat16, which they lack)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled("cpu"))


def _accumulating(values: Tensor) -> Tensor:
    return values if values.dtype in (torch.float32, torch.float64) else values.float()


def csr_mm(csr: Tensor, dense: Tensor) -> Tensor:
    """``csr @ dense`` (CPU CSR times dense, float32/float64) into a fresh row-major result.

    ``csr @ dense`` zero-fills its result and copies it once more; ``addmm`` with ``beta=0`` into
    an empty tensor writes it once (about half the time for a [4608, 4096] x [4096, 576] product
    with 32 entries per column).
    """
    out = torch.empty(csr.shape[0], dense.shape[1], dtype=dense.dtype, device=dense.device)
    return torch.addmm(out, csr, dense, beta=0.0, out=out)


def transposed(m: Tensor, block: int = 256) -> Tensor:
    """``m.t()`` as a contiguous tensor, copied in column blocks of ``block`` rows of ``m``.

    Autograd would otherwise copy a transposed gradient into its parameter's layout with one
    strided pass (~14 ms for [4608, 576] on 2 Xeon cores); block by block the reads stay in cache
    (~5 ms in blocks of 64 there; on 2 EPYC cores 2.9 ms in blocks of 64, 1.2 ms in blocks of 256).
    """
    out = torch.empty(m.shape[1], m.shape[0], dtype=m.dtype, device=m.device)
    for start in range(0, m.shape[0], block):
        out[:, start : start + block].copy_(m[start : start + block].t())
    return out


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, values, size, dtype=values.dtype)


class _SparseEncoderGrad(torch.autograd.Function):
    """Attach the active pre-activations ``h[active]: [nnz]`` (computed without autograd from the
    dense product) to ``W_enc``, ``b_enc`` and ``b_dec``; backward as in the module docstring."""

    @staticmethod
    def forward(ctx, sae_in, W_enc, b_enc, b_dec, active, values, subtract_b_dec):  # type: ignore[override]
        ctx.save_for_backward(sae_in, W_enc)
        ctx.active, ctx.subtract_b_dec = active, subtract_b_dec
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        sae_in, W_enc = ctx.saved_tensors
        active: ActiveLatents = ctx.active
        grad_W_enc = grad_b_enc = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            by_latent = active.by_latent(grad)
            grad_W_enc = transposed(csr_mm(by_latent, sae_in.to(by_latent.dtype))).to(grad.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            per_latent = active.per_latent(grad)
            grad_b_enc = per_latent if ctx.needs_input_grad[2] else None
            if ctx.needs_input_grad[3] and ctx.subtract_b_dec:
                grad_b_dec = -(W_enc @ per_latent)
        return None, grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


def encode_active(sae_in: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, active: ActiveLatents,
                  values: Tensor, subtract_b_dec: bool) -> Tensor:
    """``values: [nnz]`` (the active entries of ``h``) with the sparse encoder backward attached.

    ``sae_in: [batch, d_in]`` is ``x - b_dec`` (or ``x``), detached."""
    return _SparseEncoderGrad.apply(sae_in, W_enc, b_enc, b_dec, active, values, subtract_b_dec)


class _SparseDecode(torch.autograd.Function):
    """``x̂ = CSR(f) W_dec`` (no ``b_dec``); backward as in the module docstring."""

    @staticmethod
    def forward(ctx, values, W_dec, active):  # type: ignore[override]
        ctx.save_for_backward(values, W_dec)
        ctx.active = active
        return active.by_token(values) @ W_dec

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, W_dec = ctx.saved_tensors
        active: ActiveLatents = ctx.active
        grad_values = grad_W_dec = None
        if ctx.needs_input_grad[0]:
            sampled = torch.sparse.sampled_addmm(active.by_token(values), grad, W_dec.t(), beta=0.0)
            grad_values = sampled.values()
        if ctx.needs_input_grad[1]:
            grad_W_dec = csr_mm(active.by_latent(values), grad)
        return grad_values, grad_W_dec, None


def decode_active(values: Tensor, W_dec: Tensor, active: ActiveLatents) -> Tensor:
    """``[batch, d_in]``: ``Σ_{(b,i) active} values · W_dec[i]`` (no ``b_dec``), with gradients to
    ``values: [nnz]`` and ``W_dec: [d_sae, d_in]`` (CPU, float32/float64)."""
    return _SparseDecode.apply(values, W_dec, active)
