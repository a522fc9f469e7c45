"""``sae-pipeline cache info``: what a harvest holds."""

from __future__ import annotations

import json

import click

from pipeline.cache import ActivationCache


@click.group("cache")
def command():
    """Inspect activation caches."""


@command.command("info")
@click.argument("path", type=click.Path())
def info(path):
    """Print a cache's metadata and statistics summary."""
    cache = ActivationCache.open(path, require_complete=False)
    click.echo(cache.summary())
    keep = {k: v for k, v in cache.attrs.items() if k not in ("statistics",)}
    keep["mean_norm"] = {h: s["mean_norm"] for h, s in cache.attrs.get("statistics", {}).items()}
    click.echo(json.dumps(keep, indent=2))
