"""The ``matryoshka`` SAE: a BatchTopK SAE whose latent prefixes must each reconstruct x.

Recipe (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level Features with
Matryoshka Sparse Autoencoders", arXiv:2503.17547, §3; Nabeshima 2024, "Matryoshka Sparse
Autoencoders"), with the BatchTopK latents ``f`` of :mod:`pipeline.sae.batchtopk` and prefix widths
``m_1 < m_2 < ... < m_n = d_sae`` (``matryoshka_widths``):

- prefix reconstruction:  ``x̂_m = b_dec + Σ_{i<m} f_i W_dec,i`` (the first m latents only);
- loss:  ``L = Σ_{j=1..n} ||x - x̂_{m_j}||²₂ + α L_aux``. The outermost term (``m_n = d_sae``) is
  the BatchTopK MSE, so the loss is the full BatchTopK loss plus one MSE per inner prefix, each
  summed over d_in and averaged over the batch and logged as ``extra["inner_mse_loss_<m>"]``.
  AuxK is BatchTopK's, over all latents (SAELens's default ``use_matryoshka_aux_loss=False``).
- everything else (unit-norm decoder, threshold EMA, inference JumpReLU, export as a SAELens
  ``jumprelu`` folder) is :class:`~pipeline.sae.batchtopk.BatchTopKSAE`'s.

Widths are checked as SAELens 6.54.12 checks them: a missing final ``d_sae`` is appended with a
warning (the caller's config is updated in place), a single level warns that the SAE is a plain
BatchTopK SAE.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from pipeline.errors import ConfigError
from pipeline.sae.base import SAEConfig
from pipeline.sae.batchtopk import BatchTopKSAE
from pipeline.sae.topk import reconstruction_mse


def checked_widths(widths: list[int], d_sae: int) -> list[int]:
    """``widths`` as a new list ending in ``d_sae`` (appended, with a warning, if missing).

    Raises:
        ConfigError: ``widths`` is empty, holds a non-integer or a value outside ``[1, d_sae]``,
            or (after the append) is not strictly increasing.
    """
    if not widths:
        raise ConfigError(
            f"architecture 'matryoshka' needs matryoshka_widths, increasing prefix sizes ending at "
            f"d_sae, e.g. [{max(1, d_sae // 8)}, {max(1, d_sae // 2)}, {d_sae}]."
        )
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= d_sae]
    if bad:
        raise ConfigError(f"matryoshka_widths must be integers in [1, d_sae={d_sae}]; {bad} are not.")
    widths = list(widths)
    if widths[-1] != d_sae:
        warnings.warn(f"matryoshka_widths {widths} does not end at d_sae={d_sae}; appending {d_sae}.", stacklevel=3)
        widths.append(d_sae)
    if any(a >= b for a, b in zip(widths, widths[1:])):
        raise ConfigError(f"matryoshka_widths must be strictly increasing, got {widths}.")
    if len(widths) == 1:
        warnings.warn("matryoshka_widths has one level: this is a plain BatchTopK SAE.", stacklevel=3)
    return widths


class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE (see the module docstring); tensors as :class:`BatchTopKSAE`.

    Raises:
        ConfigError: bad ``matryoshka_widths`` (:func:`checked_widths`) or BatchTopK fields.
    """

    architecture = "matryoshka"

    def __init__(self, cfg: SAEConfig) -> None:
        cfg.matryoshka_widths = checked_widths(cfg.matryoshka_widths, cfg.d_sae)
        super().__init__(cfg)

    def nested_losses(self, x: Tensor, feature_acts: Tensor) -> dict[str, Tensor]:
        """``{"inner_mse_loss_<m>": mean_b ||x - x̂_m||²₂}`` for every width but the last, with
        ``x̂_m = b_dec + f[:, :m] W_dec[:m]`` built up prefix by prefix. ``x: [B, d_in]``,
        ``feature_acts: [B, d_sae]`` (with gradients)."""
        losses = {}
        recon, start = self.b_dec, 0
        for width in self.cfg.matryoshka_widths[:-1]:
            recon = recon + self.decoder_weights(feature_acts[:, start:width], start, width) @ self.W_dec[start:width]
            losses[f"inner_mse_loss_{width}"] = reconstruction_mse(recon, x)
            start = width
        return losses

    def training_details(self) -> dict[str, Any]:
        """BatchTopK's saved training details plus the widths (``cfg.json`` metadata)."""
        return {**super().training_details(), "matryoshka_widths": list(self.cfg.matryoshka_widths)}
