"""Variational families over the LoRA factors (installed as ``blob_pyro.guides``)."""

from .base import LoRAGuide, init_to_lora
from .blob import BLoBGuide
from .mle import MLEGuide
from .registry import GUIDES, make_guide

__all__ = ["LoRAGuide", "init_to_lora", "BLoBGuide", "MLEGuide", "GUIDES", "make_guide"]
