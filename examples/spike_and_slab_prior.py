"""A custom prior in one file: a continuous spike-and-slab over every element of a LoRA factor.

    p(a) = (1 - w) N(a; 0, spike^2) + w N(a; 0, slab^2)          (George & McCulloch 1993)

Most elements sit near 0 (the spike), a fraction w may be large (the slab): a sparsity-inducing prior with
no closed-form KL against a Gaussian guide, so train it with ``--objective elbo`` (the default; the ELBO
estimates the KL by Monte Carlo). From the command line, nothing else to edit::

    python -m blob_pyro.train --prior examples.spike_and_slab_prior:make_prior \\
        --prior-kwargs '{"spike": 0.01, "slab": 0.2, "slab_weight": 0.3}' ...
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

from blob_pyro.models import Prior

__all__ = ["SpikeAndSlabPrior", "make_prior"]


class SpikeAndSlabPrior(Prior):
    """:param spike: std of the narrow component. :param slab: std of the wide one.
    :param slab_weight: w, the prior probability of the slab, in (0, 1)."""

    def __init__(self, spike: float = 0.01, slab: float = 0.2, slab_weight: float = 0.5):
        for name, value in (("spike", spike), ("slab", slab)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SpikeAndSlabPrior {name} must be a finite positive std, got {value!r}")
        if not 0 < slab_weight < 1:
            raise ValueError(f"SpikeAndSlabPrior slab_weight must be in (0, 1), got {slab_weight!r}")
        if not spike < slab:
            raise ValueError(f"SpikeAndSlabPrior needs spike < slab, got spike={spike!r}, slab={slab!r}")
        self.spike, self.slab, self.slab_weight = float(spike), float(slab), float(slab_weight)

    def distribution(self, like: torch.Tensor) -> dist.TorchDistribution:
        """Element-wise mixture with the shape, dtype and device of ``like`` ``(rows, cols)``."""
        zeros = torch.zeros(like.shape + (2,), dtype=like.dtype, device=like.device)
        weights = zeros + torch.tensor([1 - self.slab_weight, self.slab_weight], dtype=like.dtype, device=like.device)
        scales = zeros + torch.tensor([self.spike, self.slab], dtype=like.dtype, device=like.device)
        return dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(zeros, scales))

    def __repr__(self) -> str:
        return f"SpikeAndSlabPrior(spike={self.spike:g}, slab={self.slab:g}, slab_weight={self.slab_weight:g})"


def make_prior(spike: float = 0.01, slab: float = 0.2, slab_weight: float = 0.5) -> SpikeAndSlabPrior:
    """The ``--prior`` entry point: ``--prior-kwargs`` are its keyword arguments."""
    return SpikeAndSlabPrior(spike=spike, slab=slab, slab_weight=slab_weight)
