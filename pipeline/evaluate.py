"""Evaluate a trained SAE on the cache's holdout slice, and CE loss recovered with the model.

Reconstruction metrics (L0, MSE, explained variance, cosine, dead fraction) stream the holdout
chunks of the activation cache, which training never saw; CE loss recovered reruns the model on
the holdout token sequences with the SAE spliced in at its hook (see :mod:`pipeline.evals`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import evals, models
from pipeline.cache import ActivationCache
from pipeline.config import EvalConfig, read_yaml_mapping
from pipeline.constants import METRICS_FILENAME, TRAIN_CONFIG_FILENAME
from pipeline.errors import CacheError, ConfigError
from pipeline.sae import SAE


def _train_config(sae_path: Path) -> dict[str, Any]:
    """The saved training config as plain data (not re-validated: it may name another device)."""
    path = sae_path / TRAIN_CONFIG_FILENAME
    return read_yaml_mapping(path) if path.is_file() else {}


def default_cache_path(sae_path: str | Path) -> str | None:
    """The cache an SAE folder was trained on (``cache_path`` of its ``train_config.yaml``), or None."""
    return _train_config(Path(sae_path)).get("cache_path")


def check_compatible(sae: SAE, cache: ActivationCache) -> str:
    """The cache hook the SAE reads; refuses an SAE of another model, hook or width.

    Raises:
        CacheError: hook missing from the cache, d_in differs, or the SAE names another model.
    """
    if sae.cfg.hook_name and sae.cfg.hook_name not in cache.hook_names:
        raise CacheError(
            f"the SAE reads hook {sae.cfg.hook_name!r} but the cache at {str(cache.path)!r} holds "
            f"{cache.hook_names}; pass --cache-path of a harvest of that hook."
        )
    hook = cache.resolve_hook(sae.cfg.hook_name or None)
    if cache.d_in_of(hook) != sae.cfg.d_in:
        raise CacheError(f"the SAE has d_in {sae.cfg.d_in} but the cache has {cache.d_in_of(hook)} at {hook!r}.")
    if sae.cfg.model_name and sae.cfg.model_name != cache.attrs["model_name"]:
        raise CacheError(
            f"the SAE was trained on {sae.cfg.model_name!r} but the cache holds {cache.attrs['model_name']!r}; "
            "pass the cache harvested from the SAE's model (--cache-path)."
        )
    return hook


def reconstruction_metrics(sae: SAE, cache: ActivationCache, hook: str, *, exclude_token_ids=(),
                           n_tokens: int | None = None, batch_size: int = 4096) -> dict[str, float]:
    """Stream the holdout chunks through ``sae`` and return :class:`pipeline.evals.ReconstructionStats`."""
    stats = evals.ReconstructionStats(sae.cfg.d_sae)
    seen = 0
    with torch.no_grad():
        for c in tqdm(cache.holdout_chunks, desc="evaluate holdout", unit="chunk", dynamic_ncols=True):
            x = cache.read_kept_rows(hook, c, exclude_token_ids, verify=True).float()
            if n_tokens is not None:
                x = x[: n_tokens - seen]
            for s in range(0, x.shape[0], batch_size):
                xb = x[s : s + batch_size].to(sae.W_enc.device)
                feats = sae.encode(xb)
                stats.update(xb, sae.decode(feats), feature_acts=feats)
            seen += x.shape[0]
            if n_tokens is not None and seen >= n_tokens:
                break
    return stats.compute()


def evaluate(cfg: EvalConfig, *, model=None) -> dict[str, Any]:
    """Evaluate the SAE at ``cfg.sae_path``; writes and returns ``metrics.json``'s dict.

    Keys: ``l0``, ``mse``, ``explained_variance``, ``cosine_similarity``, ``dead_fraction``,
    ``n_tokens`` and, with ``ce_loss``, ``ce_loss_clean``, ``ce_loss_with_sae``,
    ``ce_loss_zero_ablation``, ``ce_loss_recovered``.

    Raises:
        SAEFormatError, CacheError: the SAE or cache is missing, damaged or mismatched.
    """
    sae_path = Path(cfg.sae_path)
    out = Path(cfg.output_path) if cfg.output_path else sae_path / METRICS_FILENAME
    _check_metrics_path(out)
    sae = SAE.load(sae_path, device=cfg.device)
    train_cfg = _train_config(sae_path)
    cache_path = cfg.cache_path or train_cfg.get("cache_path")
    if cache_path is None:
        raise CacheError(f"no cache known for {str(sae_path)!r}: pass --cache-path.")
    cache = ActivationCache.open(cache_path)
    if not cache.holdout_chunks:
        raise CacheError(f"the cache at {cache_path!r} has no holdout slice; re-harvest with holdout_tokens > 0.")
    hook = check_compatible(sae, cache)
    exclude = cache.special_token_ids if train_cfg.get("exclude_special_tokens", True) else []
    metrics: dict[str, Any] = reconstruction_metrics(sae, cache, hook, exclude_token_ids=exclude,
                                                     n_tokens=cfg.n_eval_tokens)
    if cfg.ce_loss:
        model = model if model is not None else load_cache_model(cache, cfg.device)
        seqs_per_chunk = cache.layout.chunk_tokens // cache.layout.context_size
        first = cache.holdout_chunks[0] * seqs_per_chunk
        available = cache.layout.n_seqs - first
        if cfg.n_ce_sequences > available:
            print(f"note: n_ce_sequences {cfg.n_ce_sequences} capped at the {available} holdout sequences")
        tokens = torch.from_numpy(np.asarray(cache.tokens[first : first + cfg.n_ce_sequences]).astype(np.int64))
        metrics.update(evals.ce_loss_recovered(model, sae, tokens.to(cfg.device), hook,
                                               batch_size=cfg.batch_size_prompts))
    metrics = {k: (float(v) if isinstance(v, (float, np.floating, torch.Tensor)) else v) for k, v in metrics.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _check_metrics_path(out: Path) -> None:
    """Refuse, before any work, a metrics path that is a folder or lies under a file."""
    if out.is_dir():
        raise ConfigError(f"output_path {str(out)!r} is a folder; give a file path such as {str(out / METRICS_FILENAME)!r}.")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output_path {str(out)!r} lies under the file {str(parent)!r}; choose another path.")


def load_cache_model(cache: ActivationCache, device: str):
    """Load the model the cache was harvested from and check its weights fingerprint.

    Raises:
        CacheError: the model loaded now has other weights than the harvest recorded.
        ModelError: the model cannot be loaded (see :func:`pipeline.models.load_model`).
    """
    model = models.load_model(cache.attrs["model_source"]["name"], device=device)
    if models.model_fingerprint(model) != cache.attrs["weights_fingerprint"]:
        raise CacheError(
            f"the model {cache.attrs['model_source']['name']!r} loaded now has other weights than the one "
            f"the cache at {str(cache.path)!r} was harvested from; re-harvest, or evaluate with --no-ce-loss."
        )
    return model
