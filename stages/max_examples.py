"""``sae-pipeline max-examples``: the max-activating contexts of latents, from the activation cache (no model run)."""

from __future__ import annotations

import click

from pipeline.analysis.max_activating import FeatureStats, format_examples, max_activating_examples
from pipeline.cache import ActivationCache
from pipeline.errors import ConfigError
from pipeline.evaluate import default_cache_path
from pipeline.models import load_tokenizer
from pipeline.sae import SAE
from stages.analysis_common import parse_features, sae_options


def run(sae_path: str, features: list[int], *, cache_path: str | None = None, n_examples: int = 10,
        window: tuple[int, int] = (10, 4), device: str = "cpu") -> dict[int, FeatureStats]:
    """Scan the cache once for ``features``; print each latent's frequency, max and contexts."""
    sae = SAE.load(sae_path, device=device)
    cache = ActivationCache.open(resolve_cache_path(sae_path, cache_path))
    stats = max_activating_examples(cache, sae, features, n_examples=n_examples, window=window)
    tokenizer = load_tokenizer(cache.attrs["model_source"]["name"])
    for s in stats.values():
        click.echo(format_examples(s, tokenizer))
    return stats


def resolve_cache_path(sae_path: str, cache_path: str | None) -> str:
    """``cache_path``, else the cache the SAE was trained on.

    Raises:
        ConfigError: neither is known.
    """
    path = cache_path or default_cache_path(sae_path)
    if path is None:
        raise ConfigError(f"no cache known for {sae_path!r} (no train_config.yaml); pass --cache-path.")
    return path


@click.command("max-examples")
@sae_options
@click.option("--features", "features", required=True, help="Comma-separated latent ids, e.g. 12,80.")
@click.option("--cache-path", default=None, help="Activation cache to scan [default: the one the SAE trained on].")
@click.option("--n-examples", default=10, show_default=True, type=click.IntRange(min=1), help="Contexts per latent.")
@click.option("--window", default=(10, 4), show_default=True, type=(click.IntRange(min=0), click.IntRange(min=0)),
              help="Tokens shown before and after each peak.")
def command(sae_path, device, features, cache_path, n_examples, window):
    """Print each latent's firing frequency, max activation and max-activating contexts (peak in [[ ]])."""
    run(sae_path, parse_features(features), cache_path=cache_path, n_examples=n_examples, window=window, device=device)
