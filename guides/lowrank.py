"""``AutoLowRankMultivariateNormal`` over the LoRA-A sites: a Gaussian with a low-rank-plus-diagonal
covariance across ALL covered A elements (correlations between layers, which mean-field BLoB ignores).

:param rank: rank of the covariance factor (default 8; Pyro's default sqrt(latent dim) would be a
    ~280k x 530 matrix on SmolLM2).
:param init_scale: initial scale (default 0.0025, BLoB's initial std at eps = 0.05).
"""

from __future__ import annotations

from pyro.infer.autoguide import AutoLowRankMultivariateNormal

from .autoguide import AutoGuideAdapter
from .registry import register_guide

__all__ = ["LowRankGuide"]


@register_guide("lowrank", help="AutoLowRankMultivariateNormal over A (rank --guide-rank)")
class LowRankGuide(AutoGuideAdapter):
    config_fields = {"init_scale": "init_scale", "rank": "guide_rank"}

    def __init__(self, model, *, rank: int = 8, init_scale: float = 0.0025, sites=None, **options):
        super().__init__(model, AutoLowRankMultivariateNormal, sites=sites, rank=int(rank), init_scale=float(init_scale), **options)

    def get_posterior(self):
        """The joint ``LowRankMultivariateNormal`` over the covered A sites, flattened in site order."""
        return self.inner.get_posterior()
