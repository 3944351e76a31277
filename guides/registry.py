"""Guide registry: ``make_guide(name, model, **options)``. Adding a guide = one file + one line here.

Besides the registered names, ``name`` may be the import path of any ``pyro.infer.autoguide`` class,
``"module:Class"`` (e.g. ``"pyro.infer.autoguide:AutoDiagonalNormal"``): it is wrapped by
:class:`~blob_pyro.guides.autoguide.AutoGuideAdapter` over the LoRA-A sites. Every guide takes
``sites=<regex>`` to cover only some layers (the rest deterministic).
"""

from __future__ import annotations

from typing import Callable

from .autoguide import AutoGuideAdapter
from .blob import BLoBGuide
from .lowrank import LowRankGuide
from .map import MAPGuide
from .meanfield import MeanFieldGuide
from .mle import MLEGuide
from .normal import NormalGuide

__all__ = ["GUIDES", "make_guide"]

GUIDES: dict[str, Callable] = {
    "blob": BLoBGuide,          # Bayesian A (mean-field, std G^2), deterministic B
    "mle": MLEGuide,            # plain LoRA, no prior
    "map": MAPGuide,            # point estimate with the prior (AutoDelta-style)
    "meanfield": MeanFieldGuide,  # Bayesian A and B ("BBB")
    "normal": NormalGuide,      # AutoNormal over A
    "lowrank": LowRankGuide,    # AutoLowRankMultivariateNormal over A
}


def make_guide(name: str, model, **options):
    """Build the guide registered as ``name`` (or the autoguide at import path ``"module:Class"``) for
    ``model``; unknown names list the valid ones."""
    if ":" in name:
        return AutoGuideAdapter(model, name, **options)
    try:
        factory = GUIDES[name]
    except KeyError:
        raise ValueError(
            f"unknown guide {name!r}; valid names: {sorted(GUIDES)}, or an autoguide import path "
            "'module:Class' such as 'pyro.infer.autoguide:AutoDiagonalNormal'"
        ) from None
    return factory(model, **options)
