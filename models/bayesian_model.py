"""The Pyro model: a transformers network with Bayesian LoRA adapters and a categorical likelihood.

    A_l ~ prior                     for every adapted layer l (sites ``<module path>.lora_A``)
    y_i ~ Categorical(logits = head(network_{A, B}(x_i)))    for i in the minibatch, inside
          pyro.plate("data", size=num_data, subsample=indices)

The plate scales the minibatch log-likelihood by ``num_data / batch`` and the prior term is counted
once: the textbook per-dataset ELBO. A KL weight (``kl_weight``) scales the A sites through
``poutine.scale``; pass the same value to the guide, which must scale its sites too
(PYRO_NOTES.md: scaled only in the model, ``TraceMeanField_ELBO`` ignores it).
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .adapt import find_adapters
from .lora import BayesianLoRALinear

__all__ = ["BayesianLoRAModel", "kl_weight_handler", "extra_batch_inputs", "BATCH_KEYS"]

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "indices")


def extra_batch_inputs(batch: dict) -> dict:
    """The entries of a batch dict beyond ``BATCH_KEYS``: passed to the head as keyword arguments."""
    return {key: value for key, value in batch.items() if key not in BATCH_KEYS}


def kl_weight_handler(kl_weight: float):
    """The handler that weights the A sites: ``poutine.scale(w)``, or ``poutine.mask(False)`` for w = 0.

    Use the same weight in model and guide. ``poutine.scale`` refuses 0; masking drops the log-density
    terms while the sampled values (e.g. a Delta's parameter) still carry gradients.
    """
    if kl_weight < 0 or kl_weight != kl_weight:
        raise ValueError(f"the KL weight must be a non-negative number, got {kl_weight}")
    if kl_weight == 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=kl_weight)


class BayesianLoRAModel(nn.Module):
    """``network`` (already passed through :func:`bayesianize`) + a likelihood ``head``.

    Call it as a Pyro model: ``model(input_ids, attention_mask, labels, indices, num_data=N)``.

    :param network: a transformers model whose target layers are :class:`BayesianLoRALinear`.
    :param head: maps ``(network, input_ids, attention_mask)`` to class logits ``(batch, K)``.
    """

    def __init__(self, network: nn.Module, head: nn.Module):
        super().__init__()
        self.network = network
        self.head = head
        # A plain dict (not a ModuleDict): the adapters are already registered inside `network`.
        self._adapters = {layer.site_name: layer for layer in find_adapters(network).values()}
        if not self._adapters:
            raise ValueError("network has no Bayesian LoRA adapters: call bayesianize(network, ...) first")

    @property
    def adapters(self) -> dict[str, BayesianLoRALinear]:
        """Adapters keyed by Pyro site name of their A factor (``<module path>.lora_A``)."""
        return dict(self._adapters)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def draw_lora_factors(self, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Sample every A once (the model's prior sites), under ``poutine.scale(kl_weight)``.

        Returns ``{site name: (rank, in_features) tensor}``.
        """
        with kl_weight_handler(kl_weight):
            return {site: layer.sample_A() for site, layer in self.adapters.items()}

    def set_lora_draws(self, draws: dict[str, torch.Tensor], *, flipout: Optional[str] = None) -> None:
        """Hand one draw of every A (and the current B) to the adapters for the next forward pass.

        The draws stay on the adapters after the pass: a checkpointed backward recomputes the forward
        with exactly these tensors (reading the ``PyroSample`` again would re-draw A; PYRO_NOTES.md).
        The next model call replaces them.
        """
        for site, layer in self.adapters.items():
            layer.set_transient(active_A=draws[site], active_B=layer.read_B(), flipout=flipout)
            if flipout is None:
                layer.set_transient(flipout_loc=None)

    def class_logits(self, input_ids, attention_mask, *, kl_weight: float = 1.0, flipout: Optional[str] = None, **head_inputs):
        """Draw A, run the network, return class logits ``(batch, K)``.

        ``head_inputs``: extra batch tensors the head needs (e.g. ``continuation_mask``).
        """
        self.set_lora_draws(self.draw_lora_factors(kl_weight), flipout=flipout)
        return self.head(self.network, input_ids, attention_mask, **head_inputs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        indices: Optional[torch.Tensor] = None,
        *,
        num_data: Optional[int] = None,
        kl_weight: float = 1.0,
        flipout: Optional[str] = None,
        **head_inputs,
    ) -> torch.Tensor:
        """The Pyro model.

        :param input_ids: ``(batch, seq)`` token ids; ``attention_mask`` the same shape.
        :param labels: ``(batch,)`` class indices, or None to sample them (prediction).
        :param indices: ``(batch,)`` positions of the rows in the training set (the plate's subsample).
        :param num_data: size of the training set N; the likelihood is scaled by N / batch.
        :param kl_weight: weight of the prior (KL) term on the A sites; give the guide the same value.
        :param flipout: None, ``"token"`` or ``"sequence"``; needs a guide that sets the adapters'
            ``flipout_loc`` (``BLoBGuide``).
        :param head_inputs: extra batch tensors for the head (e.g. ``continuation_mask``).
        :returns: class logits ``(batch, K)``; also recorded as the deterministic site ``"probs"``.
        """
        logits = self.class_logits(input_ids, attention_mask, kl_weight=kl_weight, flipout=flipout, **head_inputs)
        batch = logits.shape[0]
        pyro.deterministic("probs", torch.softmax(logits, dim=-1), event_dim=2)
        size = batch if num_data is None else int(num_data)
        subsample = indices if indices is not None else torch.arange(batch, device=logits.device)
        if labels is not None and labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {tuple(labels.shape)}")
        with pyro.plate("data", size=size, subsample=subsample):
            pyro.sample("obs", dist.Categorical(logits=logits), obs=labels)
        return logits
