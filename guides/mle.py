"""Maximum likelihood: plain LoRA. A is a point estimate (a Delta at a free parameter), no prior term.

The trainer reads ``scores_prior = False`` and gives the A sites weight 0 in model and guide, so the
objective is exactly the (dataset-scaled) negative log-likelihood.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from pyro.nn import PyroParam

from blob_pyro.models.bayesian_model import kl_weight_handler

from .base import LoRAGuide, deep_getattr, init_to_lora
from .registry import register_guide

__all__ = ["MLEGuide"]


@register_guide("mle", help="plain LoRA: point estimate of A, no prior")
class MLEGuide(LoRAGuide):
    """Point estimates of every LoRA-A (initialised by ``init_loc_fn``); B is the model's parameter."""

    scores_prior = False
    point_estimate = True

    def __init__(self, model, *, init_loc_fn=init_to_lora, sites=None):
        super().__init__(model, sites=sites, init_loc_fn=init_loc_fn)
        self.values = self._new_container()
        for site in self.site_names:
            self._set_site_param(self.values, site, PyroParam(init_loc_fn(self._adapter(site)).detach().clone()))

    def forward(self, *args, kl_weight: float = 0.0, flipout=None, **kwargs):
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):
            for site in self.site_names:
                draws[site] = pyro.sample(site, dist.Delta(deep_getattr(self.values, site)).to_event(2))
        return draws

    def posterior_mean(self):
        return {**self.fixed_site_values(), **{site: deep_getattr(self.values, site).detach() for site in self.site_names}}
