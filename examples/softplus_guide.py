"""A custom guide in one file: a mean-field Gaussian over every LoRA-A factor with std = softplus(rho).

    q(A) = prod_ij N(M_ij, softplus(rho_ij)^2)

The same family as BLoB (Wang et al. 2024, section 3.1; std = G^2 there) with the parameterisation of
Bayes by Backprop (Blundell et al. 2015, section 3.2). B stays the model's deterministic parameter. From
the command line, nothing else to edit::

    python -m blob_pyro.train --guide examples.softplus_guide:SoftplusNormalGuide --init-scale 0.01 ...

What a guide declares for the trainer: ``config_fields`` (which run-config fields its constructor takes:
here ``--init-scale``) and ``spread_parameter_names`` (its parameters that set the posterior spread,
which ``--scale-lr-factor`` steps at ``lr * factor``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam

from blob_pyro.guides import LoRAGuide, init_to_lora
from blob_pyro.guides.base import deep_getattr
from blob_pyro.models.bayesian_model import kl_weight_handler

__all__ = ["SoftplusNormalGuide"]


class SoftplusNormalGuide(LoRAGuide):
    """:param init_scale: the initial std of every element (rho = softplus^-1(init_scale)).
    :param init_loc_fn: ``layer -> (rank, in_features)`` initial M (default: the LoRA init).
    :param sites: optional check of the model's Bayesian sites (see LoRAGuide)."""

    config_fields = {"init_scale": "init_scale"}
    spread_parameter_names = frozenset({"rhos"})

    def __init__(self, model, *, init_scale: float = 0.0025, init_loc_fn=init_to_lora, sites=None):
        if not (math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"SoftplusNormalGuide init_scale must be a finite positive std, got {init_scale!r}")
        super().__init__(model, sites=sites, init_loc_fn=init_loc_fn)
        self.locs, self.rhos = self._new_container(), self._new_container()
        rho = math.log(math.expm1(init_scale))  # softplus^-1
        for site in self.site_names:
            loc = init_loc_fn(self._adapter(site)).detach().clone()
            self._set_site_param(self.locs, site, PyroParam(loc))
            self._set_site_param(self.rhos, site, PyroParam(torch.full_like(loc, rho)))

    def loc_and_scale(self, site: str):
        """``(M, softplus(rho))`` of ``site``, each ``(rank, in_features)``."""
        return deep_getattr(self.locs, site), torch.nn.functional.softplus(deep_getattr(self.rhos, site))

    def forward(self, *args, kl_weight: float = 1.0, **kwargs):
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):  # the same weight as the model's A sites
            for site in self.site_names:
                loc, scale = self.loc_and_scale(site)
                draws[site] = pyro.sample(site, dist.Normal(loc, scale).to_event(2))
        return draws

    def posterior_mean(self):
        return {**self.fixed_site_values(), **{site: deep_getattr(self.locs, site).detach() for site in self.site_names}}
