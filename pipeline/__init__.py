"""sae-pipeline: harvest language-model activations into a Zarr cache, train SAEs from it."""

__version__ = "0.1.0"

from pipeline.sae import SAE  # noqa: E402  (the public entry point: SAE.load(path))

__all__ = ["SAE", "__version__"]
