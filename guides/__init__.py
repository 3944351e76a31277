"""Variational families over the LoRA factors (installed as ``blob_pyro.guides``)."""

from .autoguide import AutoGuideAdapter, resolve_autoguide_class
from .base import LoRAGuide, init_to_lora, select_sites
from .blob import BLoBGuide
from .fixed import FixedGaussianGuide, PosteriorMeanGuide
from .lowrank import LowRankGuide
from .map import MAPGuide
from .meanfield import MeanFieldGuide
from .mle import MLEGuide
from .normal import NormalGuide
from .registry import GUIDES, make_guide

__all__ = [
    "LoRAGuide", "init_to_lora", "select_sites", "AutoGuideAdapter", "resolve_autoguide_class", "BLoBGuide",
    "MLEGuide", "MAPGuide", "MeanFieldGuide", "NormalGuide", "LowRankGuide", "GUIDES", "make_guide",
    "FixedGaussianGuide", "PosteriorMeanGuide",
]
