"""Schedules: KL re-weighting (BLoB's and Blundell's), dataset rescaling, linear warm-up/decay.

All follow the BLoB paper (Wang et al. 2024, section 3.3 and appendix) as its official code implements
them. Arguments named ``step`` are 0-based optimiser-step indices: ``step = 0`` is the first update.
"""

from __future__ import annotations

import math

__all__ = [
    "KL_SCHEDULES", "kl_reweighting_pi", "kl_cycle_length", "rescaled_cycle_length", "linear_warmup_decay",
]

KL_SCHEDULES = ("constant", "blob", "blundell")


def kl_reweighting_pi(step: int, cycle_length: int, schedule: str) -> float:
    """The KL weight pi_i of training step ``step`` (0-based) in a cycle of ``cycle_length`` (M) steps.

    * ``"blob"`` (official code, increasing): its counter c starts at 1 on the first optimiser step and
      grows by one per step (c = step + 1); i = c mod M with 0 mapped to M, pi_i = 2^i / (2^(M+1) - 1).
      With M = 4 the first steps get 2/31, 4/31, 8/31, 16/31, 2/31, ...: the largest weight (~1/2) falls
      on steps M - 1, 2M - 1, ... (0-based).
    * ``"blundell"`` (Blundell et al. 2015, decreasing): i = (step mod M) + 1, pi_i = 2^(M-i) / (2^M - 1).
    * ``"constant"``: pi_i = 1 / M.

    Over one cycle the weights sum to 1 (``blob`` to 1 - 1/(2^(M+1)-1), as in the code). Computed without
    forming 2^M, so M may be in the thousands.
    """
    M = int(cycle_length)
    if M < 1:
        raise ValueError(f"KL cycle length must be >= 1, got {cycle_length}")
    if schedule == "constant":
        return 1.0 / M
    if schedule == "blob":
        i = (step + 1) % M or M
        # 2^i / (2^(M+1) - 1) = 2^(i-M-1) / (1 - 2^-(M+1))
        return math.pow(2.0, i - M - 1) / (1.0 - math.pow(2.0, -(M + 1)))
    if schedule == "blundell":
        i = step % M + 1
        # 2^(M-i) / (2^M - 1) = 2^-i / (1 - 2^-M)
        return math.pow(2.0, -i) / (1.0 - math.pow(2.0, -M))
    raise ValueError(f"unknown KL schedule {schedule!r}; valid: {list(KL_SCHEDULES)}")


def rescaled_cycle_length(num_data: int, batch_size: int, *, gamma: float = 8.0, processes: int = 1) -> int:
    """BLoB's dataset rescaling: M = int(100 * N^(pi / gamma) / P / b) (``--bayes-datasetrescaling``)."""
    if num_data < 1 or batch_size < 1 or processes < 1 or gamma <= 0:
        raise ValueError(f"need N, b, P >= 1 and gamma > 0; got N={num_data}, b={batch_size}, P={processes}, gamma={gamma}")
    return max(1, int(100 * num_data ** (math.pi / gamma) / processes / batch_size))


def kl_cycle_length(num_data: int, batch_size: int, *, dataset_rescaling: bool, gamma: float = 8.0, processes: int = 1) -> int:
    """M: the rescaled length when ``dataset_rescaling``, else the number of minibatches per epoch."""
    if dataset_rescaling:
        return rescaled_cycle_length(num_data, batch_size, gamma=gamma, processes=processes)
    return max(1, math.ceil(num_data / (batch_size * processes)))


def linear_warmup_decay(total_steps: int, warmup_ratio: float = 0.06):
    """``step -> lr factor``: linear warm-up, then linear decay to 0 at ``total_steps``.

    The official BLoB schedule (transformers' ``get_linear_schedule_with_warmup`` with the unrounded
    w = ``warmup_ratio * total_steps``): factor(s) = s / max(1, w) for s < w, else
    max(0, (T - s) / max(1, T - w)). So with a warm-up the first step (s = 0) runs at learning rate 0.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup = warmup_ratio * total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1.0, warmup)
        return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup))

    return factor
