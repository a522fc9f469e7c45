"""Links to Neuronpedia's page of a latent, for the published SAEs that Neuronpedia hosts::

    neuronpedia_url("gpt2-small-res-jb", "blocks.8.hook_resid_pre", 1234)
    # 'https://www.neuronpedia.org/gpt2-small/8-res-jb/1234'

The release and SAE id are SAELens's, checked against the release registry
(:mod:`pipeline.sae.pretrained`); the Neuronpedia id of each SAE (``<model>/<layer>-<source>``)
comes from ``neuronpedia_ids.yaml`` beside this module (its facts are SAELens's registry's).
An SAE folder whose ``cfg.json`` metadata carries ``neuronpedia_id`` (SAELens writes it for
hosted SAEs) is linked with :func:`neuronpedia_url_for`.
"""

from __future__ import annotations

import functools
from importlib.resources import files

import yaml

from pipeline.errors import ConfigError
from pipeline.sae import SAE
from pipeline.sae.pretrained import resolve

NEURONPEDIA_URL = "https://www.neuronpedia.org"
IDS_FILENAME = "neuronpedia_ids.yaml"


@functools.cache
def _hosted() -> dict[str, dict[str, str]]:
    """``{release: {sae_id: neuronpedia id}}`` from ``neuronpedia_ids.yaml``."""
    text = files("pipeline.analysis").joinpath(IDS_FILENAME).read_text(encoding="utf-8")
    return yaml.safe_load(text)["releases"]


def neuronpedia_id(release: str, sae_id: str) -> str:
    """Neuronpedia's id of a published SAE, e.g. ``"gpt2-small/8-res-jb"``.

    Raises:
        ConfigError: an unknown release or SAE id (with the closest name), or an SAE Neuronpedia
            does not host.
        SAEFormatError: a SAELens release left out of the registry on purpose.
    """
    resolve(release, sae_id)  # the registry's own checks and messages for unknown names
    hosted = _hosted().get(release, {})
    if sae_id not in hosted:
        where = f"; it hosts these of {release!r}: {', '.join(hosted)}" if hosted else ""
        raise ConfigError(f"Neuronpedia does not host SAE {sae_id!r} of release {release!r}{where}.")
    return hosted[sae_id]


def neuronpedia_url(release: str, sae_id: str, feature: int) -> str:
    """``https://www.neuronpedia.org/<model>/<layer>-<source>/<feature>`` for latent ``feature``.

    Raises:
        ConfigError: as :func:`neuronpedia_id`, or a negative latent id.
    """
    return _url(neuronpedia_id(release, sae_id), feature)


def neuronpedia_url_for(sae: SAE, feature: int) -> str | None:
    """The latent's page from the SAE's ``cfg.json`` metadata ``neuronpedia_id``, or None when the
    SAE carries none (our own SAEs are not on Neuronpedia).

    Raises:
        ConfigError: a latent id outside ``[0, d_sae)``.
    """
    np_id = sae.cfg.metadata.get("neuronpedia_id")
    if not np_id:
        return None
    if feature >= sae.cfg.d_sae:
        raise ConfigError(f"latent {feature} is out of range: this SAE has d_sae {sae.cfg.d_sae}.")
    return _url(str(np_id), feature)


def _url(np_id: str, feature: int) -> str:
    if int(feature) < 0:
        raise ConfigError(f"latent ids are >= 0, got {feature}.")
    return f"{NEURONPEDIA_URL}/{np_id.strip('/')}/{int(feature)}"
