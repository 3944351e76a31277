"""Priors over LoRA factors: objects passed to :func:`blob_pyro.models.bayesianize`.

A prior maps a factor (a tensor ``like`` of shape ``(rows, cols)``) to a ``pyro.distributions``
distribution over it, built on the device and in the dtype of ``like``, so ``model.to(...)`` moves the
prior with the adapter (TyXe's ``Prior`` pattern). Two kinds cover the usual cases:

* :class:`IIDPrior`: every element an independent copy of one scalar distribution, e.g.
  ``IIDPrior(dist.Laplace(0., 0.1))`` or ``IIDPrior(dist.StudentT, df=3., loc=0., scale=0.2)``.
  BLoB's prior is ``IIDPrior(dist.Normal(0., 0.2))`` (Wang et al. 2024, section 3.1).
* :class:`HierarchicalNormalPrior`: ``N(0, s^2)`` with ``s`` learned by empirical Bayes.

``bayesianize(..., prior=dist.Laplace(0., 0.1))`` wraps a bare scalar distribution in an ``IIDPrior``
(:func:`as_prior`). From the command line, ``--prior`` takes a registered name (:data:`PRIORS`) or an
import path ``module:callable`` whose keyword arguments come from ``--prior-kwargs`` (:func:`resolve_prior`).
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints
from torch.distributions.kl import _dispatch_kl

__all__ = [
    "Prior", "IIDPrior", "HierarchicalNormalPrior", "NormalPrior", "LaplacePrior", "StudentTPrior", "PRIORS",
    "make_prior", "as_prior", "resolve_prior", "parity_support", "register_prior", "PRIOR_HELP",
]

#: Registered priors: ``name -> factory(scale=..., df=...)`` (``--prior NAME --prior-scale S --prior-df D``);
#: filled by :func:`register_prior` where each factory is defined.
PRIORS: dict[str, Callable[..., "Prior"]] = {}
#: ``name -> description`` (the ``--prior`` help).
PRIOR_HELP: dict[str, str] = {}


def register_prior(name: str, *, help: str):
    """Decorator: register a prior factory (a function or a :class:`Prior` class) as ``--prior name``. The
    command line passes ``--prior-scale`` as ``scale`` and ``--prior-df`` as ``df`` where it takes them."""

    def register(factory):
        if PRIORS.get(name, factory) is not factory:
            raise ValueError(f"prior name {name!r} is taken by {PRIORS[name].__qualname__}; choose another name")
        PRIORS[name] = factory
        PRIOR_HELP[name] = help
        return factory

    return register


class Prior:
    """Base class: an element-wise prior over a LoRA factor of shape ``(rows, cols)``.

    Subclasses implement :meth:`distribution`; :meth:`closed_form_kl_family` and ``learned`` tell the
    parity objective whether it can use the prior (:func:`parity_support`).
    """

    #: True when the prior has parameters of its own that SVI learns (a ``pyro.param``).
    learned: bool = False

    def distribution(self, like: torch.Tensor) -> dist.TorchDistribution:
        """Return an element-wise distribution with the shape, device and dtype of ``like``."""
        raise NotImplementedError

    def site_distribution(self, like: torch.Tensor) -> dist.TorchDistribution:
        """The prior of a whole factor: every element independent, one event of shape ``like.shape``."""
        return self.distribution(like).to_event(like.dim())

    def closed_form_kl_family(self) -> Optional[type]:
        """The torch distribution class whose KL from a Normal is registered in ``torch.distributions.kl``,
        or None when there is no closed form."""
        return None

    def describe(self) -> dict:
        """A JSON-able record of the prior, for run configs."""
        return {"name": type(self).__name__, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}


def _constructor_arguments(d: torch.distributions.Distribution) -> dict:
    """The tensors that rebuild ``d``: its ``arg_constraints`` entries that are arguments of its constructor."""
    accepted = inspect.signature(type(d).__init__).parameters
    names = [n for n in d.arg_constraints if n in accepted and n in vars(d)]
    if "probs" in names and "logits" in names:  # one parameterisation only
        names.remove("logits")
    return {name: torch.as_tensor(getattr(d, name)) for name in names}


class IIDPrior(Prior):
    """Every element of the factor an independent draw from one scalar ``distribution``.

    :param distribution: a scalar ``pyro.distributions`` instance (batch and event shape ``()``), e.g.
        ``dist.Laplace(0., 0.1)``, or a distribution class given with its keyword arguments
        (``IIDPrior(dist.StudentT, df=3., loc=0., scale=0.2)``; the numbers are kept in float64 and cast
        to the factor's dtype, so a float64 model sees the exact values).

    The distribution is rebuilt on each call from its constructor arguments, moved to the device and
    dtype of the factor and broadcast to its shape.
    """

    def __init__(self, distribution, **parameters):
        if isinstance(distribution, type) and issubclass(distribution, torch.distributions.Distribution):
            factory = distribution
            arguments = {k: torch.as_tensor(v, dtype=torch.float64) if isinstance(v, (int, float)) else torch.as_tensor(v)
                         for k, v in parameters.items()}
        elif isinstance(distribution, torch.distributions.Distribution):
            if parameters:
                raise TypeError(f"IIDPrior({type(distribution).__name__}(...)) takes no keyword arguments, got {sorted(parameters)}")
            factory, arguments = type(distribution), _constructor_arguments(distribution)
        else:
            raise TypeError(
                f"IIDPrior expects a scalar pyro.distributions instance such as dist.Laplace(0., 0.1) or a distribution "
                f"class with keyword arguments, got {distribution!r}"
            )
        try:
            example = factory(**arguments)
        except (TypeError, ValueError) as err:
            raise ValueError(f"IIDPrior: cannot build {factory.__name__}(**{_plain(arguments)}): {err}") from None
        if tuple(example.batch_shape) != () or tuple(example.event_shape) != ():
            raise ValueError(
                f"IIDPrior needs a scalar distribution (batch and event shape ()), got {factory.__name__} with batch shape "
                f"{tuple(example.batch_shape)} and event shape {tuple(example.event_shape)}; pass scalar parameters"
            )
        self.factory = factory
        self._arguments = arguments

    @property
    def parameters(self) -> dict[str, float]:
        """The distribution's parameters as Python numbers, e.g. ``{"loc": 0.0, "scale": 0.2}``."""
        return _plain(self._arguments)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return self.factory(**{k: zeros + v.to(device=like.device, dtype=like.dtype) for k, v in self._arguments.items()})

    def closed_form_kl_family(self):
        return self.factory if _dispatch_kl(dist.Normal, self.factory) is not NotImplemented else None

    def describe(self):
        return {"name": "IIDPrior", "distribution": f"{self.factory.__module__}.{self.factory.__name__}", **self.parameters}

    def __repr__(self):
        args = ", ".join(f"{k}={v:g}" for k, v in self.parameters.items())
        return f"IIDPrior({self.factory.__name__}({args}))"


def _plain(arguments: dict) -> dict:
    return {k: float(v) if v.numel() == 1 else v.tolist() for k, v in arguments.items()}


@register_prior("hierarchical", help="normal whose scale is learned by empirical Bayes, starting at --prior-scale")
@dataclass
class HierarchicalNormalPrior(Prior):
    """``N(0, s^2)`` with the scale ``s`` learned by empirical Bayes (type-II maximum likelihood).

    ``s`` is a positive ``pyro.param`` named ``param_name``, initialised at ``scale`` and shared by every
    factor under this prior; SVI maximises the ELBO over it together with the guide. With a Gaussian
    guide the optimum is ``s^2 = mean over elements of (M^2 + sigma^2)`` (closed form, tested). With a
    point-estimate guide (MAP) the optimum collapses to ``s -> 0`` together with A: use it with a
    distributional guide. Not usable with the parity objective (its optimisers do not see ``s``).
    """

    scale: float = 0.2
    param_name: str = "prior.scale"
    learned = True

    def __post_init__(self):
        _check_positive("scale", self.scale)

    def learned_scale(self) -> torch.Tensor:
        """The current ``s`` (created at its initial value on first use)."""
        return pyro.param(self.param_name, lambda: torch.tensor(float(self.scale)), constraint=constraints.positive)

    def distribution(self, like):
        zeros = torch.zeros_like(like)
        return dist.Normal(zeros, zeros + self.learned_scale().to(like))

    def closed_form_kl_family(self):
        return dist.Normal


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"prior {name} must be a finite positive number, got {value!r}")


