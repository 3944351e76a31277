"""Mean-field Gaussian over BOTH LoRA factors: Bayes by Backprop ("BBB" in the BLoB paper's tables).

    q(A, B) = prod N(M_A, (G_A^2)^2) * prod N(M_B, (G_B^2)^2),   p(A), p(B) = the layer's prior

The model must be built with ``bayesianize(..., random_B=True)`` (the CLI does so for ``--guide
meanfield``): B is then a sample site ``<module path>.lora_B`` drawn with A at the top of the model, and
the layer's ``lora_B`` parameter is unused. M_B starts at 0 (the adapted model starts at the base model in mean),
G ~ U(eps/sqrt(2), eps) for both factors, as in :class:`BLoBGuide`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from blob_pyro.models.bayesian_model import kl_weight_handler

from .blob import BLoBGuide
from .registry import register_guide

__all__ = ["MeanFieldGuide", "b_site"]


def b_site(a_site: str) -> str:
    """``...q_proj.lora_A`` -> ``...q_proj.lora_B``."""
    return a_site[: -len("lora_A")] + "lora_B"


@register_guide("meanfield", help="Bayesian A and B, mean-field Gaussian ('BBB')")
class MeanFieldGuide(BLoBGuide):
    """:param eps: initial scale of G for A and B. :param sites: regex of the layers to make Bayesian."""

    random_B = True

    def __init__(self, model, *, eps: float = 0.05, sites=None, **kwargs):
        super().__init__(model, eps=eps, sites=sites, **kwargs)
        for site in self.site_names:
            self._add_gaussian(b_site(site), self._adapter(site)._zeros_like_B())

    @property
    def b_site_names(self) -> list[str]:
        return [b_site(site) for site in self.site_names]

    def forward(self, *args, kl_weight: float = 1.0, **kwargs):
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):
            for site in self.site_names:  # A then B per layer: the model's site order (TraceMeanField_ELBO checks it)
                draws[site] = self.sample_gaussian(site)
                b = b_site(site)
                draws[b] = pyro.sample(b, dist.Normal(self.loc(b), self.scale(b)).to_event(2))
        return draws

    def posterior_mean(self):
        means = super().posterior_mean()
        means.update({site: self.loc(site).detach() for site in self.b_site_names})
        return means
