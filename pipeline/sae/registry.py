"""Architecture name → SAE class. Adding an architecture adds one module and one line here."""

from __future__ import annotations

from pipeline.errors import ConfigError
from pipeline.sae.base import SAE, closest_name_hint
from pipeline.sae.batchtopk import BatchTopKSAE
from pipeline.sae.gated import GatedSAE
from pipeline.sae.jumprelu import JumpReLUSAE
from pipeline.sae.matryoshka import MatryoshkaSAE
from pipeline.sae.standard import StandardSAE
from pipeline.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "standard": StandardSAE,
    "topk": TopKSAE,
    "gated": GatedSAE,
    "jumprelu": JumpReLUSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
}

# Other names for a registered architecture, accepted by get_architecture (SAELens spellings).
ALIASES: dict[str, str] = {
    "matryoshka_batchtopk": "matryoshka",
}


def get_architecture(name: str) -> type[SAE]:
    """The SAE class registered as ``name`` (or as the architecture that ``ALIASES`` maps it to).

    Raises:
        ConfigError: ``name`` is not registered (the message lists the known names).
    """
    try:
        return ARCHITECTURES[ALIASES.get(name, name)]
    except KeyError:
        raise ConfigError(
            f"unknown SAE architecture {name!r}{closest_name_hint(str(name), tuple(ARCHITECTURES))}; "
            f"known: {', '.join(ARCHITECTURES)}."
        ) from None
