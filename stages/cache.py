"""``sae-pipeline cache info|verify``: what a harvest holds, and whether it is intact."""

from __future__ import annotations

import json

import click

from pipeline.cache import ActivationCache, lock_state, verify
from pipeline.errors import CacheError

_LOCK_STATES = {"running": "its writer is running",
                "stale": "its writer no longer runs: the next harvest into it takes the lock over",
                "unknown": "on another machine, which cannot be checked from here: if that harvest is gone, "
                           "re-run it with --break-lock"}


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
    state, holder = lock_state(path)
    if state != "none":
        click.echo(f"writer lock: pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
                   f"({_LOCK_STATES[state]})")


@command.command("verify")
@click.argument("path", type=click.Path())
def verify_command(path):
    """Check every chunk against the checksum recorded when it was written; name damaged ones."""
    cache = ActivationCache.open(path, require_complete=False)
    damaged = verify(cache)
    if damaged:
        listing = "; ".join(f"{hook}: chunks {ids}" for hook, ids in damaged.items())
        raise CacheError(f"the cache at {path!r} is damaged ({listing}). Re-harvest it into a new folder "
                         "(or with --overwrite).")
    done = "" if cache.complete else f" (incomplete harvest: {cache.n_chunks_written}/{cache.layout.n_chunks} chunks so far)"
    click.echo(f"ok: {cache.n_chunks_written} chunks × {len(cache.hook_names)} hooks and the token ids match their "
               f"checksums{done}")
