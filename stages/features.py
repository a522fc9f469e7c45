"""``sae-pipeline features``: the top SAE latents of every token of a text, with reconstruction per token."""

from __future__ import annotations

import click

from pipeline.analysis.features import TokenFeatures, format_feature_table, read_features
from stages.analysis_common import load_sae_and_model, model_option, sae_options


def run(sae_path: str, text: str, *, model_name: str | None = None, top_k: int = 5, device: str = "cpu") -> TokenFeatures:
    """Load the SAE and its model, read ``text`` through them, print the table and a summary line."""
    sae, model = load_sae_and_model(sae_path, model_name, device)
    tf = read_features(model, sae, text)
    click.echo(format_feature_table(tf, k=top_k))
    click.echo(f"{len(tf.str_tokens)} tokens at {sae.cfg.hook_name}: mean L0 {tf.n_active.float().mean():.1f}, "
               f"mean cosine {tf.cosine.mean():.3f}, mean explained variance {tf.explained_variance.mean():.3f} "
               "(reference: the text's mean activation)")
    return tf


@click.command("features")
@sae_options
@model_option
@click.option("--text", required=True, help="The text to read.")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Latents shown per token.")
def command(sae_path, device, model_name, text, top_k):
    """Print, per token of TEXT: L0, cosine and explained variance of the reconstruction, and the top latents."""
    run(sae_path, text, model_name=model_name, top_k=top_k, device=device)
