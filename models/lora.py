"""The Bayesian LoRA layer: a frozen ``nn.Linear`` plus a low-rank update with a random factor A.

    y = W0 x + b0 + (alpha / r) * B (A dropout(x))

* ``A`` (``rank x in_features``) is a Pyro sample site (``PyroSample(prior)``) named by the layer's
  full module path, e.g. ``model.layers.0.self_attn.q_proj.lora_A``.
* ``B`` (``out_features x rank``) is a deterministic ``nn.Parameter`` initialised to zero, so the
  adapted model starts exactly at the base model (Hu et al. 2022, section 4.1).

Sampling A happens once per model call, at the top of the Pyro model (see
:class:`blob_pyro.models.BayesianLoRAModel`), and the draw is handed to ``forward``. Reading the
``PyroSample`` inside ``forward`` instead would re-draw A when gradient checkpointing recomputes the
forward pass, silently giving wrong gradients (reentrant checkpointing; the non-reentrant one raises).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import pyro
from pyro import poutine

import torch
from pyro.nn import PyroModule, PyroSample
from torch import nn

from .flipout_signs import flipout_signs
from .priors import Prior, as_prior

__all__ = ["BayesianLoRALinear", "lora_init_A"]


def lora_init_A(rank: int, in_features: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The standard LoRA initialisation of A: kaiming-uniform with ``a = sqrt(5)``.

    Returns a fresh ``(rank, in_features)`` tensor drawn from U(-1/sqrt(in), 1/sqrt(in)), exactly what
    ``nn.init.kaiming_uniform_(A, a=math.sqrt(5))`` draws for that shape.
    """
    weight = torch.empty(rank, in_features, dtype=dtype, device=device)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class BayesianLoRALinear(PyroModule):
    """A LoRA adapter around a frozen linear layer, with ``lora_A`` a ``PyroSample`` site.

    :param base_layer: the pretrained ``nn.Linear``; wrapped, frozen, never copied or modified.
    :param name: the full module path of ``base_layer`` in its model; the Pyro name of this layer, so
        the sample site is ``f"{name}.lora_A"``.
    :param rank: LoRA rank r.
    :param alpha: LoRA alpha; the update is scaled by ``alpha / rank``.
    :param prior: a :class:`~blob_pyro.models.priors.Prior` over A.
    :param dropout: LoRA dropout probability on the adapter input (0 disables it).
    :param adapter_dtype: dtype of B and of the adapter computation (fp32 by default, also on a
        bf16/fp16 base: inputs and outputs are cast at the boundary).
    :param bayesian: False makes a deterministic layer in a partly Bayesian model: its sites are masked
        (no prior term), a guide gives them point estimates.
    :param random_B: True makes B a sample site ``<module path>.lora_B`` with the layer's prior, drawn with
        A (the mean-field "BBB" family; the ``lora_B`` parameter is then unused). Only for a Bayesian layer.

    Both are fixed when the layer is built (a guide reads them, never sets them).

    Shapes: input ``(..., in_features)``, output ``(..., out_features)``; A ``(rank, in_features)``,
    B ``(out_features, rank)``.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        name: str,
        rank: int,
        alpha: float,
        prior: Prior,
        dropout: float = 0.0,
        adapter_dtype: torch.dtype = torch.float32,
        bayesian: bool = True,
        random_B: bool = False,
    ):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to adapt, got {type(base_layer).__name__}")
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"{name}: LoRA rank must be a positive integer, got {rank!r}")
        if not (alpha > 0):
            raise ValueError(f"{name}: LoRA alpha must be positive, got {alpha!r}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"{name}: LoRA dropout must be in [0, 1), got {dropout!r}")
        if random_B and not bayesian:
            raise ValueError(f"{name}: random_B=True needs a Bayesian layer (bayesian=True); a deterministic layer has no prior")
        super().__init__(name)
        base_layer.requires_grad_(False)
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=adapter_dtype, device=device))
        self.prior = as_prior(prior)
        self.lora_A = PyroSample(lambda layer: layer.prior.site_distribution(layer._zeros_like_A()))
        # Transient state, set by each model call (BayesianLoRAModel.set_lora_draws); stored outside
        # nn.Module's registries so that a tensor that happens to be a guide's nn.Parameter (the flipout
        # mean M) is never registered as a parameter of this layer.
        self.set_transient(active_A=None, active_B=None, flipout=None, flipout_loc=None)
        # Fixed at construction: whether B is a sample site, whether the layer is Bayesian at all.
        self.bayesian_B = bool(random_B)
        self.prior_scored = bool(bayesian)
        object.__setattr__(self, "_B_draw", None)

    def set_transient(self, **values) -> None:
        """Set per-call state: ``active_A``/``active_B`` (the factors of this call), ``flipout`` (mode),
        ``flipout_loc`` (M)."""
        for key, value in values.items():
            if key not in ("active_A", "active_B", "flipout", "flipout_loc"):
                raise AttributeError(f"unknown transient adapter state {key!r}")
            object.__setattr__(self, key, value)

    @property
    def site_name(self) -> str:
        """The Pyro sample-site name of A, e.g. ``model.layers.0.self_attn.q_proj.lora_A``."""
        return f"{self._pyro_name}.lora_A"

    def _zeros_like_A(self) -> torch.Tensor:
        B = self._parameters["lora_B"]
        return torch.zeros(self.rank, self.in_features, dtype=B.dtype, device=B.device)

    def sample_A(self) -> torch.Tensor:
        """Draw A from its site (prior, or whatever a guide/replay/condition handler supplies).

        Returns a ``(rank, in_features)`` tensor; this is the one ``pyro.sample`` statement of the layer.
        """
        with self._pyro_context, (nullcontext() if self.prior_scored else poutine.mask(mask=False)):
            A = self.lora_A
            if self.bayesian_B:  # the mean-field ("BBB") family: B is a sample site too, drawn with A
                B = pyro.sample(self.site_name_B, self.prior.site_distribution(self._zeros_like_B()))
                object.__setattr__(self, "_B_draw", B)
            return A

    @property
    def site_name_B(self) -> str:
        """The sample-site name of B when ``bayesian_B``, e.g. ``model.layers.0.self_attn.q_proj.lora_B``."""
        return f"{self._pyro_name}.lora_B"

    def _zeros_like_B(self) -> torch.Tensor:
        return torch.zeros_like(self._parameters["lora_B"])

    def read_B(self) -> torch.Tensor:
        """B as the Pyro ``param`` site the optimiser trains: ``(out_features, rank)``.

        Read once at the top of the model, like A, so that a checkpointed forward recomputes the
        same graph (inside a Pyro context the parameter passes through ``pyro.param``).
        """
        if self.bayesian_B and self._B_draw is not None:  # drawn with A in sample_A
            return self._B_draw
        with self._pyro_context:
            return self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The base layer is read from _modules directly: PyroModule.__getattr__ would otherwise
        # register its frozen weights as trainable pyro.params (the base model would then train).
        base_layer = self._modules["base_layer"]
        result = base_layer(x)
        A = self.active_A if self.active_A is not None else self.lora_A
        B = self.active_B if self.active_B is not None else self.lora_B
        h = self._modules["lora_dropout"](x.to(B.dtype))
        if A.dim() == 3:  # S draws stacked along the batch axis (evaluation only)
            return result + self._stacked_draws_update(h, A, B).to(result.dtype)
        if self.flipout is None:
            low = h @ A.transpose(-1, -2)
        else:
            low = self._flipout_low_rank(h, A)
        update = (low @ B.transpose(-1, -2)) * self.scaling
        return result + update.to(result.dtype)

    def _stacked_draws_update(self, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The LoRA update for S posterior draws in one pass: rows ``[s * b, (s + 1) * b)`` of the input
        use draw s (the layout of :func:`blob_pyro.evaluation.predictive.sample_probs` with
        ``draws_per_pass > 1``).

        Shapes: ``h (S * b, ..., in)``, A ``(S, rank, in)``, B ``(out, rank)`` or ``(S, out, rank)``
        (a random B, the mean-field family) -> ``(S * b, ..., out)``.
        """
        S = A.shape[0]
        if self.flipout is not None:
            raise ValueError(f"{self.site_name}: stacked posterior draws are for prediction; flipout is a training option")
        if h.shape[0] % S:
            raise ValueError(
                f"{self.site_name}: {S} stacked draws of A need an input whose batch axis is a multiple of {S} "
                f"(the batch repeated once per draw), got {h.shape[0]} rows"
            )
        grouped = h.reshape(S, -1, h.shape[-1])                                  # (S, b * ..., in)
        low = grouped @ A.transpose(-1, -2)                                       # (S, b * ..., rank)
        update = (low @ B.transpose(-1, -2)) * self.scaling                      # (S, b * ..., out)
        return update.reshape(*h.shape[:-1], update.shape[-1])

    def _flipout_low_rank(self, h: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Flipout (Wen et al. 2018) on the A factor, as the BLoB authors' released code applies it (Wang et al. 2024).

        ``A - M`` is the noise of the draw (M the guide mean); each token (``"token"``) or each
        sequence (``"sequence"``) sees it with fresh random signs on input and output: marginally the
        perturbed factor is still distributed as q(A) for a symmetric mean-field q.
        Shapes: ``h (..., seq, in)`` -> ``(..., seq, rank)``.
        """
        if self.flipout_loc is None:
            raise RuntimeError(
                f"{self.site_name}: flipout needs the guide mean of A; use a guide that provides it "
                "(BLoBGuide) or train without --flipout"
            )
        loc = self.flipout_loc
        noise = A - loc
        if self.flipout == "token":
            sign_shape_in, sign_shape_out = h.shape, h.shape[:-1] + (self.rank,)
        elif self.flipout == "sequence":
            lead = h.shape[:1] + (1,) * (h.dim() - 2)
            sign_shape_in, sign_shape_out = lead + h.shape[-1:], lead + (self.rank,)
        else:
            raise ValueError(f"flipout must be None, 'token' or 'sequence', got {self.flipout!r}")
        sign_in, sign_out = flipout_signs(sign_shape_in, h), flipout_signs(sign_shape_out, h)
        mean = h @ loc.transpose(-1, -2)
        perturbation = ((h * sign_in) @ noise.transpose(-1, -2)) * sign_out
        return mean + perturbation

    def extra_repr(self) -> str:
        return (
            f"name={self._pyro_name!r}, in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scaling={self.scaling:g}, prior={self.prior}"
        )
