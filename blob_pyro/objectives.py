"""Training objectives: the textbook ELBO through ``pyro.infer.SVI``, and BLoB's "parity" update rule.

``ELBOObjective``
    ``SVI(model, guide, AdamW + schedule + clipping, Trace_ELBO())``. Per step the loss is
    ``(N / b) * NLL_batch_sum + kl_weight_t * KL``: the likelihood scaled by the data plate, the prior
    term counted once and weighted by ``kl_weight_t`` on the A sites of model AND guide. With
    ``kl_schedule="constant"`` and ``kl_weight=1`` this is the plain per-dataset ELBO;
    ``"blob"``/``"blundell"`` use ``kl_weight * M * pi_t``, Blundell et al.'s (2015) minibatch weighting in per-dataset units.
``ParityObjective``
    The official BLoB update (Wang et al. 2024, section 3.3, as its released code implements it): AdamW on the batch-mean NLL for M and B, then plain
    SGD (``kllr``) on ``pi_t * KL`` for all parameters; G is trained by the SGD step only (on its
    NLL + pi_t * KL gradients). The KL is closed form, summed over elements, in float64.

Both expose ``step(batch, step) -> dict`` of scalars for logging: ``loss``, ``nll`` (batch-mean negative
log-likelihood of the labels), ``kl`` (KL(q || p) summed over the Bayesian sites, unweighted) and
``kl_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from blob_pyro.models.bayesian_model import BayesianLoRAModel, guide_locs

from .optim import adamw_with_schedule, spread_parameter_test
from .schedules import kl_reweighting_pi, linear_warmup_decay

__all__ = [
    "ELBOS", "make_elbo", "TermRecordingELBO", "KLWeighting", "ELBOObjective", "ParityObjective", "closed_form_kl",
    "check_parity_priors",
]

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


def make_elbo(name: str = "trace", **options):
    """``"trace"`` -> ``Trace_ELBO`` (Monte Carlo KL), ``"meanfield"`` -> ``TraceMeanField_ELBO`` (closed form)."""
    try:
        return ELBOS[name](**options)
    except KeyError:
        raise ValueError(f"unknown ELBO {name!r}; valid names: {sorted(ELBOS)}") from None


class TermRecordingELBO:
    """Mixin for a Pyro ELBO class: splits each particle's loss into its data and prior terms for logging.

    After a step, ``last_terms`` holds ``nll`` (the mean negative log-likelihood per observed example of
    the minibatch, unscaled by the data plate) and ``weighted_prior_term`` (the loss minus the plate-scaled
    data term: ``kl_weight`` times the one-draw KL estimate for ``Trace_ELBO``, times the closed-form KL for
    ``TraceMeanField_ELBO`` where it exists; for a point-estimate guide ``-log p(A)``). Reading them costs
    no extra pass: they come from the traces the ELBO already built.
    """

    last_terms: dict = {}

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        loss, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        scaled_log_lik, nll_sum, count = 0.0, 0.0, 0
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"] and not site["infer"].get("_deterministic"):
                scaled_log_lik += float(site["log_prob_sum"].detach())
                nll_sum -= float(site["unscaled_log_prob"].detach().sum())
                count += site["unscaled_log_prob"].numel()
        self.last_terms = {"nll": nll_sum / max(count, 1), "weighted_prior_term": float(torch.as_tensor(loss).detach()) + scaled_log_lik}
        return loss, surrogate


def _recording(elbo_name: str):
    base = ELBOS[elbo_name] if elbo_name in ELBOS else make_elbo(elbo_name)  # make_elbo raises on a bad name
    return type(f"TermRecording{base.__name__}", (TermRecordingELBO, base), {})()


@dataclass
class KLWeighting:
    """The weight of the prior/KL term at each step.

    :param schedule: ``"constant"``, ``"blob"`` (official, increasing) or ``"blundell"`` (decreasing).
    :param cycle_length: M, the number of steps in one re-weighting cycle.
    :param multiplier: a constant factor on top (``--kl-weight``); 0 removes the prior term.
    """

    schedule: str
    cycle_length: int
    multiplier: float = 1.0

    def pi(self, step: int) -> float:
        """pi_t of the official code (``1/M`` for ``constant``)."""
        return kl_reweighting_pi(step, self.cycle_length, self.schedule)

    def elbo_weight(self, step: int) -> float:
        """Weight of the KL in per-dataset ELBO units: ``multiplier * M * pi_t`` (1 * multiplier if constant)."""
        return self.multiplier * self.cycle_length * self.pi(step)


def closed_form_kl(model: BayesianLoRAModel, guide, *, dtype=torch.float64) -> torch.Tensor:
    """Sum over adapters of KL(q(A) || p(A)), closed form, element-wise, in ``dtype``.

    Needs a guide with per-site Gaussian marginals (``guide.loc_and_scale(site)``, e.g. BLoBGuide) and
    priors whose KL against a Normal is registered in torch (:func:`check_parity_priors`).
    """
    total = torch.zeros((), dtype=dtype)
    for site, layer in model.adapters.items():
        loc, scale = (t.to(dtype) for t in guide.loc_and_scale(site))
        prior = layer.prior.distribution(loc)
        try:
            kl = kl_divergence(torch.distributions.Normal(loc, scale), prior)
        except NotImplementedError:
            raise ValueError(
                f"no closed-form KL between a Normal guide and {layer.prior!r}: the parity objective "
                "needs one; use --objective elbo (Monte Carlo KL) with this prior"
            ) from None
        total = total.to(kl.device) + kl.sum()
    return total


def check_parity_priors(model: BayesianLoRAModel) -> None:
    """Refuse, before any training, a model with a prior the parity rule cannot use.

    The parity objective supports priors with a closed-form KL against a Normal guide and no learned
    parameters (:func:`blob_pyro.models.priors.parity_support`): ``normal``, ``laplace`` and any
    ``IIDPrior`` of a distribution registered with ``torch.distributions.kl`` against ``Normal``.
    :raises ValueError: naming the prior, the reason and the fix.
    """
    from blob_pyro.models.priors import parity_support

    for site, layer in model.adapters.items():
        reason = parity_support(layer.prior)
        if reason is not None:
            raise ValueError(f"--objective parity cannot use the prior of {site}: {reason}. It needs a closed-form KL "
                             "against a Normal (e.g. --prior normal or laplace); use --objective elbo with this prior")


def _batch_args(batch: dict):
    return batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"]


def _head_inputs(batch: dict) -> dict:
    from blob_pyro.models.bayesian_model import extra_batch_inputs

    return extra_batch_inputs(batch)


class ELBOObjective:
    """Textbook ELBO, stepped by ``pyro.infer.SVI``.

    :param model: the Pyro model. :param guide: a ``LoRAGuide``.
    :param num_data: N, the training-set size (the data plate's size).
    :param kl: a :class:`KLWeighting`. :param elbo: ``"trace"`` or ``"meanfield"``.
    :param flipout: None, ``"token"`` or ``"sequence"`` (guides that provide M only).
    :param scale_lr_factor: the guide's spread parameters learn at ``lr * scale_lr_factor``.
    """

    def __init__(
        self, model, guide, *, num_data: int, total_steps: int, kl: KLWeighting, lr: float,
        weight_decay: float = 0.0, adam_eps: float = 1e-6, warmup_ratio: float = 0.06,
        max_grad_norm: Optional[float] = 1.0, elbo: str = "trace", flipout: Optional[str] = None,
        scale_lr_factor: float = 1.0,
    ):
        if flipout is not None and not guide.provides_flipout_loc:
            raise ValueError(f"flipout needs a guide that provides the mean of A (e.g. 'blob'), not {type(guide).__name__}")
        self.model, self.guide, self.num_data, self.kl, self.flipout = model, guide, num_data, kl, flipout
        self.optim = adamw_with_schedule(
            lr=lr, lr_factor=linear_warmup_decay(total_steps, warmup_ratio), weight_decay=weight_decay,
            eps=adam_eps, max_grad_norm=max_grad_norm, loss_scale=num_data, scale_lr_factor=scale_lr_factor,
            is_spread=spread_parameter_test(guide),
        )
        self.elbo = _recording(elbo)
        self.svi = SVI(model, guide, self.optim, self.elbo)

    def kl_weight(self, step: int) -> float:
        return self.kl.elbo_weight(step) if self.guide.scores_prior else 0.0

    def state_dict(self) -> dict:
        """``{"optim": {param name: {"optimizer": AdamW state, "scheduler": LambdaLR state}}}`` (for resuming)."""
        return {"optim": self.optim.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Hand the saved states to Pyro's optimiser; each is loaded when its parameter is first stepped."""
        self.optim.set_state(state["optim"])

    def step(self, batch: dict, step: int) -> dict:
        weight = self.kl_weight(step)
        loss = self.svi.step(
            *_batch_args(batch), num_data=self.num_data, kl_weight=weight, flipout=self.flipout, **_head_inputs(batch)
        )
        self.optim.step()
        if not math.isfinite(loss):
            raise FloatingPointError(f"the ELBO loss is {loss} at step {step}; lower --lr or check the data")
        terms = self.elbo.last_terms
        # The prior term divided by its weight: the (one-draw or closed-form) KL, comparable across steps
        # whatever the schedule. None where the prior term is switched off (weight 0, e.g. plain LoRA).
        kl = terms["weighted_prior_term"] / weight if weight > 0 else None
        return {"loss": loss, "nll": terms["nll"], "kl": kl, "kl_weight": weight,
                "grad_norm_per_example": self.optim.last_grad_norm}


class ParityObjective:
    """The official BLoB update rule (two optimisers), for a guide with ``loc``/``scale`` (BLoBGuide).

    :param kl: a :class:`KLWeighting` whose ``pi(step)`` multiplies the KL (``multiplier`` too).
    :param kllr: learning rate of the SGD step on ``pi_t * KL`` (0.01 for LLaMA in the paper).
    """

    def __init__(
        self, model, guide, *, total_steps: int, kl: KLWeighting, lr: float, kllr: float = 0.01,
        weight_decay: float = 0.0, adam_eps: float = 1e-6, warmup_ratio: float = 0.06,
        max_grad_norm: Optional[float] = None, flipout: Optional[str] = "token",
    ):
        from blob_pyro.guides import BLoBGuide, MeanFieldGuide

        if not isinstance(guide, BLoBGuide) or isinstance(guide, MeanFieldGuide):
            raise ValueError("the parity objective reproduces BLoB's update and needs the 'blob' guide")
        check_parity_priors(model)
        self.model, self.guide, self.kl, self.flipout = model, guide, kl, flipout
        means = [guide.loc(site) for site in guide.site_names]
        roots = [p for p in guide.std_roots.parameters()]
        bs = [layer.lora_B for layer in model.adapters.values()]
        factor = linear_warmup_decay(total_steps, warmup_ratio)
        self.adamw = torch.optim.AdamW(means + bs, lr=lr, eps=adam_eps, weight_decay=weight_decay)
        self.sgd = torch.optim.SGD(means + roots + bs, lr=kllr)
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in (self.adamw, self.sgd)]
        self.max_grad_norm = max_grad_norm
        #: Data parallelism (blob_pyro.distributed): combines the NLL gradients across processes in place.
        self.gradient_reducer: Optional[Callable[[list], list]] = None

    def state_dict(self) -> dict:
        """Both optimisers' and both schedulers' states (for resuming)."""
        return {"adamw": self.adamw.state_dict(), "sgd": self.sgd.state_dict(),
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        self.sgd.load_state_dict(state["sgd"])
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)

    def negative_log_likelihood(self, batch: dict) -> torch.Tensor:
        """Batch-mean NLL with one draw of every A from the guide (flipout as configured)."""
        input_ids, attention_mask, labels, _ = _batch_args(batch)
        with poutine.trace() as recorded:
            draws = self.guide(kl_weight=1.0)
        locs = guide_locs(recorded.trace)  # M of every drawn A, for flipout
        with poutine.block(), poutine.condition(data=draws):
            logits = self.model.class_logits(input_ids, attention_mask, flipout=self.flipout, flipout_locs=locs,
                                             **_head_inputs(batch))
        return torch.nn.functional.cross_entropy(logits, labels)

    def step(self, batch: dict, step: int) -> dict:
        pi = self.kl.multiplier * self.kl.pi(step)
        with poutine.block():
            nll = self.negative_log_likelihood(batch)
            if not torch.isfinite(nll):
                raise FloatingPointError(
                    f"the NLL is {float(nll)} at step {step}: parameters were left unchanged; lower --lr or check the data"
                )
            nll.backward()
            if self.gradient_reducer is not None:  # G keeps its combined NLL gradient for the SGD step
                self.gradient_reducer(self.sgd.param_groups[0]["params"])
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.adamw.param_groups[0]["params"], self.max_grad_norm)
            self.adamw.step()
            self.adamw.zero_grad(set_to_none=True)  # M, B lose their NLL gradient; G keeps its own
            kl = closed_form_kl(self.model, self.guide)
            (pi * kl).backward()
            self.sgd.step()
            self.sgd.zero_grad(set_to_none=True)
        for scheduler in self.schedulers:
            scheduler.step()
        nll_value, kl_value = float(nll.detach()), float(kl.detach())
        loss = nll_value + pi * kl_value
        if not math.isfinite(loss):
            raise FloatingPointError(f"the parity loss is {loss} at step {step}; lower --lr/--kllr or check the data")
        return {"loss": loss, "nll": nll_value, "kl": kl_value, "kl_weight": pi}
