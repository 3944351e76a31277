"""``AutoNormal`` over the LoRA-A sites: a mean-field Gaussian with a softplus scale (Pyro's parameterisation).

Same family as BLoB (mean-field over A) with Pyro's default parameterisation, std = softplus(rho),
initialised at ``init_scale`` (default 0.0025 = BLoB's eps^2 at eps = 0.05, not Pyro's 0.1, which would
swamp the LoRA init of A ~ 1/sqrt(in_features)).
"""

from __future__ import annotations

from pyro.infer.autoguide import AutoNormal

from .autoguide import AutoGuideAdapter
from .registry import register_guide

__all__ = ["NormalGuide"]


@register_guide("normal", help="AutoNormal over A (mean-field, softplus std)")
class NormalGuide(AutoGuideAdapter):
    config_fields = {"init_scale": "init_scale"}

    def __init__(self, model, *, init_scale: float = 0.0025, sites=None, **options):
        super().__init__(model, AutoNormal, sites=sites, init_scale=float(init_scale), **options)

    def loc(self, site: str):
        return self.loc_and_scale(site)[0]

    def scale(self, site: str):
        return self.loc_and_scale(site)[1]
