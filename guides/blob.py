"""The BLoB guide: a mean-field Gaussian over every LoRA-A factor, std = G^2 (Wang et al. 2024).

    q(A) = prod_ij N(M_ij, (G_ij^2)^2)

M starts at the LoRA init of A (``init_loc_fn``, kaiming-uniform by default) and G ~ U(eps/sqrt(2), eps),
so the initial std lies in [eps^2/2, eps^2]. B is not a guide site: it stays the model's deterministic
``lora_B`` parameter (asymmetric Bayesianization, Wang et al. 2024, section 3.1). The Normal sits at the
model site itself, so ``TraceMeanField_ELBO`` uses the closed-form KL. Each A site carries M in its
``infer`` dict (``FLIPOUT_LOC``), from which the model takes flipout's mean.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from pyro.nn import PyroParam

from blob_pyro.models.bayesian_model import FLIPOUT_LOC, kl_weight_handler

from .base import LoRAGuide, deep_getattr, init_to_lora
from .registry import register_guide

__all__ = ["BLoBGuide"]


@register_guide("blob", help="Bayesian A (mean-field Gaussian, std G^2), deterministic B (BLoB)")
class BLoBGuide(LoRAGuide):
    """:param model: a :class:`~blob_pyro.models.BayesianLoRAModel`.
    :param eps: initial scale of G (G ~ U(eps / sqrt(2), eps)); 0.05 in the paper.
    :param init_loc_fn: ``layer -> (rank, in_features)`` initial mean of A.
    :param sites: regex of the A sites to make Bayesian (None: all); the rest are deterministic.
    """

    provides_flipout_loc = True
    config_fields = {"eps": "eps"}
    spread_parameter_names = frozenset({"std_roots"})

    def __init__(self, model, *, eps: float = 0.05, init_loc_fn=init_to_lora, sites=None):
        if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
            raise ValueError(f"BLoB eps must be a finite positive number (paper: 0.05), got {eps!r}")
        super().__init__(model, sites=sites, init_loc_fn=init_loc_fn)
        self.eps = float(eps)
        self.locs = self._new_container()
        self.std_roots = self._new_container()
        for site in self.site_names:
            loc = init_loc_fn(self._adapter(site)).detach().clone()
            self._add_gaussian(site, loc)

    def _add_gaussian(self, site: str, loc: torch.Tensor) -> None:
        root = torch.empty_like(loc).uniform_(self.eps / math.sqrt(2.0), self.eps)
        self._set_site_param(self.locs, site, PyroParam(loc))
        self._set_site_param(self.std_roots, site, PyroParam(root))

    def loc(self, site: str) -> torch.Tensor:
        """M for ``site``: ``(rank, in_features)``."""
        return deep_getattr(self.locs, site)

    def scale(self, site: str) -> torch.Tensor:
        """The std G^2 for ``site``: ``(rank, in_features)``."""
        root = deep_getattr(self.std_roots, site)
        return root * root

    def loc_and_scale(self, site: str):
        return self.loc(site), self.scale(site)

    def sample_gaussian(self, site: str) -> torch.Tensor:
        """Draw ``site`` from N(M, (G^2)^2), its mean recorded for flipout."""
        loc = self.loc(site)
        return pyro.sample(site, dist.Normal(loc, self.scale(site)).to_event(2), infer={FLIPOUT_LOC: loc})

    def forward(self, *args, kl_weight: float = 1.0, **kwargs):
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):
            for site in self.site_names:
                draws[site] = self.sample_gaussian(site)
        return draws

    def posterior_mean(self):
        return {**self.fixed_site_values(), **{site: self.loc(site).detach() for site in self.site_names}}
