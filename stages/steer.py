"""``sae-pipeline steer``: generate with and without ``strength × W_dec[feature]`` added at the SAE's hook."""

from __future__ import annotations

import click

from pipeline.analysis.steering import SteeringResult, format_side_by_side, steered_generation
from stages.analysis_common import load_sae_and_model, model_option, sae_options


def run(sae_path: str, prompt: str, feature: int, strength: float, *, model_name: str | None = None,
        device: str = "cpu", **generation) -> SteeringResult:
    """Generate both continuations and print them side by side."""
    sae, model = load_sae_and_model(sae_path, model_name, device)
    result = steered_generation(model, sae, prompt, feature, strength, **generation)
    click.echo(format_side_by_side(result))
    return result


@click.command("steer")
@sae_options
@model_option
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--feature", required=True, type=click.IntRange(min=0), help="Latent whose decoder row to add.")
@click.option("--strength", required=True, type=float, help="Multiple of W_dec[feature] added (activation units).")
@click.option("--max-new-tokens", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--only-generated", is_flag=True, help="Steer only the generated positions, not the prompt.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(min=0),
              help="Sampling temperature (0: greedy).")
@click.option("--top-k", default=50, show_default=True, type=click.IntRange(min=1), help="Sample among the k likeliest.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed shared by both runs (reproducible).")
def command(sae_path, device, model_name, prompt, feature, strength, **generation):
    """Print the unsteered and steered continuations of PROMPT side by side."""
    run(sae_path, prompt, feature, strength, model_name=model_name, device=device, **generation)
