"""Guide registry: ``make_guide(spec, model, **options)``. Adding a guide is one file.

A guide names itself where it is defined, with the :func:`register_guide` decorator; every module of
this package is imported when the registry is first read (:func:`registered_guides`), so a new file in
``guides/`` needs no other edit. Outside the package a guide is named by import path instead:

* ``"module:Class"`` where ``Class`` is a :class:`~blob_pyro.guides.base.LoRAGuide` subclass (e.g.
  ``examples.softplus_guide:SoftplusNormalGuide``): built as ``Class(model, **options)``;
* ``"module:Class"`` where ``Class`` is any other ``pyro.infer.autoguide.AutoGuide`` (e.g.
  ``pyro.infer.autoguide:AutoDiagonalNormal``): wrapped over the model's latent sites by
  :func:`~blob_pyro.guides.autoguide.adapter_for` (``AutoLaplaceApproximation`` gets its Hessian from the
  real model after training; families that cannot work on the LoRA sites are refused with the reason).

Which run-config fields a guide takes is declared by the guide (``LoRAGuide.config_fields``; for
autoguides, the constructor's ``init_scale`` and ``rank``): :func:`guide_config_fields`.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Optional

from pyro.infer.autoguide import AutoGuide

from .base import LoRAGuide

__all__ = ["GUIDES", "GUIDE_HELP", "register_guide", "registered_guides", "resolve_guide", "guide_class", "make_guide",
           "guide_config_fields"]

#: ``name -> LoRAGuide subclass``; filled by :func:`register_guide` (read it through :func:`registered_guides`).
GUIDES: dict[str, type] = {}
#: ``name -> one-line description`` (the ``--guide`` help text).
GUIDE_HELP: dict[str, str] = {}
_discovered = False


def register_guide(name: str, *, help: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`LoRAGuide` subclass as ``--guide name``.

    :param help: what the family is, in a few words (shown by ``--help`` and the README).
    :raises ValueError: for a name already taken by another class, or a class that is not a LoRAGuide.
    """

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, LoRAGuide)):
            raise ValueError(f"register_guide({name!r}) decorates {cls!r}; it must be a blob_pyro.guides.LoRAGuide subclass")
        if GUIDES.get(name, cls) is not cls:
            raise ValueError(f"guide name {name!r} is taken by {GUIDES[name].__qualname__}; choose another name for {cls.__qualname__}")
        GUIDES[name] = cls
        GUIDE_HELP[name] = help
        return cls

    return register


def registered_guides() -> dict[str, type]:
    """Every registered guide, after importing each module of this package once (so that a guide defined
    in a new file here registers itself)."""
    global _discovered
    if not _discovered:
        _discovered = True
        for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
            importlib.import_module(f"{__package__}.{module.name}")
    return GUIDES


def _import(path: str):
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"guide import path {path!r} must look like 'module:Class', e.g. 'pyro.infer.autoguide:AutoNormal'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import guide {path!r}: {err}") from None


def resolve_guide(spec: str) -> tuple[type, Optional[type]]:
    """``spec`` (a registered name or ``"module:Class"``) -> ``(guide class, autoguide class or None)``.

    The guide class is the :class:`LoRAGuide` subclass that will be built; for an autoguide import path it
    is the adapter that wraps it (:func:`~blob_pyro.guides.autoguide.adapter_for`), and the second item is
    the autoguide class. Nothing is built.

    :raises ValueError: for an unknown name, a failed import, a class that is not an ``AutoGuide``, or an
        autoguide family that cannot cover the LoRA sites (the message says why).
    """
    from .autoguide import adapter_for  # late: autoguide.py registers guides and imports this module

    guides = registered_guides()
    if ":" not in spec:
        if spec not in guides:
            raise ValueError(
                f"unknown guide {spec!r}; valid names: {sorted(guides)}, or an import path 'module:Class' of a LoRAGuide "
                "subclass or an autoguide, such as 'pyro.infer.autoguide:AutoDiagonalNormal'"
            )
        return guides[spec], None
    cls = _import(spec)
    if isinstance(cls, type) and issubclass(cls, LoRAGuide):
        return cls, None
    if not (isinstance(cls, type) and issubclass(cls, AutoGuide)):
        raise ValueError(f"guide {spec!r} is {cls!r}, not a pyro.infer.autoguide.AutoGuide subclass (nor a blob_pyro LoRAGuide)")
    return adapter_for(cls), cls


def guide_class(spec: str) -> type:
    """The :class:`LoRAGuide` subclass that ``spec`` builds (for its class-level capabilities, e.g. ``random_B``)."""
    return resolve_guide(spec)[0]


def guide_config_fields(spec: str) -> dict[str, str]:
    """``{guide keyword: run-config field}`` of the options that ``spec`` takes from the run config
    (e.g. ``{"eps": "eps"}`` for blob, ``{"init_scale": "init_scale", "rank": "guide_rank"}`` for
    ``pyro.infer.autoguide:AutoLowRankMultivariateNormal``)."""
    cls, autoguide = resolve_guide(spec)
    if autoguide is not None:
        return cls.config_fields_for(autoguide)
    return dict(cls.config_fields)


def make_guide(name: str, model, **options):
    """Build the guide ``name`` (a registered name or an import path ``"module:Class"``) for ``model``;
    unknown names list the valid ones."""
    cls, autoguide = resolve_guide(name)
    if autoguide is not None:
        return cls(model, autoguide, **options)
    return cls(model, **options)
