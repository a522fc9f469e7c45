"""Options and loading shared by the analysis commands (features, max-examples, steer, attribute, dashboard)."""

from __future__ import annotations

from typing import Any

import click

from pipeline.analysis.matching import load_model_for_sae
from pipeline.errors import ConfigError
from pipeline.sae import SAE


def sae_options(f):
    """``--sae-path`` (required) and ``--device``."""
    f = click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")(f)
    return click.option("--sae-path", required=True, type=click.Path(file_okay=False),
                        help="SAE folder (ours or SAELens format: cfg.json + sae_weights.safetensors).")(f)


def model_option(f):
    """``--model``: the model to load (default: the one the SAE's cfg.json names)."""
    return click.option("--model", "model_name", default=None,
                        help="Model name or path [default: the SAE's model_name].")(f)


def load_sae_and_model(sae_path: str, model_name: str | None, device: str) -> tuple[SAE, Any]:
    """The SAE and its model, checked to fit (a mismatch is a ConfigError naming the fix)."""
    sae = SAE.load(sae_path, device=device)
    model, _ = load_model_for_sae(sae, model_name, device=device)
    return sae, model


def parse_features(text: str) -> list[int]:
    """``"12,80,7"`` → ``[12, 80, 7]``.

    Raises:
        ConfigError: a part that is not an integer.
    """
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--features expects comma-separated latent ids such as 12,80,7; got {text!r}.") from None
