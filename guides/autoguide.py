"""Any ``pyro.infer.autoguide`` class over the LoRA-A sites: ``AutoGuideAdapter(model, AutoNormal, ...)``.

:func:`adapter_for` picks the adapter of an autoguide class (``AutoLaplaceApproximation`` gets
:class:`~blob_pyro.guides.laplace.LaplaceAdapter`, whose covariance comes from the real model's Hessian
after training) and refuses the families that cannot work here, saying why (:data:`REFUSED_AUTOGUIDES`).

The wrapped autoguide sees a *prior-only* model: the model's latent sites (:meth:`BayesianLoRAModel.draw_lora_factors`,
so a random B or a latent site a user adds is covered too) with the deterministic adapters' sites hidden, so
its prototype trace is built eagerly here (no batch needed: ``load_state_dict`` works before the first call
and ``Predictive`` without labels works). A's init is the LoRA init
(``init_to_lora``), not Pyro's ``init_to_feasible`` (A = 0 would give B a zero gradient at B = 0).

The KL weight scales the autoguide's sites (auxiliary latents included) exactly as the model's A sites.
Note: AutoNormal-style guides put a Delta at the model site, so ``TraceMeanField_ELBO`` falls back to a
Monte Carlo KL for them.
"""

from __future__ import annotations

import importlib
import inspect

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoCallable, AutoDelta, AutoGaussian, AutoGuide, AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible

from blob_pyro.models.bayesian_model import kl_weight_handler

from .base import LoRAGuide, init_to_lora

__all__ = ["AutoGuideAdapter", "resolve_autoguide_class", "adapter_for", "REFUSED_AUTOGUIDES"]

#: Autoguide families that cannot cover the LoRA sites, with the reason given to the user.
REFUSED_AUTOGUIDES: dict[type, str] = {
    AutoGaussian: (
        "AutoGaussian derives its sparse precision structure from the dependency graph of the model it is built on; "
        "every LoRA factor feeds the same categorical likelihood, so that structure is one dense Gaussian over all of A "
        "(D^2 numbers). Use pyro.infer.autoguide:AutoMultivariateNormal on a few sites (--bayesian-sites) or "
        "pyro.infer.autoguide:AutoLowRankMultivariateNormal (--guide-rank)"
    ),
    AutoGuideList: ("AutoGuideList is a container that starts empty (it would cover no site, so A would be drawn from the "
                    "prior); build one in Python with a part per site group and pass it to SVI"),
    AutoCallable: "AutoCallable wraps a hand-written guide function; pass such a guide as a LoRAGuide subclass 'module:Class'",
}


def adapter_for(autoguide_class: type) -> type:
    """The adapter class that wraps ``autoguide_class`` over the LoRA sites.

    :raises ValueError: for a family in :data:`REFUSED_AUTOGUIDES` (the message says why and what to use).
    """
    from .laplace import LaplaceAdapter  # late: laplace.py subclasses AutoGuideAdapter

    for refused, reason in REFUSED_AUTOGUIDES.items():
        if issubclass(autoguide_class, refused):
            raise ValueError(f"--guide {autoguide_class.__module__}:{autoguide_class.__name__} is not supported: {reason}")
    if issubclass(autoguide_class, LaplaceAdapter.autoguide_family):
        return LaplaceAdapter
    return AutoGuideAdapter


def resolve_autoguide_class(path: str) -> type:
    """``"module:Class"`` (e.g. ``pyro.infer.autoguide:AutoLaplaceApproximation``) -> the class.

    :raises ValueError: when the module or class does not exist or is not an ``AutoGuide`` subclass.
    """
    module_name, _, class_name = path.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"guide import path {path!r} must look like 'module:Class', e.g. 'pyro.infer.autoguide:AutoNormal'")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import guide {path!r}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, AutoGuide)):
        raise ValueError(f"guide {path!r} is {cls!r}, not a pyro.infer.autoguide.AutoGuide subclass")
    if issubclass(cls, LoRAGuide):
        raise ValueError(f"guide {path!r} is a LoRAGuide, which covers the model itself: build it directly "
                         "(make_guide('module:Class', model)), not through AutoGuideAdapter")
    return cls


class AutoGuideAdapter(LoRAGuide):
    """Wrap an autoguide class over the (``sites=``-selected) LoRA-A sites of a model.

    :param autoguide_class: an ``AutoGuide`` subclass (``AutoNormal``, ``AutoLowRankMultivariateNormal``,
        ``AutoDelta``, ...) or a ``"module:Class"`` import path.
    :param sites: optional check against the model's Bayesian sites (see :class:`LoRAGuide`).
    :param options: passed to the autoguide constructor (e.g. ``init_scale``, ``rank``).
    """

    spread_parameter_names = frozenset({"scales", "scale", "cov_factor", "scale_tril"})  # Pyro's names

    @classmethod
    def config_fields_for(cls, autoguide_class: type) -> dict[str, str]:
        """The run-config fields an autoguide class takes: ``init_scale`` (``--init-scale``) and ``rank``
        (``--guide-rank``) where its constructor has them."""
        accepted = inspect.signature(autoguide_class.__init__).parameters
        return {key: field for key, field in {"init_scale": "init_scale", "rank": "guide_rank"}.items() if key in accepted}

    def __init__(self, model, autoguide_class, *, sites=None, init_loc_fn=init_to_lora, **options):
        if isinstance(autoguide_class, str):
            autoguide_class = resolve_autoguide_class(autoguide_class)
        adapter = adapter_for(autoguide_class)  # raises for a refused family
        if not isinstance(self, adapter):
            raise ValueError(f"{autoguide_class.__name__} needs the adapter {adapter.__name__}; build it with "
                             f"make_guide('{autoguide_class.__module__}:{autoguide_class.__name__}', model)")
        super().__init__(model, sites=sites, init_loc_fn=init_loc_fn)
        self.autoguide_class = autoguide_class
        self.point_estimate = issubclass(autoguide_class, AutoDelta)
        layers = {site: self._adapter(site) for site in self.site_names}
        hidden = list(self.fixed_site_names)

        def init_site(site):
            layer = layers.get(site["name"])
            return init_loc_fn(layer) if layer is not None else init_to_feasible(site)

        def prior_model(*args, **kwargs):
            with poutine.block(hide=hidden):
                return model.draw_lora_factors(1.0)

        if "init_loc_fn" in inspect.signature(autoguide_class.__init__).parameters:
            options.setdefault("init_loc_fn", init_site)
        inner = autoguide_class(prior_model, **options)
        inner._setup_prototype()  # eager: parameters exist before the first call
        self.inner = inner
        # Attaching made this guide the inner one's "master" (AutoGuideList's protocol for plates and
        # prototype checks); the inner guide is self-contained, so detach it again.
        inner._update_master(None)

    random_B = None  # covers whatever latent sites the model has

    def forward(self, *args, kl_weight: float = 1.0, **kwargs):
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):
            draws.update(self.inner())
        return draws

    def loc_and_scale(self, site: str):
        if isinstance(self.inner, AutoNormal) and site in self.site_names:
            return self.inner._get_loc_and_scale(site)
        return super().loc_and_scale(site)

    @torch.no_grad()
    def posterior_mean(self):
        means = {site: value.detach() for site, value in self.inner.median().items()}
        return {**self.fixed_site_values(), **means}
