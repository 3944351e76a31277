"""Guides that are not trained: posteriors fitted by another method, used for prediction only.

* :class:`FixedGaussianGuide`: a mean-field Gaussian with given means and standard deviations per site,
  the posterior of the post-hoc baselines (Laplace, Yang et al. 2024; TFB, Shi et al. 2024).
* :class:`PosteriorMeanGuide`: a point mass at another guide's posterior mean, the weights of MC dropout
  (Gal & Ghahramani 2016), whose only randomness is the dropout mask.

Both read the model and never write to it, and behave like a ``LoRAGuide`` for
:mod:`blob_pyro.evaluation.predictive`: ``forward`` samples every site, ``posterior_mean()`` returns the
means.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

__all__ = ["FixedGaussianGuide", "PosteriorMeanGuide"]


class FixedGaussianGuide(torch.nn.Module):
    """A non-trainable mean-field Gaussian over given sites, for post-hoc baselines (TFB, Laplace).

    ``forward`` samples every site, ``posterior_mean()`` returns the means, ``loc_and_scale(site)`` the
    marginals. Sites named ``<path>.lora_B`` need a model built with random B
    (:func:`blob_pyro.models.with_random_B`); the guide checks the model and never changes it.

    :param model: the ``BayesianLoRAModel``. :param locs, scales: ``{site: tensor}``, A ``(rank, in_features)``,
        B ``(out_features, rank)``.
    """

    scores_prior = True
    point_estimate = False
    provides_flipout_loc = False

    def __init__(self, model, locs: dict, scales: dict):
        super().__init__()
        self._model = (model,)
        self.locs = {k: v.detach() for k, v in locs.items()}
        self.scales = {k: v.detach() for k, v in scales.items()}
        random_B = set(model.random_B_sites)
        given_B = {site for site in self.locs if site.endswith(".lora_B")}
        if given_B != random_B:
            raise ValueError(
                f"FixedGaussianGuide: the posterior covers the B sites {sorted(given_B)[:3]} but the model's random B sites "
                f"are {sorted(random_B)[:3]}; build the model with blob_pyro.models.with_random_B(model) for a posterior "
                "over B, or leave B out of the posterior"
            )

    @property
    def bayesian_B(self) -> bool:
        return bool(self._model[0].random_B_sites)

    @property
    def site_names(self) -> list[str]:
        return list(self.locs)

    def loc_and_scale(self, site: str):
        return self.locs[site], self.scales[site]

    def has_loc_and_scale(self) -> bool:
        return True

    def forward(self, *args, **kwargs):
        return {site: pyro.sample(site, dist.Normal(loc, self.scales[site]).to_event(loc.dim())) for site, loc in self.locs.items()}

    def posterior_mean(self) -> dict:
        return dict(self.locs)


class PosteriorMeanGuide(torch.nn.Module):
    """A point mass at ``guide.posterior_mean()``: every draw is the trained guide's posterior mean
    (MC dropout: the dropout masks are the only randomness of a draw).

    :param guide: a trained guide with ``posterior_mean()`` (``{site: tensor}``).
    """

    scores_prior = False
    point_estimate = True
    provides_flipout_loc = False

    def __init__(self, guide):
        super().__init__()
        self._guide = (guide,)  # not a submodule: this wrapper has no parameters of its own

    @property
    def bayesian_B(self) -> bool:
        return bool(getattr(self._guide[0], "bayesian_B", False))

    @property
    def site_names(self) -> list[str]:
        return list(self.posterior_mean())

    def has_loc_and_scale(self) -> bool:
        return False

    def loc_and_scale(self, site: str):
        raise NotImplementedError("PosteriorMeanGuide is a point estimate: it has no per-site standard deviation")

    def forward(self, *args, **kwargs):
        return {site: pyro.sample(site, dist.Delta(value, event_dim=value.dim())) for site, value in self.posterior_mean().items()}

    def posterior_mean(self) -> dict:
        return {site: value.detach() for site, value in self._guide[0].posterior_mean().items()}
