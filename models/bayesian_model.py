"""The Pyro model: a transformers network with Bayesian LoRA adapters and a categorical likelihood.

    A_l ~ prior                     for every adapted layer l (sites ``<module path>.lora_A``)
    y_i ~ Categorical(logits = head(network_{A, B}(x_i)))    for i in the minibatch, inside
          pyro.plate("data", size=num_data, subsample=indices)

The plate scales the minibatch log-likelihood by ``num_data / batch`` and the prior term is counted
once: the textbook per-dataset ELBO (Wang et al. 2024, section 3.2). A KL weight (``kl_weight``) scales the A sites through
``poutine.scale``; pass the same value to the guide, which must scale its sites too (scaled only in
the model, ``TraceMeanField_ELBO`` ignores the weight: its closed-form KL reads the guide's scale).

Flipout (Wen et al. 2018) perturbs a draw of A around the guide's mean M. A guide hands M to the model
through its sample site: ``pyro.sample(site, q, infer={FLIPOUT_LOC: M})``. Pyro's ``replay`` (what
every ELBO runs the model under) copies the guide site's ``infer`` dict into the model site, and the
model reads it there when it draws A; nothing is set on the layers by the guide.

Each model owns a :class:`~blob_pyro.models.param_scope.ParamScope`: its parameters (and those of its
guides) never mix with another model's in Pyro's global parameter store.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn

from .adapt import find_adapters
from .lora import BayesianLoRALinear
from .param_scope import ParamScope

__all__ = ["BayesianLoRAModel", "kl_weight_handler", "extra_batch_inputs", "BATCH_KEYS", "FLIPOUT_LOC", "guide_locs"]

#: Key of a sample site's ``infer`` dict under which a guide passes the mean of its draw (flipout's M).
FLIPOUT_LOC = "flipout_loc"


def guide_locs(trace) -> dict[str, torch.Tensor]:
    """``{site: M}`` from a guide's trace: the means its sample sites carry in ``infer[FLIPOUT_LOC]``."""
    return {name: node["infer"][FLIPOUT_LOC] for name, node in trace.nodes.items()
            if node["type"] == "sample" and FLIPOUT_LOC in (node.get("infer") or {})}


class _SiteLocs(Messenger):
    """Records ``{site: infer[FLIPOUT_LOC]}`` of the sample sites drawn inside it (after replay filled them in)."""

    def __init__(self):
        super().__init__()
        self.locs: dict[str, torch.Tensor] = {}

    def _pyro_post_sample(self, msg) -> None:
        loc = (msg.get("infer") or {}).get(FLIPOUT_LOC)
        if loc is not None:
            self.locs[msg["name"]] = loc

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
        #: This model's Pyro parameter store (activated whenever the model or one of its guides runs).
        self.param_scope = ParamScope()
        self.param_scope.activate()

    @property
    def adapters(self) -> dict[str, BayesianLoRALinear]:
        """Adapters keyed by Pyro site name of their A factor (``<module path>.lora_A``)."""
        return dict(self._adapters)

    @property
    def bayesian_sites(self) -> list[str]:
        """The A sites of the Bayesian adapters (``bayesianize(..., bayesian_sites=...)``), in model order."""
        return [site for site, layer in self._adapters.items() if layer.prior_scored]

    @property
    def deterministic_sites(self) -> list[str]:
        """The A sites of the deterministic adapters: masked sites (no prior term), point estimates in a guide."""
        return [site for site, layer in self._adapters.items() if not layer.prior_scored]

    @property
    def random_B_sites(self) -> list[str]:
        """The B sites (``<module path>.lora_B``) of the adapters built with ``random_B=True``."""
        return [layer.site_name_B for layer in self._adapters.values() if layer.bayesian_B]

    def latent_sites(self) -> dict[str, dict]:
        """Every latent sample site of the model, ``{name: trace node}`` in model order, found by tracing
        :meth:`draw_lora_factors` (no data needed). A node's ``"fn"`` is the prior, ``"value"`` a prior draw
        and ``"mask"`` False for the sites of deterministic adapters."""
        with poutine.block(hide_types=["param"]):
            trace = poutine.trace(self.draw_lora_factors).get_trace(1.0)
        return {name: node for name, node in trace.nodes.items() if node["type"] == "sample" and not node["is_observed"]}

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def draw_lora_factors(self, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Sample every A once (the model's prior sites), under ``poutine.scale(kl_weight)``.

        Returns ``{site name: (rank, in_features) tensor}``.
        """
        self.param_scope.activate()
        with kl_weight_handler(kl_weight):
            return {site: layer.sample_A() for site, layer in self.adapters.items()}

    def set_lora_draws(
        self, draws: dict[str, torch.Tensor], *, flipout: Optional[str] = None, locs: Optional[dict] = None,
    ) -> None:
        """Hand one draw of every A (and the current B) to the adapters for the next forward pass.

        :param locs: ``{site: M}``, the guide's mean of each drawn A, for flipout (the model reads it from
            the guide's sample sites, see the module docstring). A deterministic adapter (a point estimate:
            no noise to perturb) runs without flipout.

        The draws stay on the adapters after the pass: a checkpointed backward recomputes the forward
        with exactly these tensors (reading the ``PyroSample`` again would re-draw A). The next model
        call replaces them.
        """
        locs = locs or {}
        for site, layer in self.adapters.items():
            mode = flipout if layer.prior_scored else None
            layer.set_transient(active_A=draws[site], active_B=layer.read_B(), flipout=mode,
                                flipout_loc=locs.get(site) if mode is not None else None)

    def class_logits(self, input_ids, attention_mask, *, kl_weight: float = 1.0, flipout: Optional[str] = None,
                     flipout_locs: Optional[dict] = None, **head_inputs):
        """Draw A, run the network, return class logits ``(batch, K)``.

        :param flipout_locs: ``{site: M}`` for flipout, when the draws come from ``poutine.condition``
            (e.g. ``guide_locs(guide trace)``); under ``replay`` (every ELBO) the model reads M from the
            guide's sites itself.
        ``head_inputs``: extra batch tensors the head needs (e.g. ``continuation_mask``).
        """
        recorder = _SiteLocs()
        with recorder:
            draws = self.draw_lora_factors(kl_weight)
        self.set_lora_draws(draws, flipout=flipout, locs={**recorder.locs, **(flipout_locs or {})})
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
        :param flipout: None, ``"token"`` or ``"sequence"``; needs a guide whose A sites carry their mean
            in ``infer[FLIPOUT_LOC]`` (``BLoBGuide``).
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