@register_prior("normal", help="N(0, --prior-scale^2), BLoB's")
def NormalPrior(scale: float = 0.2) -> IIDPrior:
    """Isotropic Gaussian ``N(0, scale^2)``; BLoB's prior with ``scale = 0.2`` (Wang et al. 2024, section 3.1)."""
    _check_positive("scale", scale)
    return IIDPrior(dist.Normal, loc=0.0, scale=scale)


@register_prior("laplace", help="Laplace(0, --prior-scale)")
def LaplacePrior(scale: float = 0.2) -> IIDPrior:
    """Element-wise ``Laplace(0, scale)``: a sparsity-inducing prior."""
    _check_positive("scale", scale)
    return IIDPrior(dist.Laplace, loc=0.0, scale=scale)


@register_prior("student_t", help="Student-t(--prior-df, 0, --prior-scale)")
def StudentTPrior(scale: float = 0.2, df: float = 3.0) -> IIDPrior:
    """Element-wise ``Student-t(df, 0, scale)``: heavy tails, no closed-form KL against a Gaussian."""
    _check_positive("scale", scale)
    _check_positive("df", df)
    return IIDPrior(dist.StudentT, df=df, loc=0.0, scale=scale)


def make_prior(name: str, **options) -> Prior:
    """Build a registered prior by name, e.g. ``make_prior("laplace", scale=0.1)``."""
    try:
        factory = PRIORS[name]
    except KeyError:
        raise ValueError(f"unknown prior {name!r}; valid names: {sorted(PRIORS)}, or an import path 'module:callable'") from None
    return factory(**options)


