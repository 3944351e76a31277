"""Guide registry: ``make_guide(name, model, **options)``. Adding a guide = one file + one line here."""

from __future__ import annotations

from typing import Callable

from .blob import BLoBGuide
from .mle import MLEGuide

__all__ = ["GUIDES", "make_guide"]

GUIDES: dict[str, Callable] = {
    "blob": BLoBGuide,
    "mle": MLEGuide,
}


def make_guide(name: str, model, **options):
    """Build the guide registered as ``name`` for ``model``; unknown names list the valid ones."""
    try:
        factory = GUIDES[name]
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; valid names: {sorted(GUIDES)}") from None
    return factory(model, **options)
