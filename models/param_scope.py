"""One Pyro parameter store per model: two models (and their guides) in one process train independently.

Pyro keeps ``pyro.param`` values, and the ``PyroParam``/``nn.Parameter`` of a ``PyroModule`` once it has
run, in one global store keyed by name. Two models built from the same network share every name
(``lm_head.lora_B``, ``locs.lm_head.lora_A``, ...), so the second model's modules would adopt the first
model's trained tensors the first time they run, and its own parameters would never be stepped.

A :class:`ParamScope` gives each :class:`~blob_pyro.models.BayesianLoRAModel` a store of its own. The
model (and every guide of it) calls :meth:`ParamScope.activate` when it runs; activating puts the scope's
name tables into Pyro's global store, after saving the tables of the scope that was active before. With
a single model nothing changes: the global store holds exactly that model's parameters, so
``pyro.get_param_store()``, Pyro's optimisers (which look parameters up by name) and checkpoints behave
as before. ``pyro.clear_param_store()`` clears the active scope.

Switching costs three dictionary assignments; nothing is copied.
"""

from __future__ import annotations

from typing import Optional

import pyro

__all__ = ["ParamScope", "active_scope"]

_ACTIVE: Optional["ParamScope"] = None


def active_scope() -> Optional["ParamScope"]:
    """The scope whose parameters the global Pyro store holds now (None before any model ran)."""
    return _ACTIVE


class ParamScope:
    """A private set of Pyro parameter-store tables, swapped into the global store by :meth:`activate`."""

    def __init__(self):
        self._tables: tuple = ({}, {}, {})  # params, param_to_name, constraints (pyro.params.ParamStoreDict's)

    @property
    def active(self) -> bool:
        return _ACTIVE is self

    def activate(self) -> None:
        """Make this scope the one the global store shows (a no-op when it already is)."""
        global _ACTIVE
        if _ACTIVE is self:
            return
        store = pyro.get_param_store()
        if _ACTIVE is not None:  # read the tables back: pyro.clear_param_store() replaces them
            _ACTIVE._tables = (store._params, store._param_to_name, store._constraints)
        store._params, store._param_to_name, store._constraints = self._tables
        _ACTIVE = self

    def names(self) -> list[str]:
        """Names of the parameters in this scope."""
        tables = (pyro.get_param_store()._params,) if self.active else self._tables
        return sorted(tables[0])
