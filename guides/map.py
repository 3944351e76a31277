"""Maximum a posteriori: a point estimate of every LoRA-A (a Delta at a free parameter) WITH the prior.

Like ``AutoDelta``: the ELBO reduces to ``NLL - kl_weight * log p(A)``, i.e. LoRA with the prior as a
regulariser (for ``NormalPrior(s)``, an L2 penalty ``|A|^2 / (2 s^2)``). B is the model's parameter.
This is also the base run of the Laplace baseline (``blob_pyro.baselines.laplace``).
"""

from __future__ import annotations

from .mle import MLEGuide
from .registry import register_guide

__all__ = ["MAPGuide"]


@register_guide("map", help="point estimate of A with the prior")
class MAPGuide(MLEGuide):
    """Point estimates of every LoRA-A, scored by the prior (``scores_prior = True``)."""

    scores_prior = True
    point_estimate = True

    def forward(self, *args, kl_weight: float = 1.0, flipout=None, **kwargs):
        return super().forward(*args, kl_weight=kl_weight, flipout=flipout, **kwargs)
