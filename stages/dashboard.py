"""``sae-pipeline dashboard``: a self-contained HTML page of latent dashboards."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.analysis.dashboard import build_dashboard, write_dashboard
from pipeline.cache import ActivationCache
from stages.analysis_common import load_sae_and_model, model_option, parse_features, sae_options
from stages.max_examples import resolve_cache_path


def run(sae_path: str, output_path: str, *, features: list[int] | None = None, top_n: int = 10,
        cache_path: str | None = None, n_examples: int = 10, model_name: str | None = None,
        device: str = "cpu") -> Path:
    """Build the page (examples from the cache, token effects from the model) and write it atomically."""
    sae, model = load_sae_and_model(sae_path, model_name, device)
    cache = ActivationCache.open(resolve_cache_path(sae_path, cache_path))
    page = build_dashboard(cache, sae, tokenizer=model.tokenizer, features=features, top_n=top_n,
                           n_examples=n_examples, model=model)
    path = write_dashboard(output_path, page)
    shown = f"latents {features}" if features else f"the {top_n} most frequent latents"
    click.echo(f"wrote {path} ({len(page.encode()) / 1024:.0f} KiB): {shown} of {sae_path}")
    return path


@click.command("dashboard")
@sae_options
@model_option
@click.option("--output-path", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--features", default=None, help="Comma-separated latent ids [default: the --top-n most frequent].")
@click.option("--top-n", default=10, show_default=True, type=click.IntRange(min=1),
              help="How many of the most frequent latents, without --features.")
@click.option("--cache-path", default=None, help="Activation cache for the examples [default: the SAE's training cache].")
@click.option("--n-examples", default=10, show_default=True, type=click.IntRange(min=1), help="Contexts per latent.")
def command(sae_path, device, model_name, output_path, features, top_n, cache_path, n_examples):
    """Write one HTML file: per latent its frequency, histogram, shaded max-activating contexts and top tokens."""
    run(sae_path, output_path, features=parse_features(features) if features else None, top_n=top_n,
        cache_path=cache_path, n_examples=n_examples, model_name=model_name, device=device)
