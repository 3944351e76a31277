"""Shared machinery for guides over the LoRA sites of a :class:`BayesianLoRAModel`.

A guide reads its model and never writes to it. Which adapters are Bayesian, whether B is random and what
is masked were fixed when the model was built (``bayesianize(..., bayesian_sites=, random_B=)``); a guide
covers the model's Bayesian latent sites with its family and gives the sites of the deterministic adapters
(masked in the model: no prior term) point estimates. Sites are discovered from the model's sample sites
(:meth:`BayesianLoRAModel.latent_sites`).

Guides here build their parameters eagerly from the model's adapters (no prototype trace), so they can
``load_state_dict`` before the first call and work inside ``Predictive`` without labels. Capabilities are
methods of :class:`LoRAGuide`: :meth:`~LoRAGuide.loc_and_scale` (raises for a family without a per-site
mean and std), :meth:`~LoRAGuide.posterior_mean`.
"""

from __future__ import annotations

from functools import reduce
from typing import Callable, ClassVar, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam

from blob_pyro.models.adapt import select_sites
from blob_pyro.models.bayesian_model import BayesianLoRAModel
from blob_pyro.models.lora import BayesianLoRALinear, lora_init_A

__all__ = ["LoRAGuide", "init_to_lora", "deep_getattr", "select_sites"]

InitLocFn = Callable[[BayesianLoRALinear], torch.Tensor]


def init_to_lora(layer: BayesianLoRALinear) -> torch.Tensor:
    """Initialisation strategy: the standard LoRA init of A (kaiming-uniform, a = sqrt(5)).

    With B = 0 an init at A = 0 (Pyro's ``init_to_feasible``) would give B a zero gradient.
    """
    B = layer._parameters["lora_B"]
    return lora_init_A(layer.rank, layer.in_features, dtype=B.dtype, device=B.device)


def deep_getattr(obj, dotted: str):
    """``getattr`` along a dotted path (the inverse of Pyro's ``deep_setattr``)."""
    return reduce(getattr, dotted.split("."), obj)


