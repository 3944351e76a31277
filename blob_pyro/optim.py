"""A Pyro optimiser for SVI: AdamW (or any torch optimiser) + an LR schedule + global-norm clipping.

``pyro.optim`` wrappers clip each parameter on its own; LLM fine-tuning clips the global norm over all
trainable parameters. :class:`ClippedScheduledOptim` does that before the per-parameter updates, so
``SVI(model, guide, ClippedScheduledOptim(...), Trace_ELBO())`` trains like a plain torch loop.
``loss_scale`` puts the clipping threshold in per-example units: the per-dataset ELBO is N times a
per-example loss, so its gradient norm is compared with ``max_grad_norm * N``. A non-finite gradient
raises before any parameter changes.

``scale_lr_factor`` gives the guide's spread parameters (``guide.spread_parameters()``, declared by each guide
class; :func:`spread_parameter_test`) their own learning
rate, ``lr * scale_lr_factor``: Adam moves every parameter by at most about its learning rate per step, so
in a short run (150 steps at lr 1e-3 move BLoB's G by at most ~0.075) the posterior std is set by the
step budget, not by the balance of the KL and the data it is meant to learn.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pyro
import torch
from pyro.optim import PyroLRScheduler

__all__ = ["ClippedScheduledOptim", "adamw_with_schedule", "spread_parameter_test"]


def spread_parameter_test(guide) -> Callable[[str], bool]:
    """``name -> bool``: whether the Pyro parameter ``name`` is one of ``guide.spread_parameters()`` (the
    tensors that set its posterior spread, as the guide class declares them). Model parameters (B, the
    hierarchical prior's ``prior.scale``) never are."""

    def is_spread(name: str) -> bool:  # read when the optimiser first meets a parameter: the tensors are final
        tensor = dict(pyro.get_param_store().named_parameters()).get(name)
        return any(tensor is p for p in guide.spread_parameters())

    return is_spread


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
        #: Data parallelism (blob_pyro.distributed): ``params -> params`` combines the gradients across
        #: processes in place and returns the parameters in an order that is the same on every process.
        self.gradient_reducer: Optional[Callable[[list], list]] = None
        super().__init__(scheduler_constructor, optim_args)

    def __call__(self, params, *args, **kwargs) -> None:
        # SVI passes a set (ordered by tensor id, which differs between processes); the global norm sums
        # in list order, so sort by parameter name for results that repeat bitwise across processes.
        store = pyro.get_param_store()
        params = sorted((p for p in params if p.grad is not None), key=store.param_name)
        if self.gradient_reducer is not None:
            params = self.gradient_reducer(params)
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
    max_grad_norm: Optional[float] = 1.0, loss_scale: float = 1.0, scale_lr_factor: float = 1.0,
    is_spread: Callable[[str], bool] = lambda name: False,
) -> ClippedScheduledOptim:
    """AdamW(lr, eps, weight_decay) with ``LambdaLR(lr_factor)`` and global-norm clipping; the parameters for
    which ``is_spread(name)`` holds (e.g. :func:`spread_parameter_test` of the guide) get ``lr * scale_lr_factor``."""
    if not (math.isfinite(scale_lr_factor) and scale_lr_factor > 0):
        raise ValueError(f"scale_lr_factor must be a finite positive number, got {scale_lr_factor!r}")

    def optim_args(param_name: str) -> dict:
        factor = scale_lr_factor if scale_lr_factor != 1.0 and is_spread(param_name) else 1.0
        return {"lr": lr * factor, "eps": eps, "weight_decay": weight_decay}

    return ClippedScheduledOptim(
        torch.optim.lr_scheduler.LambdaLR,
        {"optimizer": torch.optim.AdamW, "optim_args": optim_args, "lr_lambda": lr_factor},
        max_grad_norm=max_grad_norm, loss_scale=loss_scale,
    )
