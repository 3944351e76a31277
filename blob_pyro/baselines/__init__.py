"""Baselines of the BLoB paper that are not one SVI run, behind one entry point.

``run_method(cfg)`` runs ``cfg.method`` (``python -m blob_pyro.train --method <name>``) and writes the same
files as a training run (``config.json``, ``metrics.json``, ``predictions.npz``, ``run.json``) into
``cfg.output_dir``; the runs it builds on live in sub-directories and are reused when finished with a matching
config. Each module also implements ``load_predictive(run_dir, cfg, *, device, dtype)``: the finished run's
:class:`blob_pyro.run_predictive.RunPredictive` (draws ``(S, n, K)``, point estimate, its prediction modes),
through which ``python -m blob_pyro.evaluate`` and ``--eval-tasks`` analyse every method alike.

A baseline is one file in this package whose ``run(cfg) -> metrics`` is decorated with
:func:`register_method` (its name, its ``--method`` help, how ``blob_pyro.compare`` runs it and which run it
builds on); every module here is imported when the registry is first read (:func:`registered_methods`), so
``--method`` choices, its help and compare's method list need no other edit. The registered ones:

* ``mc_dropout``: LoRA dropout kept on at test time, ``--eval-samples`` passes (Gal & Ghahramani 2016).
* ``ensemble``: ``--ensemble-size`` independently seeded runs, probabilities averaged (Lakshminarayanan 2017).
* ``laplace``: post-hoc Laplace (diagonal or KFAC) over the LoRA parameters of a MAP/MLE run (Yang et al. 2024).
* ``tfb``: training-free Bayesianization of a MAP/MLE run (Shi et al. 2024, arXiv 2412.05723).
* ``temperature``: post-hoc temperature scaling of any run's posterior-mean logits, T fitted on its
  calibration split (Guo et al. 2017).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

__all__ = ["METHODS", "METHOD_HELP", "Method", "register_method", "registered_methods", "run_method"]


@dataclass(frozen=True)
class Method:
    """A registered baseline: ``run(cfg) -> metrics`` and how ``compare`` runs it.

    ``compare``: ``{compare method name: extra train flags}`` (each becomes ``--method <name> <flags>``);
    ``base_method``: the compare method whose run of the same seed it reuses as ``--base-run`` (or None).
    """

    name: str
    run: Callable
    help: str
    compare: dict = field(default_factory=dict)
    base_method: Optional[str] = None

    @property
    def module(self) -> str:
        """The module that defines the method (its ``run`` and ``load_predictive``)."""
        return self.run.__module__

    @property
    def load_predictive(self) -> Callable:
        """The module's ``load_predictive(run_dir, cfg, *, device, dtype)`` (a finished run's RunPredictive)."""
        try:
            return getattr(importlib.import_module(self.module), "load_predictive")
        except AttributeError:
            raise NotImplementedError(f"baseline {self.name!r} ({self.module}) defines no load_predictive(run_dir, cfg, *, "
                                      "device, dtype)") from None


#: ``name -> Method``; filled by :func:`register_method` (read it through :func:`registered_methods`).
METHODS: dict[str, Method] = {}
#: ``name -> description`` (the ``--method`` help).
METHOD_HELP: dict[str, str] = {}
_discovered = False


def register_method(name: str, *, help: str, compare: Optional[dict] = None, base_method: Optional[str] = None):
    """Decorator of a baseline's ``run(cfg) -> metrics``: register it as ``--method name``.

    :param help: what the method does and what it needs, in a sentence (the ``--method`` help).
    :param compare: ``{compare method name: extra train flags}`` (default ``{name: []}``), e.g.
        ``{"tfb": ["--guide", "mle"]}``.
    :param base_method: the compare method whose finished run (same seed) this one reuses as ``--base-run``.
    """

    def register(run: Callable) -> Callable:
        if name in METHODS and METHODS[name].run is not run:
            raise ValueError(f"baseline method name {name!r} is taken by {METHODS[name].run.__module__}; choose another name")
        METHODS[name] = Method(name, run, help, dict(compare if compare is not None else {name: []}), base_method)
        METHOD_HELP[name] = help
        return run

    return register


def registered_methods() -> dict[str, Method]:
    """Every registered baseline, after importing each module of this package once."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
    return METHODS


def run_method(cfg) -> dict:
    """Run the baseline ``cfg.method``; returns its metrics."""
    methods = registered_methods()
    try:
        method = methods[cfg.method]
    except KeyError:
        raise ValueError(f"unknown baseline method {cfg.method!r}; valid names: {sorted(methods)}") from None
    return method.run(cfg)
