"""``sae-pipeline attribute``: each SAE latent's direct contribution to a next-token logit."""

from __future__ import annotations

import click

from pipeline.analysis.attribution import LogitAttribution, logit_attribution
from stages.analysis_common import load_sae_and_model, model_option, sae_options


def run(sae_path: str, prompt: str, target: str, *, baseline: str | None = None, top_n: int = 10,
        model_name: str | None = None, device: str = "cpu") -> LogitAttribution:
    """Attribute the logit of ``target`` after ``prompt`` (minus ``baseline``'s) and print the top latents."""
    sae, model = load_sae_and_model(sae_path, model_name, device)
    a = logit_attribution(model, sae, prompt, target, baseline=baseline)
    what = f"logit({a.target!r})" + (f" - logit({a.baseline!r})" if a.baseline is not None else "")
    click.echo(f"{what} after {a.prompt!r}, direct path from {sae.cfg.hook_name}:")
    click.echo(f"{'latent':>8} {'activation':>11} {'contribution':>13}")
    for feature, act, contribution in a.top(top_n) + a.top(top_n, negative=True)[::-1]:
        click.echo(f"{feature:>8} {act:>11.3f} {contribution:>+13.4f}")
    click.echo(f"sum of {len(a.features)} latents {a.contributions.sum():+.4f} + error {a.error:+.4f} + bias "
               f"{a.bias:+.4f} = {a.total:+.4f} (direct path); the model's {what} = {a.model_logit:+.4f}")
    return a


@click.command("attribute")
@sae_options
@model_option
@click.option("--prompt", required=True, help="Text whose last token predicts the target.")
@click.option("--target", required=True, help="Target token (one token, mind the leading space: ' Paris').")
@click.option("--baseline", default=None, help="Optional token to subtract: attribute logit(target) - logit(baseline).")
@click.option("--top-n", default=10, show_default=True, type=click.IntRange(min=1), help="Latents shown each way.")
def command(sae_path, device, model_name, prompt, target, baseline, top_n):
    """Direct logit attribution of the SAE's latents, with the error and bias terms (they sum to the direct path)."""
    run(sae_path, prompt, target, baseline=baseline, top_n=top_n, model_name=model_name, device=device)
