"""Max-activating examples, activation histograms and firing frequencies of latents, from the Zarr cache.

The cache holds every activation row's token id, so no model runs here: the rows of each chunk are
encoded by the SAE and folded into running per-latent state, one chunk at a time, so memory is
bounded by one chunk plus ``n_features × n_examples × window`` values however large the cache is,
and one pass serves any number of latents::

    stats = max_activating_examples(cache, sae, features=[12, 80], n_examples=10)
    stats[12].examples[0].activation, stats[12].frequency, stats[12].histogram
    print(format_examples(stats[12], tokenizer))

Histograms count the firing activations (``f > 0``) in ``n_bins`` equal bins over ``[0, R]``,
``R`` just above the first chunk's max, doubled (adjacent bins merged in pairs, so counts stay
exact) whenever a later chunk exceeds it; so the range ends between the max and twice the max.
Rows holding special tokens (BOS/EOS/padding, recorded in the cache) are left out by default, as
in training: their activations are outliers the SAE never learned; ``exclude_token_ids`` names
other tokens to leave out (or ``[]`` for none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.analysis.features import check_feature_ids
from pipeline.cache import ActivationCache
from pipeline.errors import ConfigError
from pipeline.evaluate import check_compatible
from pipeline.sae import SAE


@dataclass
class Example:
    """One context where a latent fires.

    Fields:
        activation: the latent's activation at the peak token.
        seq, pos: the peak's sequence and position in the cache's ``tokens`` array (its activation
            row is ``seq * context_size + pos``).
        window_start: position of ``token_ids[0]`` in the sequence.
        token_ids: the window's token ids (the window is cut at the sequence's ends).
        acts: the latent's activation on each window token (0 on left-out special tokens).
    """

    activation: float
    seq: int
    pos: int
    window_start: int
    token_ids: list[int]
    acts: list[float]

    @property
    def peak_index(self) -> int:
        """Index of the peak token in ``token_ids``."""
        return self.pos - self.window_start


@dataclass
class FeatureStats:
    """What one pass over the cache found about one latent.

    Fields:
        feature: the latent id.
        n_tokens: rows scanned (special tokens excluded).
        n_firing: rows where the latent is > 0.
        max_activation: largest activation (0 if it never fires).
        histogram: ``[n_bins]`` int64 counts of the firing activations.
        bin_edges: ``[n_bins + 1]`` float64 edges, ``0`` to ``R`` (see the module docstring).
        examples: up to ``n_examples`` contexts, largest activation first.
    """

    feature: int
    n_tokens: int
    n_firing: int
    max_activation: float
    histogram: np.ndarray
    bin_edges: np.ndarray
    examples: list[Example] = field(default_factory=list)

    @property
    def frequency(self) -> float:
        """Fraction of scanned tokens where the latent fires (its feature density)."""
        return self.n_firing / self.n_tokens if self.n_tokens else float("nan")


class _GrowingHistograms:
    """Per-latent histograms over ``[0, R_j]`` whose range doubles when a larger value arrives."""

    def __init__(self, n_features: int, n_bins: int) -> None:
        if n_bins < 2 or n_bins % 2:
            raise ConfigError(f"n_bins must be an even number >= 2 (bins merge in pairs), got {n_bins}.")
        self.n_bins = n_bins
        self.ranges = np.zeros(n_features)
        self.counts = np.zeros((n_features, n_bins), dtype=np.int64)
        self.maxima = np.zeros(n_features)

    def edges(self, j: int) -> np.ndarray:
        # R * i / n for every edge, so a doubled range reproduces every second old edge bit for bit
        return self.ranges[j] * np.arange(self.n_bins + 1) / self.n_bins

    def update(self, j: int, values: np.ndarray) -> None:
        """Count ``values`` (float64, all > 0) into latent ``j``'s histogram."""
        if values.size == 0:
            return
        top = float(values.max())
        self.maxima[j] = max(self.maxima[j], top)
        if self.ranges[j] == 0:
            # just above the max: never equal to a float32 activation, so no value lands on an edge's closed end
            self.ranges[j] = np.nextafter(top, np.inf)
        while top >= self.ranges[j]:
            self.counts[j] = np.concatenate([self.counts[j].reshape(-1, 2).sum(1), np.zeros(self.n_bins // 2, np.int64)])
            self.ranges[j] *= 2
        self.counts[j] += np.histogram(values, bins=self.edges(j))[0]


class _TopExamples:
    """The ``n`` largest activations of each latent so far, with their token windows."""

    def __init__(self, n_features: int, n: int, before: int, after: int) -> None:
        width = before + after + 1
        self.n, self.before, self.after = n, before, after
        self.values = torch.full((n_features, n), -math.inf)
        self.rows = torch.full((n_features, n), -1, dtype=torch.long)
        self.win_tokens = torch.full((n_features, n, width), -1, dtype=torch.long)
        self.win_acts = torch.zeros((n_features, n, width))

    def update(self, first_row: int, context_size: int, token_ids: Tensor, acts: Tensor, keep: Tensor) -> None:
        """Merge one chunk: ``acts [rows, n_features]`` starting at cache row ``first_row``
        (whole sequences), ``token_ids [rows]``, ``keep [rows]`` bool."""
        k = min(self.n, acts.shape[0])
        values, rows = acts.masked_fill(~keep[:, None], -math.inf).topk(k, dim=0)  # [k, n_features]
        values, rows = values.T, rows.T  # [n_features, k]
        offsets = torch.arange(-self.before, self.after + 1)
        pos = (rows % context_size)[..., None] + offsets  # [n_features, k, width]
        inside = (pos >= 0) & (pos < context_size)
        win_rows = (rows - rows % context_size)[..., None] + pos.clamp(0, context_size - 1)
        win_tokens = torch.where(inside, token_ids[win_rows], -1)
        gathered = acts.T.gather(1, win_rows.reshape(len(rows), -1)).reshape(win_rows.shape)
        win_acts = torch.where(inside & keep[win_rows], gathered, 0.0)
        self._merge(values, rows + first_row, win_tokens, win_acts)

    def _merge(self, values: Tensor, rows: Tensor, win_tokens: Tensor, win_acts: Tensor) -> None:
        all_values = torch.cat([self.values, values], 1)
        self.values, best = all_values.topk(self.n, dim=1)
        self.rows = torch.cat([self.rows, rows], 1).gather(1, best)
        index = best[..., None].expand(-1, -1, win_tokens.shape[-1])
        self.win_tokens = torch.cat([self.win_tokens, win_tokens], 1).gather(1, index)
        self.win_acts = torch.cat([self.win_acts, win_acts], 1).gather(1, index)

    def examples(self, j: int, context_size: int) -> list[Example]:
        out = []
        for value, row, tokens, acts in zip(self.values[j], self.rows[j], self.win_tokens[j], self.win_acts[j]):
            if not value > 0:
                continue  # fewer firing tokens than n_examples: the rest are padding
            seq, pos = divmod(int(row), context_size)
            inside = tokens >= 0
            out.append(Example(float(value), seq, pos, pos - self.before + int((~inside[: self.before]).sum()),
                               tokens[inside].tolist(), acts[inside].tolist()))
        return out


def _encoded_chunks(cache: ActivationCache, sae: SAE, hook: str, chunks: Sequence[int], features: list[int] | None,
                    exclude_token_ids: Sequence[int], batch_size: int,
                    progress: bool) -> Iterator[tuple[int, np.ndarray, Tensor, Tensor | None, Tensor]]:
    """Per chunk: ``(chunk id, token_ids [rows], keep [rows] bool, latents [rows, n_features]``
    float32 of ``features`` (None when not asked), ``firing counts [d_sae]`` over kept rows)."""
    exclude = np.asarray(list(exclude_token_ids), dtype=np.int64)
    device = sae.W_enc.device
    for c in tqdm(chunks, desc="encode cache", unit="chunk", disable=not progress, dynamic_ncols=True):
        x = cache.read_chunk(hook, c, verify=True)
        token_ids = cache.chunk_token_ids(c)
        keep = torch.from_numpy(~np.isin(token_ids, exclude))
        counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
        selected = []
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                f = sae.encode(x[s : s + batch_size].to(device).float())
                counts += ((f > 0) & keep[s : s + batch_size, None].to(device)).sum(0).cpu()
                if features is not None:
                    selected.append(f[:, features].float().cpu())
        yield c, token_ids, keep, (torch.cat(selected) if features is not None else None), counts


def _scan_setup(cache: ActivationCache, sae: SAE, chunks: Sequence[int] | None,
                exclude_token_ids: Sequence[int] | None) -> tuple[str, list[int], list[int]]:
    """``(hook, chunks, excluded token ids)``, checking the SAE fits the cache."""
    hook = check_compatible(sae, cache)
    chunks = list(range(cache.n_chunks_written)) if chunks is None else [int(c) for c in chunks]
    bad = [c for c in chunks if not 0 <= c < cache.layout.n_chunks]
    if bad or not chunks:
        raise ConfigError(f"chunk ids {bad or '[]'} invalid: the cache has chunks 0 to {cache.layout.n_chunks - 1}.")
    return hook, chunks, (cache.special_token_ids if exclude_token_ids is None else [int(t) for t in exclude_token_ids])


def firing_frequencies(cache: ActivationCache, sae: SAE, *, chunks: Sequence[int] | None = None,
                       exclude_token_ids: Sequence[int] | None = None, batch_size: int = 4096,
                       progress: bool = True) -> np.ndarray:
    """``[d_sae]`` float64: the fraction of cache tokens on which each latent fires (f > 0).

    Args:
        chunks: chunk ids to scan (default: all; ``cache.holdout_chunks`` for held-out text only).
        exclude_token_ids: rows holding these token ids are left out (default: the cache's special
            tokens; ``[]`` keeps every row).

    Raises:
        CacheError: the SAE reads another hook, width or model than the cache holds.
        ConfigError: a chunk id out of range.
    """
    hook, chunks, exclude = _scan_setup(cache, sae, chunks, exclude_token_ids)
    total, n_tokens = torch.zeros(sae.cfg.d_sae, dtype=torch.long), 0
    for _, _, keep, _, counts in _encoded_chunks(cache, sae, hook, chunks, None, exclude, batch_size, progress):
        total += counts
        n_tokens += int(keep.sum())
    return total.double().numpy() / max(n_tokens, 1)


def max_activating_examples(cache: ActivationCache, sae: SAE, features: Sequence[int], *, n_examples: int = 10,
                            window: tuple[int, int] = (10, 4), n_bins: int = 32,
                            chunks: Sequence[int] | None = None, exclude_token_ids: Sequence[int] | None = None,
                            batch_size: int = 4096, progress: bool = True) -> dict[int, FeatureStats]:
    """The top ``n_examples`` contexts, histogram and firing frequency of each of ``features``, in one pass.

    Args:
        cache: the activation cache (of the SAE's model and hook).
        sae: the SAE.
        features: latent ids.
        n_examples: contexts kept per latent (fewer when it fires on fewer tokens).
        window: ``(before, after)`` tokens of context around each peak, within its sequence.
        n_bins: histogram bins (even).
        chunks: chunk ids to scan (default: all).
        exclude_token_ids: rows holding these token ids are left out of the examples, histogram and
            frequency (default: the cache's special tokens, see the module docstring; ``[]`` keeps all).
        batch_size: rows encoded at once.

    Returns:
        ``{feature: FeatureStats}`` in the order of ``features``.

    Raises:
        CacheError: the SAE reads another hook, width or model than the cache holds.
        ConfigError: bad latent ids, chunk ids, window, n_examples or n_bins.
    """
    features = check_feature_ids(sae, features)
    if n_examples < 1 or min(window) < 0:
        raise ConfigError(f"n_examples must be >= 1 and window sizes >= 0, got {n_examples} and {window}.")
    hook, chunks, exclude = _scan_setup(cache, sae, chunks, exclude_token_ids)
    ctx = cache.layout.context_size
    top = _TopExamples(len(features), n_examples, *window)
    hist = _GrowingHistograms(len(features), n_bins)
    n_tokens = 0
    for c, token_ids, keep, acts, _ in _encoded_chunks(cache, sae, hook, chunks, features, exclude, batch_size, progress):
        n_tokens += int(keep.sum())
        top.update(cache.layout.chunk_rows(c)[0], ctx, torch.from_numpy(token_ids.astype(np.int64)), acts, keep)
        kept = acts[keep].double().numpy()
        for j in range(len(features)):
            column = kept[:, j]
            hist.update(j, column[column > 0])
    return {f: FeatureStats(f, n_tokens, int(hist.counts[j].sum()), float(hist.maxima[j]), hist.counts[j].copy(),
                            hist.edges(j), top.examples(j, ctx)) for j, f in enumerate(features)}


def token_strings(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (so ``"".join`` gives the text back for byte-level BPE)."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


def format_examples(stats: FeatureStats, tokenizer) -> str:
    """A text summary of one latent: frequency, max, and one line per example with the peak token
    in ``[[ ]]`` (newlines shown as ``↵``)."""
    lines = [f"feature {stats.feature}: fires on {stats.n_firing:,} of {stats.n_tokens:,} tokens "
             f"(frequency {stats.frequency:.4%}), max activation {stats.max_activation:.3f}"]
    for ex in stats.examples:
        words = [s.replace("\n", "↵") for s in token_strings(tokenizer, ex.token_ids)]
        words[ex.peak_index] = f"[[{words[ex.peak_index]}]]"
        lines.append(f"  {ex.activation:8.3f}  seq {ex.seq:>5} pos {ex.pos:>4}  {''.join(words)}")
    return "\n".join(lines)
