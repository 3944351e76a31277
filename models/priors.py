"""Priors over LoRA factors.

A prior is an object passed to :func:`blob_pyro.models.bayesianize`, never a constant inside a layer
(TyXe's ``Prior`` pattern). Each prior maps an adapter site to a ``pyro.distributions`` distribution
over the whole factor, built on the device and in the dtype of the layer, so ``model.to(...)`` moves
the prior with the adapter.

Adding a prior is one subclass with a ``distribution(loc_like)`` method and one line in ``PRIORS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

__all__ = ["Prior", "NormalPrior", "LaplacePrior", "StudentTPrior", "HierarchicalNormalPrior", "PRIORS", "make_prior"]


class Prior:
    """Base class: an element-wise prior over a LoRA factor of shape ``(rows, cols)``."""

    def distribution(self, like: torch.Tensor) -> dist.TorchDistribution:
        """Return an element-wise distribution with the shape, device and dtype of ``like``."""
        raise NotImplementedError

    def site_distribution(self, like: torch.Tensor) -> dist.TorchDistribution:
        """The prior of a whole factor: every element independent, one event of shape ``like.shape``."""
        return self.distribution(like).to_event(like.dim())

    def describe(self) -> dict:
        """A JSON-able record of the prior, for run configs."""
        return {"name": type(self).__name__, **self.__dict__}


@dataclass
class NormalPrior(Prior):
    """Isotropic Gaussian ``N(0, scale^2)``; BLoB's prior with ``scale = 0.2`` (BLOB.md section 1)."""

    scale: float = 0.2

    def __post_init__(self):
        _check_positive("scale", self.scale)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return dist.Normal(zeros, zeros + self.scale)


@dataclass
class LaplacePrior(Prior):
    """Element-wise Laplace(0, scale): a sparsity-inducing prior."""

    scale: float = 0.2

    def __post_init__(self):
        _check_positive("scale", self.scale)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return dist.Laplace(zeros, zeros + self.scale)


@dataclass
class StudentTPrior(Prior):
    """Element-wise Student-t(df, 0, scale): heavy tails, no closed-form KL against a Gaussian."""

    scale: float = 0.2
    df: float = 3.0

    def __post_init__(self):
        _check_positive("scale", self.scale)
        _check_positive("df", self.df)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return dist.StudentT(zeros + self.df, zeros, zeros + self.scale)


@dataclass
class HierarchicalNormalPrior(Prior):
    """``N(0, s^2)`` with the scale ``s`` learned by empirical Bayes (type-II maximum likelihood).

    ``s`` is a positive ``pyro.param`` named ``param_name``, initialised at ``scale`` and shared by every
    factor under this prior; SVI maximises the ELBO over it together with the guide. With a Gaussian
    guide the optimum is ``s^2 = mean over elements of (M^2 + sigma^2)`` (closed form, tested). With a
    point-estimate guide (MAP) the optimum collapses to ``s -> 0`` together with A: use it with a
    distributional guide. Not usable with ``--objective parity`` (its optimisers do not see ``s``).
    """

    scale: float = 0.2
    param_name: str = "prior.scale"

    def __post_init__(self):
        _check_positive("scale", self.scale)

    def learned_scale(self) -> torch.Tensor:
        """The current ``s`` (created at its initial value on first use)."""
        return pyro.param(self.param_name, lambda: torch.tensor(float(self.scale)), constraint=constraints.positive)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return dist.Normal(zeros, zeros + self.learned_scale().to(like))


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"prior {name} must be a finite positive number, got {value!r}")


PRIORS: dict[str, Callable[..., Prior]] = {
    "normal": NormalPrior,
    "laplace": LaplacePrior,
    "student_t": StudentTPrior,
    "hierarchical": HierarchicalNormalPrior,
}


def make_prior(name: str, **options) -> Prior:
    """Build a registered prior by name, e.g. ``make_prior("laplace", scale=0.1)``."""
    try:
        factory = PRIORS[name]
    except KeyError:
        raise ValueError(f"unknown prior {name!r}; valid names: {sorted(PRIORS)}") from None
    return factory(**options)
