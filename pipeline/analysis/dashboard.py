"""A self-contained HTML page of latent dashboards: one file, no network, no external scripts or styles.

Per latent: firing frequency and max activation, a histogram of its firing activations (inline
SVG), its max-activating contexts from the cache with every token shaded by the latent's
activation (hover shows the value), the tokens its decoder row promotes and suppresses most
(when a model is given, see :func:`pipeline.analysis.attribution.token_effects`) and its
Neuronpedia link when the SAE is hosted there. A short inline script adds the hover titles and
marks ``<body data-rendered="true">`` so a headless browser can tell the page ran::

    html = build_dashboard(cache, sae, tokenizer=model.tokenizer, model=model, top_n=20)
    write_dashboard("data/dashboards/wiki-topk32.html", html)
"""

from __future__ import annotations

import html as html_lib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.analysis.attribution import TokenEffects, token_effects
from pipeline.analysis.max_activating import (FeatureStats, firing_frequencies, max_activating_examples,
                                              token_strings)
from pipeline.analysis.neuronpedia import neuronpedia_url_for
from pipeline.cache import ActivationCache
from pipeline.errors import ConfigError
from pipeline.sae import SAE
from pipeline.sae.io import atomic_write


@dataclass
class FeatureCard:
    """Everything one latent's dashboard shows: its cache statistics and examples, the examples'
    token strings (``[n_examples][window]``), its token effects and Neuronpedia link (optional)."""

    stats: FeatureStats
    example_tokens: list[list[str]]
    effects: TokenEffects | None = None
    neuronpedia: str | None = None


