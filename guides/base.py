"""Shared machinery for guides over the LoRA-A sites of a :class:`BayesianLoRAModel`.

Guides here build their parameters eagerly from the model's adapters (no prototype trace), so they
can ``load_state_dict`` before the first call and work inside ``Predictive`` without labels
(PYRO_NOTES.md, "Guides").
"""

from __future__ import annotations

from functools import reduce
from typing import Callable

import torch
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule

from blob_pyro.models.bayesian_model import BayesianLoRAModel
from blob_pyro.models.lora import BayesianLoRALinear, lora_init_A

__all__ = ["LoRAGuide", "init_to_lora", "deep_getattr"]

InitLocFn = Callable[[BayesianLoRALinear], torch.Tensor]


def init_to_lora(layer: BayesianLoRALinear) -> torch.Tensor:
    """Initialisation strategy: the standard LoRA init of A (kaiming-uniform, a = sqrt(5)).

    With B = 0 an init at A = 0 (Pyro's ``init_to_feasible``) would give B a zero gradient.
    """
    B = layer._parameters["lora_B"]
    return lora_init_A(layer.rank, layer.in_features, dtype=B.dtype, device=B.device)


def deep_getattr(obj, dotted: str):
    """``getattr`` along a dotted path (the inverse of Pyro's ``deep_setattr``)."""
    return reduce(getattr, dotted.split("."), obj)


class LoRAGuide(AutoGuide):
    """Base class: an ``AutoGuide`` whose sites are the model's LoRA-A factors.

    Subclasses set ``scores_prior`` (False for maximum likelihood: the trainer then gives the A sites
    a prior weight of 0) and implement ``forward(*args, kl_weight=1.0, flipout=None, **kwargs)``
    returning ``{site: A}`` and ``posterior_mean()``.
    """

    scores_prior: bool = True
    provides_flipout_loc: bool = False

    def __init__(self, model: BayesianLoRAModel):
        if not isinstance(model, BayesianLoRAModel):
            raise TypeError(f"{type(self).__name__} expects a BayesianLoRAModel, got {type(model).__name__}")
        super().__init__(model)
        self._site_names = list(model.adapters)

    @property
    def site_names(self) -> list[str]:
        return list(self._site_names)

    def _adapter(self, site: str) -> BayesianLoRALinear:
        return self.model.adapters[site]

    @staticmethod
    def _new_container() -> PyroModule:
        return PyroModule()

    def _set_site_param(self, container: PyroModule, site: str, value) -> None:
        deep_setattr(container, site, value)

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{site: (rank, in_features)}`` posterior means of A (prediction with "N = 0")."""
        raise NotImplementedError

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.posterior_mean()
