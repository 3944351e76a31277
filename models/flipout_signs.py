"""Random flipout signs, optionally drawn for a whole global batch and sliced to this process's rows.

Flipout (Wen et al. 2018; BLoB section 3.3) multiplies the noise of A by fresh +-1 signs per token or per
sequence. Under data parallelism (``blob_pyro.distributed``) each process holds a contiguous shard
``[start, stop)`` of the ``total`` examples of a global batch; inside :func:`global_batch_rows` every
process draws the signs of the *global* batch from the same random state and keeps its own rows, so
the signs equal those a single process would draw for the whole batch (and every process advances its
random state by the same amount). Outside it, signs are drawn for the tensor's own shape.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

__all__ = ["flipout_signs", "global_batch_rows"]

_ROWS: contextvars.ContextVar[Optional[tuple[int, int, int]]] = contextvars.ContextVar("flipout_global_rows", default=None)


@contextlib.contextmanager
def global_batch_rows(start: int, stop: int, total: int) -> Iterator[None]:
    """Within this context, sign tensors whose leading dimension holds examples ``[start, stop)`` (or a
    fixed number of rows per example, e.g. one row per choice) are sliced from a draw for ``total``."""
    if not 0 <= start < stop <= total:
        raise ValueError(f"need 0 <= start < stop <= total for a shard of a global batch, got {start}, {stop}, {total}")
    token = _ROWS.set((start, stop, total))
    try:
        yield
    finally:
        _ROWS.reset(token)


def flipout_signs(shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """A ``shape`` tensor of independent +-1 (probability 1/2 each), dtype and device of ``like``.

    ``shape[0]`` indexes rows of the batch (example-major when an example has several rows).
    """
    rows = _ROWS.get()
    if rows is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device).bernoulli_(0.5).mul_(2).sub_(1)
    start, stop, total = rows
    local = stop - start
    if shape[0] % local:
        raise ValueError(
            f"flipout signs for {shape[0]} rows cannot be mapped onto a shard of {local} examples: "
            "the leading dimension must hold a whole number of rows per example"
        )
    per_example = shape[0] // local
    full = torch.empty((total * per_example,) + tuple(shape[1:]), dtype=like.dtype, device=like.device)
    full.bernoulli_(0.5).mul_(2).sub_(1)
    return full[start * per_example : stop * per_example]
