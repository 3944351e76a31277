"""Variational families over the LoRA factors (installed as ``blob_pyro.guides``)."""

from .autoguide import AutoGuideAdapter, resolve_autoguide_class
from .base import LoRAGuide, init_to_lora, select_sites
from .blob import BLoBGuide
from .fixed import FixedGaussianGuide, PosteriorMeanGuide
from .laplace import LaplaceAdapter
from .lowrank import LowRankGuide
from .map import MAPGuide
from .meanfield import MeanFieldGuide
from .mle import MLEGuide
from .normal import NormalGuide
from .registry import (
    GUIDE_HELP, GUIDES, guide_class, guide_config_fields, make_guide, register_guide, registered_guides, resolve_guide,
)

registered_guides()  # a guide defined in a new file of this package registers itself now

__all__ = [
    "LoRAGuide", "init_to_lora", "select_sites", "AutoGuideAdapter", "resolve_autoguide_class", "BLoBGuide",
    "MLEGuide", "MAPGuide", "MeanFieldGuide", "NormalGuide", "LowRankGuide", "LaplaceAdapter", "GUIDES", "GUIDE_HELP",
    "make_guide", "register_guide", "registered_guides", "resolve_guide", "guide_class", "guide_config_fields",
    "FixedGaussianGuide", "PosteriorMeanGuide",
]
