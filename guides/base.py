"""Shared machinery for guides over the LoRA sites of a :class:`BayesianLoRAModel`.

Guides here build their parameters eagerly from the model's adapters (no prototype trace), so they
can ``load_state_dict`` before the first call and work inside ``Predictive`` without labels
(PYRO_NOTES.md, "Guides").

Every guide accepts ``sites=<regex>``: only the A sites whose name matches (``re.search``) get the
guide's family; the other adapters become deterministic LoRA layers (a point estimate of A, no prior
term: the layer's sites are masked in model and guide). E.g. ``make_guide("blob", model, sites="lm_head")``
is a Bayesian lm_head on a plain-LoRA body.
"""

from __future__ import annotations

import re
from functools import reduce
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from blob_pyro.models.bayesian_model import BayesianLoRAModel
from blob_pyro.models.lora import BayesianLoRALinear, lora_init_A

__all__ = ["LoRAGuide", "init_to_lora", "deep_getattr", "select_sites"]

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


def select_sites(site_names: list[str], pattern: Optional[str]) -> list[str]:
    """The A sites matched by ``pattern`` (``re.search``; None selects all), in model order.

    :raises ValueError: for an invalid regex or one that matches no site (the message lists the sites).
    """
    if pattern is None:
        return list(site_names)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"sites={pattern!r} is not a valid regular expression: {err}") from None
    chosen = [s for s in site_names if regex.search(s)]
    if not chosen:
        raise ValueError(
            f"sites={pattern!r} matches no LoRA site; the model's sites are e.g. {site_names[:4]} "
            f"({len(site_names)} in all): pass a regex such as 'lm_head' or 'q_proj'"
        )
    return chosen


class LoRAGuide(AutoGuide):
    """Base class: an ``AutoGuide`` whose sites are the model's LoRA-A factors.

    Subclasses set ``scores_prior`` (False for maximum likelihood: the trainer then gives the A sites
    a prior weight of 0), ``point_estimate`` (True when every draw is the same: the trainer then
    evaluates the posterior mean only) and ``bayesian_B`` (True when B is a random site too), and
    implement ``forward(*args, kl_weight=1.0, flipout=None, **kwargs)`` returning ``{site: value}``
    and ``posterior_mean()``.

    :param sites: a regex; only matching A sites get the guide's family, the others are deterministic
        (see the module docstring). None: every site.
    """

    scores_prior: bool = True
    provides_flipout_loc: bool = False
    point_estimate: bool = False
    bayesian_B: bool = False

    def __init__(self, model: BayesianLoRAModel, *, sites: Optional[str] = None, init_loc_fn: InitLocFn = init_to_lora):
        if not isinstance(model, BayesianLoRAModel):
            raise TypeError(f"{type(self).__name__} expects a BayesianLoRAModel, got {type(model).__name__}")
        super().__init__(model)
        all_sites = list(model.adapters)
        self._site_names = select_sites(all_sites, sites)
        self._fixed_site_names = [s for s in all_sites if s not in self._site_names]
        self.sites_pattern = sites
        # The guide decides how each layer enters the model: B random or not, prior scored or masked.
        for site, layer in model.adapters.items():
            chosen = site in self._site_names
            layer.set_guide_options(bayesian_B=self.bayesian_B and chosen, prior_scored=chosen)
        if self._fixed_site_names:
            self.fixed_values = self._new_container()
            for site in self._fixed_site_names:
                value = init_loc_fn(self._adapter(site)).detach().clone()
                self._set_site_param(self.fixed_values, site, PyroParam(value))

    @property
    def site_names(self) -> list[str]:
        """The A sites this guide's family covers (all of them unless ``sites=`` was given)."""
        return list(self._site_names)

    @property
    def fixed_site_names(self) -> list[str]:
        """The A sites outside ``sites=``: point estimates with no prior term."""
        return list(self._fixed_site_names)

    def _adapter(self, site: str) -> BayesianLoRALinear:
        return self.model.adapters[site]

    @staticmethod
    def _new_container() -> PyroModule:
        return PyroModule()

    def _set_site_param(self, container: PyroModule, site: str, value) -> None:
        deep_setattr(container, site, value)

    def sample_fixed_sites(self) -> dict[str, torch.Tensor]:
        """Delta draws of the deterministic sites (masked, as in the model). Call from ``forward``."""
        draws = {}
        with poutine.mask(mask=False):
            for site in self._fixed_site_names:
                draws[site] = pyro.sample(site, dist.Delta(deep_getattr(self.fixed_values, site)).to_event(2))
        return draws

    def fixed_site_values(self) -> dict[str, torch.Tensor]:
        return {site: deep_getattr(self.fixed_values, site).detach() for site in self._fixed_site_names}

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{site: value}`` posterior means of every site (prediction with "N = 0")."""
        raise NotImplementedError

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.posterior_mean()
