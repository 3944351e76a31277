"""A Pyro optimiser for SVI: AdamW (or any torch optimiser) + an LR schedule + global-norm clipping.

``pyro.optim`` wrappers clip each parameter on its own; LLM fine-tuning clips the global norm over all
trainable parameters. :class:`ClippedScheduledOptim` does that before the per-parameter updates, so
``SVI(model, guide, ClippedScheduledOptim(...), Trace_ELBO())`` trains like a plain torch loop.
``loss_scale`` puts the clipping threshold in per-example units: the per-dataset ELBO is N times a
per-example loss, so its gradient norm is compared with ``max_grad_norm * N``. A non-finite gradient
raises before any parameter changes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from pyro.optim import PyroLRScheduler

__all__ = ["ClippedScheduledOptim", "adamw_with_schedule"]


class ClippedScheduledOptim(PyroLRScheduler):
    """``PyroLRScheduler`` with optional global gradient-norm clipping.

    Call ``step()`` once per SVI step to advance the learning-rate schedules.
    """

    def __init__(
        self, scheduler_constructor, optim_args: dict, *, max_grad_norm: Optional[float] = None, loss_scale: float = 1.0,
    ):
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.loss_scale = float(loss_scale)
        self.last_grad_norm: Optional[float] = None
        super().__init__(scheduler_constructor, optim_args)

    def __call__(self, params, *args, **kwargs) -> None:
        params = [p for p in params if p.grad is not None]
        if params:
            limit = float("inf") if self.max_grad_norm is None else self.max_grad_norm * self.loss_scale
            norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            if not math.isfinite(norm):
                raise FloatingPointError(
                    f"gradient norm is {norm}: parameters were left unchanged; lower --lr, enable "
                    "--max-grad-norm, or check the data for NaN/inf"
                )
            self.last_grad_norm = norm / self.loss_scale
        super().__call__(params, *args, **kwargs)


def adamw_with_schedule(
    *, lr: float, lr_factor: Callable[[int], float], weight_decay: float = 0.0, eps: float = 1e-6,
    max_grad_norm: Optional[float] = 1.0, loss_scale: float = 1.0,
) -> ClippedScheduledOptim:
    """AdamW(lr, eps, weight_decay) with ``LambdaLR(lr_factor)`` and global-norm clipping."""
    return ClippedScheduledOptim(
        torch.optim.lr_scheduler.LambdaLR,
        {"optimizer": torch.optim.AdamW, "optim_args": {"lr": lr, "eps": eps, "weight_decay": weight_decay},
         "lr_lambda": lr_factor},
        max_grad_norm=max_grad_norm, loss_scale=loss_scale,
    )