def as_prior(prior) -> Prior:
    """``prior`` as a :class:`Prior`: a ``Prior`` as is, a scalar distribution wrapped in :class:`IIDPrior`.

    :raises TypeError: for anything else (the message says what to pass).
    """
    if isinstance(prior, Prior):
        return prior
    if isinstance(prior, torch.distributions.Distribution):
        return IIDPrior(prior)
    raise TypeError(
        f"prior must be a blob_pyro.models.Prior or a scalar pyro.distributions instance (e.g. dist.Laplace(0., 0.1)), "
        f"got {prior!r}"
    )


def _import(path: str):
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"prior {path!r} is neither a registered name {sorted(PRIORS)} nor an import path 'module:callable' "
                         "(e.g. 'pyro.distributions:StudentT')")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import prior {path!r}: {err}") from None


def resolve_prior(spec: str, *, kwargs: Optional[dict] = None, scale: float = 0.2, df: float = 3.0) -> Prior:
    """The prior named on the command line.

    :param spec: a registered name (built with ``scale``/``df`` where it takes them) or an import path
        ``module:callable``. The callable is a ``pyro.distributions`` class (wrapped in :class:`IIDPrior`
        with ``kwargs``) or any function of ``kwargs`` returning a :class:`Prior` or a scalar distribution.
    :raises ValueError: for an unknown name, a failed import or a callable that returns something else.
    """
    kwargs = dict(kwargs or {})
    if ":" not in spec:
        if kwargs:
            raise ValueError(f"--prior-kwargs is for an import-path prior; the registered prior {spec!r} takes --prior-scale "
                             "(and --prior-df for student_t)")
        if spec not in PRIORS:
            return make_prior(spec)  # raises, listing the names
        accepted = inspect.signature(PRIORS[spec]).parameters
        options = {key: value for key, value in {"scale": scale, "df": df}.items() if key in accepted}
        return make_prior(spec, **options)
    factory = _import(spec)
    if isinstance(factory, type) and issubclass(factory, torch.distributions.Distribution):
        return IIDPrior(factory, **kwargs)
    if not callable(factory):
        raise ValueError(f"prior {spec!r} is {factory!r}, not a callable")
    try:
        built = factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"prior {spec!r} does not accept --prior-kwargs {kwargs}: {err}") from None
    try:
        return as_prior(built)
    except TypeError:
        raise ValueError(f"prior {spec!r} returned {built!r}; it must return a Prior or a scalar distribution") from None


def parity_support(prior: Prior) -> Optional[str]:
    """Why the parity objective cannot use ``prior``, or None when it can.

    The parity rule (Wang et al. 2024, section 3.3) steps a closed-form KL(N(M, G^4) || p) by SGD over the
    guide's parameters only: it needs a prior with a registered Normal KL and no learned parameters.
    """
    if prior.learned:
        return f"{prior!r} has a learned parameter, which the parity optimisers do not step"
    if prior.closed_form_kl_family() is None:
        return f"{prior!r} has no closed-form KL against a Normal guide"
    return None
