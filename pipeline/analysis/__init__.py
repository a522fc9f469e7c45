"""What researchers do with a trained SAE, one concept per module:

- :mod:`~pipeline.analysis.matching`: pair an SAE with its model (refuse a mismatch, load, tokenize).
- :mod:`~pipeline.analysis.features`: a text's top latents per token, reconstruction per token;
  which texts activate a latent.
- :mod:`~pipeline.analysis.max_activating`: max-activating contexts, histograms and frequencies
  from the Zarr cache (no model).
- :mod:`~pipeline.analysis.steering`: generate with ``strength × W_dec[f]`` added at the hook.
- :mod:`~pipeline.analysis.attribution`: direct logit attribution of latents; tokens a latent promotes.
- :mod:`~pipeline.analysis.splice`: the SAE spliced into the model, latents as hook points
  (the one splicing implementation, also behind CE loss recovered).
- :mod:`~pipeline.analysis.neuronpedia`: links to Neuronpedia for the SAEs it hosts.
- :mod:`~pipeline.analysis.dashboard`: a self-contained HTML page of latent dashboards.

Import from the modules (``from pipeline.analysis.features import read_features``): this package
re-exports nothing, because :mod:`pipeline.evals` imports :mod:`~pipeline.analysis.splice` while
:mod:`~pipeline.analysis.max_activating` imports :mod:`pipeline.evaluate`, so an eager
``__init__`` would be an import cycle.
"""
