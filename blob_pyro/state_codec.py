"""Nested training state (optimiser ``state_dict``s, RNG states) as tensors + JSON, with no pickle.

:func:`flatten` turns a nested structure of dicts, lists, tuples, tensors, numpy arrays and JSON scalars
into ``(structure, tensors)``: ``structure`` is JSON-serialisable, every tensor is replaced by a reference
``{"$tensor": key}`` into ``tensors`` (``{key: tensor}``, for a safetensors file). :func:`unflatten`
inverts it exactly: tuples stay tuples, integer dict keys stay integers (``Optimizer.state_dict()`` keys
its per-parameter state by integer), floats round-trip bit for bit (Python's JSON writes ``repr``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["flatten", "unflatten"]

_TAGS = ("$tensor", "$tuple", "$items", "$ndarray")


def flatten(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(structure, tensors)``; tensor keys are ``prefix/<path>``. Raises ``TypeError`` naming the path of
    any value that is neither a tensor, a numpy array, a container nor a JSON scalar."""
    tensors: dict[str, torch.Tensor] = {}
    return _encode(obj, prefix, tensors), tensors


def _encode(obj: Any, path: str, tensors: dict) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path
        while key in tensors:  # e.g. an int key 0 and a str key "0" in one dict
            key += "#"
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: safetensors refuses shared storage
        return {"$tensor": key}
    if isinstance(obj, np.ndarray):
        return {"$ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"$items": [[_encode(k, f"{path}/key", {}), _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    raise TypeError(
        f"cannot store a {type(obj).__name__} at {path!r} in a checkpoint: only tensors, numpy arrays, dicts, lists, "
        "tuples and JSON scalars are stored (no pickle); convert it to one of those"
    )


def unflatten(structure: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`flatten` was given. Raises ``KeyError`` naming a tensor missing from ``tensors``."""
    if isinstance(structure, list):
        return [unflatten(v, tensors) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if "$tensor" in structure:
        key = structure["$tensor"]
        if key not in tensors:
            raise KeyError(f"tensor {key!r} is referenced by the checkpoint's JSON but missing from its tensors")
        return tensors[key]
    if "$tuple" in structure:
        return tuple(unflatten(v, tensors) for v in structure["$tuple"])
    if "$ndarray" in structure:
        return np.asarray(structure["$ndarray"], dtype=structure["dtype"])
    if "$items" in structure:
        return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in structure["$items"]}
    return {k: unflatten(v, tensors) for k, v in structure.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key
