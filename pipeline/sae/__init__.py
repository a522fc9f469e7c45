"""SAE architectures, their registry, and SAELens-compatible save/load::

    from pipeline.sae import SAE, SAEConfig, get_architecture

    sae = get_architecture("topk")(SAEConfig("topk", d_in=576, d_sae=4608, k=32))
    sae.save("data/saes/example")
    same = SAE.load("data/saes/example")  # a TopKSAE
"""

from pipeline.sae.base import SAE, SAEConfig, SparseLatents, TrainStepOutput
from pipeline.sae.batchtopk import BatchTopKSAE
from pipeline.sae.gated import GatedSAE
from pipeline.sae.jumprelu import JumpReLUSAE
from pipeline.sae.matryoshka import MatryoshkaSAE
from pipeline.sae.registry import ARCHITECTURES, get_architecture
from pipeline.sae.standard import StandardSAE
from pipeline.sae.topk import TopKSAE

__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "SAE",
    "SAEConfig",
    "SparseLatents",
    "StandardSAE",
    "TopKSAE",
    "TrainStepOutput",
    "get_architecture",
]