@dataclass
class DashboardInfo:
    """The page header: title and ``(label, value)`` facts about the SAE and the cache."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)


def most_frequent(cache: ActivationCache, sae: SAE, n: int, *, progress: bool = True) -> list[int]:
    """The ``n`` latents that fire on the most cache tokens, most frequent first (one pass over the cache)."""
    if n < 1:
        raise ConfigError(f"top_n must be >= 1, got {n}.")
    frequencies = firing_frequencies(cache, sae, progress=progress)
    return [int(i) for i in np.argsort(-frequencies, kind="stable")[:n]]


def build_dashboard(cache: ActivationCache, sae: SAE, *, tokenizer: Any, features: Sequence[int] | None = None,
                    top_n: int = 10, n_examples: int = 10, window: tuple[int, int] = (10, 4), model: Any = None,
                    title: str | None = None, progress: bool = True) -> str:
    """The HTML page for ``features`` (default: the ``top_n`` most frequent latents).

    Args:
        cache: the activation cache of the SAE's model and hook (examples come from it).
        sae: the SAE.
        tokenizer: the model's tokenizer, to show the tokens.
        features: latent ids; None picks the ``top_n`` most frequent (one extra pass).
        n_examples, window: contexts per latent and ``(before, after)`` tokens around each peak.
        model: optional model (the SAE's); adds each latent's promoted/suppressed tokens.
        title: page title (default: the SAE's hook and model).

    Raises:
        CacheError: the SAE does not fit the cache. ConfigError: bad latent ids or sizes.
    """
    chosen = list(features) if features is not None else most_frequent(cache, sae, top_n, progress=progress)
    stats = max_activating_examples(cache, sae, chosen, n_examples=n_examples, window=window, progress=progress)
    effects = token_effects(model, sae, chosen) if model is not None else {}
    cards = [FeatureCard(s, [token_strings(tokenizer, ex.token_ids) for ex in s.examples], effects.get(f),
                         neuronpedia_url_for(sae, f)) for f, s in stats.items()]
    info = DashboardInfo(title or f"SAE latents: {sae.cfg.model_name} {sae.cfg.hook_name}", [
        ("model", sae.cfg.model_name), ("hook", sae.cfg.hook_name), ("architecture", sae.cfg.architecture),
        ("d_sae", f"{sae.cfg.d_sae:,}"), ("cache", str(cache.path)),
        ("tokens scanned", f"{next(iter(stats.values())).n_tokens:,}")])
    return render_dashboard(cards, info)


def write_dashboard(path: str | Path, page: str) -> Path:
    """Write ``page`` to ``path`` atomically (a temporary sibling renamed into place); returns the path.

    Raises:
        ConfigError: ``path`` is a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"output path {str(path)!r} is a folder; give a file name such as {str(path / 'dashboard.html')!r}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path


# --------------------------------------------------------------------------- rendering

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 70rem; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin: 0 0 .4rem; }
.facts, .index { border-collapse: collapse; margin-bottom: 1rem; font-size: .9rem; }
.facts td, .index td, .index th { padding: .15rem .6rem; border-bottom: 1px solid #eee; text-align: left; }
.feature { border: 1px solid #ddd; border-radius: 6px; padding: .8rem 1rem; margin: 1rem 0; }
.summary { font-size: .9rem; color: #555; margin-bottom: .5rem; }
.row { display: flex; gap: 2rem; flex-wrap: wrap; }
.ctx { font-family: ui-monospace, monospace; font-size: .85rem; white-space: pre-wrap; margin: .15rem 0; }
.ctx .act { display: inline-block; width: 4.5rem; color: #555; }
.tok { border-radius: 2px; }
.tok.peak { outline: 1.5px solid #c33; font-weight: bold; }
.effects td { font-family: ui-monospace, monospace; font-size: .85rem; padding: 0 .5rem; }
.pos { color: #06c; } .neg { color: #c33; }
"""

# Hover titles from data-act, then the marker a headless browser checks.
_SCRIPT = """
document.querySelectorAll(".tok").forEach(function (el) {
  el.title = "activation " + Number(el.dataset.act).toFixed(3);
});
document.body.dataset.features = String(document.querySelectorAll(".feature").length);
document.body.dataset.rendered = "true";
"""


def render_dashboard(cards: list[FeatureCard], info: DashboardInfo) -> str:
    """The whole page as one HTML string (UTF-8, inline CSS, SVG and script)."""
    esc = html_lib.escape
    facts = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in info.facts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(info.title)}</title>'
            f'<style>{_STYLE}</style></head>\n<body data-rendered="false">\n<h1>{esc(info.title)}</h1>\n'
            f'<table class="facts">{facts}</table>\n{_index(cards)}\n'
            + "\n".join(_card(card) for card in cards)
            + f"\n<script>{_SCRIPT}</script>\n</body></html>\n")


def _index(cards: list[FeatureCard]) -> str:
    rows = "".join(f'<tr><td><a href="#feature-{c.stats.feature}">{c.stats.feature}</a></td>'
                   f"<td>{c.stats.frequency:.4%}</td><td>{c.stats.max_activation:.3f}</td></tr>" for c in cards)
    return f'<table class="index"><tr><th>latent</th><th>frequency</th><th>max activation</th></tr>{rows}</table>'


def _card(card: FeatureCard) -> str:
    s = card.stats
    link = f' · <a href="{html_lib.escape(card.neuronpedia)}">Neuronpedia</a>' if card.neuronpedia else ""
    summary = (f"fires on {s.n_firing:,} of {s.n_tokens:,} tokens (frequency {s.frequency:.4%}) · "
               f"max activation {s.max_activation:.3f}{link}")
    contexts = "".join(_context(ex, tokens, s.max_activation) for ex, tokens in zip(s.examples, card.example_tokens))
    return (f'<section class="feature" id="feature-{s.feature}" data-feature="{s.feature}">'
            f'<h2>Latent {s.feature}</h2><div class="summary">{summary}</div>'
            f'<div class="row"><div>{_histogram_svg(s)}</div>{_effects(card.effects)}</div>'
            f'<h3>Max-activating contexts</h3><div class="contexts">{contexts or "<p>never fires</p>"}</div></section>')


def _context(example: Any, tokens: list[str], max_activation: float) -> str:
    spans = []
    for i, (token, act) in enumerate(zip(tokens, example.acts)):
        alpha = max(0.0, act) / max_activation if max_activation > 0 else 0.0
        peak = " peak" if i == example.peak_index else ""
        shown = html_lib.escape(token.replace("\n", "↵"))
        spans.append(f'<span class="tok{peak}" data-act="{act:.4f}" '
                     f'style="background: rgba(255, 140, 0, {alpha:.3f})">{shown}</span>')
    return (f'<div class="ctx" data-seq="{example.seq}" data-pos="{example.pos}">'
            f'<span class="act">{example.activation:.3f}</span>{"".join(spans)}</div>')


def _histogram_svg(stats: FeatureStats, width: int = 320, height: int = 110) -> str:
    counts, edges = stats.histogram, stats.bin_edges
    top = max(int(counts.max()), 1)
    bar_w = width / len(counts)
    bars = "".join(f'<rect x="{i * bar_w:.1f}" y="{height - 20 - c / top * (height - 30):.1f}" '
                   f'width="{bar_w - 1:.1f}" height="{c / top * (height - 30):.1f}" fill="#f08c00">'
                   f"<title>{edges[i]:.3f}–{edges[i + 1]:.3f}: {c}</title></rect>" for i, c in enumerate(counts))
    axis = (f'<text x="0" y="{height - 4}" font-size="10">0</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" text-anchor="end">{edges[-1]:.2f}</text>'
            f'<text x="0" y="10" font-size="10">{top} tokens</text>')
    return (f'<svg class="histogram" width="{width}" height="{height}" role="img" '
            f'aria-label="activation histogram of latent {stats.feature}">{bars}{axis}</svg>')


def _effects(effects: TokenEffects | None) -> str:
    if effects is None:
        return ""
    esc = html_lib.escape
    rows = "".join(f'<tr><td class="pos">{esc(repr(p[0]))}</td><td class="pos">{p[1]:+.3f}</td>'
                   f'<td class="neg">{esc(repr(n[0]))}</td><td class="neg">{n[1]:+.3f}</td></tr>'
                   for p, n in zip(effects.promoted, effects.suppressed))
    return f'<table class="effects"><tr><th colspan="2">promoted</th><th colspan="2">suppressed</th></tr>{rows}</table>'