class LoRAGuide(AutoGuide):
    """Base class: an ``AutoGuide`` whose sites are the model's LoRA factors.

    Subclasses set ``scores_prior`` (False for maximum likelihood: the trainer then gives the A sites
    a prior weight of 0), ``point_estimate`` (True when every draw is the same: the trainer then
    evaluates the posterior mean only), ``random_B`` (True for a family over B as well: the model must be
    built with ``random_B=True``) and ``provides_flipout_loc`` (True when its A sites carry their mean for
    flipout), and implement ``forward(*args, kl_weight=1.0, **kwargs)`` returning ``{site: value}``,
    ``posterior_mean()`` and, for a per-site Gaussian, ``loc_and_scale(site)``.

    :param sites: optional check: a regex that must select exactly the model's Bayesian sites (which
        adapters are Bayesian is decided by ``bayesianize(..., bayesian_sites=...)``, not by the guide).
    """

    scores_prior: bool = True
    provides_flipout_loc: bool = False
    point_estimate: bool = False
    random_B: Optional[bool] = False  # None: the family adapts to the model's sites (autoguides)
    #: ``{constructor keyword: run-config field}`` the command line passes to this guide, e.g.
    #: ``{"eps": "eps"}`` (``--eps``); ``--guide-kwargs`` adds or overrides keywords.
    config_fields: ClassVar[dict[str, str]] = {}
    #: Names (one component of a parameter's dotted name, ``_unconstrained`` suffix ignored) of the
    #: parameters that set the posterior spread (``--scale-lr-factor``), e.g. ``{"std_roots"}``.
    spread_parameter_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: BayesianLoRAModel, *, sites: Optional[str] = None, init_loc_fn: InitLocFn = init_to_lora):
        if not isinstance(model, BayesianLoRAModel):
            raise TypeError(f"{type(self).__name__} expects a BayesianLoRAModel, got {type(model).__name__}")
        super().__init__(model)
        model.param_scope.activate()
        self._param_scope = model.param_scope
        self._site_names = list(model.bayesian_sites)
        self._fixed_site_names = list(model.deterministic_sites)
        if not self._site_names:
            raise ValueError(f"{type(self).__name__}: the model has no Bayesian adapter; build it with bayesianize(...) "
                             "without bayesian_sites, or with a regex that matches some site")
        if sites is not None and select_sites(list(model.adapters), sites) != self._site_names:
            raise ValueError(
                f"sites={sites!r} selects {select_sites(list(model.adapters), sites)}, but the model's Bayesian sites are "
                f"{self._site_names}: which adapters are Bayesian is fixed when the model is built; pass "
                f"bayesianize(..., bayesian_sites={sites!r}) (CLI: --bayesian-sites) and build the guide without sites="
            )
        self._check_random_B(model)
        self.sites_pattern = sites
        if self._fixed_site_names:
            self.fixed_values = self._new_container()
            for site in self._fixed_site_names:
                value = init_loc_fn(self._adapter(site)).detach().clone()
                self._set_site_param(self.fixed_values, site, PyroParam(value))

    def _check_random_B(self, model: BayesianLoRAModel) -> None:
        has_random_B = bool(model.random_B_sites)
        if self.random_B is not None and has_random_B != self.random_B:
            built = "with random B (bayesianize(..., random_B=True))" if has_random_B else "with deterministic B"
            fix = ("use a guide over A and B such as 'meanfield'" if has_random_B else
                   "build the model with bayesianize(..., random_B=True) (the CLI does this for --guide meanfield)")
            raise ValueError(f"{type(self).__name__} {'covers' if self.random_B else 'does not cover'} B, but the model was "
                             f"built {built}: {fix}")

    def __call__(self, *args, **kwargs):
        self._param_scope.activate()  # this guide's parameters live in its model's store
        return super().__call__(*args, **kwargs)

    @property
    def bayesian_B(self) -> bool:
        """Whether B is random in the model this guide covers (read from the model)."""
        return bool(self.model.random_B_sites)

    @property
    def site_names(self) -> list[str]:
        """The A sites this guide's family covers (all of them unless ``sites=`` was given)."""
        return list(self._site_names)

    @property
    def fixed_site_names(self) -> list[str]:
        """The A sites outside ``sites=``: point estimates with no prior term."""
        return list(self._fixed_site_names)

    def _adapter(self, site: str) -> BayesianLoRALinear:
        return self.model.adapters[site]

    @staticmethod
    def _new_container() -> PyroModule:
        return PyroModule()

    def _set_site_param(self, container: PyroModule, site: str, value) -> None:
        deep_setattr(container, site, value)

    def sample_fixed_sites(self) -> dict[str, torch.Tensor]:
        """Delta draws of the deterministic sites (masked, as in the model). Call from ``forward``."""
        draws = {}
        with poutine.mask(mask=False):
            for site in self._fixed_site_names:
                draws[site] = pyro.sample(site, dist.Delta(deep_getattr(self.fixed_values, site)).to_event(2))
        return draws

    def fixed_site_values(self) -> dict[str, torch.Tensor]:
        return {site: deep_getattr(self.fixed_values, site).detach() for site in self._fixed_site_names}

    def posterior_mean(self) -> dict[str, torch.Tensor]:
        """``{site: value}`` posterior means of every site (prediction with "N = 0")."""
        raise NotImplementedError(f"{type(self).__name__} does not implement posterior_mean()")

    def loc_and_scale(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of the marginal posterior of ``site``, each the shape of the site's value.

        :raises NotImplementedError: for a family without per-site Gaussian marginals (point estimates,
            joint or non-Gaussian families); the message says which guides have them.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no per-site mean and standard deviation"
            f"{' (it is a point estimate)' if self.point_estimate else ''}: use a Gaussian guide such as 'blob', "
            "'meanfield' or 'normal'"
        )

    def has_loc_and_scale(self) -> bool:
        """Whether :meth:`loc_and_scale` answers for this guide's sites."""
        try:
            self.loc_and_scale(self._site_names[0])
        except NotImplementedError:
            return False
        return True

    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.posterior_mean()

    def spread_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters (as stepped by the optimiser: unconstrained) that set the posterior spread: those
        with a component of :attr:`spread_parameter_names` in their name. Empty for a point estimate."""
        names = self.spread_parameter_names
        return [p for name, p in self.named_parameters()
                if any(part.removesuffix("_unconstrained") in names for part in name.split("."))]

    def post_fit(self, batches: Sequence[dict]) -> None:
        """Called once after training with the training set in ``batches`` (each example once; dicts with
        ``input_ids``, ``attention_mask``, ``labels`` and head inputs): a family that is completed from the
        data after the optimisation (a Laplace approximation) does it here. The default does nothing."""
