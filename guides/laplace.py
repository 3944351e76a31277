"""``pyro.infer.autoguide:AutoLaplaceApproximation`` over the LoRA sites, with the likelihood in its Hessian.

    train:   A* = argmax_A  log p(y | A) + log p(A)          (the autoguide's Delta at ``loc``, by SVI)
    post_fit: H = -d^2/dA^2 [log p(y | A) + log p(A)] at A*,   q(A) = N(A*, H^-1)

The Laplace approximation (MacKay 1992; Daxberger et al. 2021, section 2) needs the curvature of the log
joint, data included. Pyro's ``AutoLaplaceApproximation.laplace_approximation(*args)`` takes it from the
model it was built on, which here is the prior-only view of :class:`AutoGuideAdapter` (its Hessian would
be the prior's precision: std = the prior scale everywhere). :meth:`LaplaceAdapter.post_fit` instead runs
the real model (network and categorical likelihood) once over the training set, conditioned on the
unpacked latent vector, and sums the per-batch Hessians: ``H = sum_b H_b`` with batch b scoring its
examples once and ``1 / (number of batches)`` of the prior, so the sum is exactly ``-log p(y, A)`` of the
whole training set. The covariance's Cholesky factor is kept as a buffer (saved with the guide); after the
fit the guide draws ``A ~ N(A*, H^-1)``. Before it, it is the MAP point (every draw the same).

The Hessian is dense: ``D x D`` for D latent elements, built from D Hessian-vector products per batch.
Guides with D above ``max_latent_dim`` (default 8192) are refused at construction (restrict the Bayesian
layers with ``bayesianize(..., bayesian_sites=...)``, CLI ``--bayesian-sites``, or use the diagonal /
Kronecker-factored Laplace baseline, ``--method laplace``).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoLaplaceApproximation
from torch.distributions import biject_to

from blob_pyro.models.bayesian_model import extra_batch_inputs, kl_weight_handler

from .autoguide import AutoGuideAdapter
from .base import init_to_lora

__all__ = ["LaplaceAdapter"]


class LaplaceAdapter(AutoGuideAdapter):
    """:param max_latent_dim: refuse models with more latent elements than this (the Hessian is D x D).

    Other parameters as :class:`AutoGuideAdapter`.
    """

    autoguide_family = AutoLaplaceApproximation
    spread_parameter_names = frozenset()  # SVI fits the MAP point only; the spread comes from post_fit

    def __init__(self, model, autoguide_class=AutoLaplaceApproximation, *, sites=None, init_loc_fn=init_to_lora,
                 max_latent_dim: int = 8192, **options):
        super().__init__(model, autoguide_class, sites=sites, init_loc_fn=init_loc_fn, **options)
        dim = int(self.inner.latent_dim)
        if dim > max_latent_dim:
            raise ValueError(
                f"{autoguide_class.__name__} needs the dense {dim:,} x {dim:,} Hessian of the log joint over the model's "
                f"{dim:,} latent LoRA elements ({dim * dim * 8 / 2**30:.1f} GiB in float64 and {dim:,} Hessian-vector "
                f"products per batch), above max_latent_dim={max_latent_dim:,}: make fewer layers Bayesian (--bayesian-sites, "
                "e.g. lm_head), or use --method laplace (diagonal or Kronecker-factored Laplace); --guide-kwargs "
                "'{\"max_latent_dim\": N}' raises the limit"
            )
        loc = self.inner.loc
        self.register_buffer("laplace_scale_tril", torch.zeros(dim, dim, dtype=loc.dtype, device=loc.device))
        self.register_buffer("laplace_fitted", torch.zeros((), dtype=loc.dtype, device=loc.device))

    @property
    def fitted(self) -> bool:
        """Whether :meth:`post_fit` has set the covariance (before: the MAP point)."""
        return bool(self.laplace_fitted)

    def forward(self, *args, kl_weight: float = 1.0, **kwargs):
        if not self.fitted:
            return super().forward(*args, kl_weight=kl_weight, **kwargs)
        draws = self.sample_fixed_sites()
        with kl_weight_handler(kl_weight):
            posterior = dist.MultivariateNormal(self.inner.loc, scale_tril=self.laplace_scale_tril)
            latent = pyro.sample(f"_{self.inner._pyro_name}_latent", posterior, infer={"is_auxiliary": True})
            for site, unconstrained in self.inner._unpack_latent(latent):
                value, log_density = self._constrain(site, unconstrained)
                draws[site["name"]] = pyro.sample(
                    site["name"], dist.Delta(value, log_density=log_density, event_dim=site["fn"].event_dim))
        return draws

    @staticmethod
    def _constrain(site, unconstrained):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        log_density = transform.inv.log_abs_det_jacobian(value, unconstrained)
        return value, sum_rightmost(log_density, log_density.dim() - value.dim() + site["fn"].event_dim)

    def _negative_log_joint(self, latent: torch.Tensor, batch: dict, prior_weight: float) -> torch.Tensor:
        """``-log p(y_batch | A) - prior_weight * log p(A)`` (minus the unconstraining Jacobian, as Pyro's
        ``laplace_approximation``) at the latent vector ``latent`` ``(D,)``, through the real model."""
        values, jacobian = dict(self.fixed_site_values()), 0.0
        for site, unconstrained in self.inner._unpack_latent(latent):
            values[site["name"]], log_density = self._constrain(site, unconstrained)
            jacobian = jacobian + log_density.sum()
        labels = batch["labels"]
        trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
            batch["input_ids"], batch["attention_mask"], labels, None, num_data=len(labels), kl_weight=prior_weight,
            **extra_batch_inputs(batch),
        )
        return prior_weight * jacobian - trace.log_prob_sum()

    @staticmethod
    def _hessian(loss: torch.Tensor, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """``d^2 loss / dx^2`` ``(D, D)`` by D Hessian-vector products (batched with vmap where the ops allow)."""
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        rows, eye = [], torch.eye(x.numel(), dtype=x.dtype, device=x.device)
        for start in range(0, x.numel(), chunk):
            block = eye[start:start + chunk]
            try:
                (h,) = torch.autograd.grad(grad, x, grad_outputs=block, retain_graph=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one product at a time
                h = torch.stack([torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=True)[0] for v in block])
            rows.append(h.detach())
        return torch.cat(rows)

    def post_fit(self, batches: Sequence[dict]) -> None:
        """Set the covariance to the inverse Hessian of ``-log p(y, A)`` at the fitted ``loc``, over the
        training set in ``batches`` (each example once).

        :raises ValueError: when the Hessian is not positive definite (the MAP has not converged: the
            message gives the smallest eigenvalue and what to do).
        """
        if not batches:
            raise ValueError("LaplaceAdapter.post_fit needs the training batches (got none)")
        self._param_scope.activate()
        latent = self.inner.loc.detach().clone().requires_grad_(True)
        hessian = torch.zeros(latent.numel(), latent.numel(), dtype=torch.float64, device=latent.device)
        for batch in batches:
            hessian += self._hessian(self._negative_log_joint(latent, batch, 1.0 / len(batches)), latent).double()
        hessian = 0.5 * (hessian + hessian.T)
        factor, info = torch.linalg.cholesky_ex(hessian)
        if int(info) != 0:
            smallest = float(torch.linalg.eigvalsh(hessian)[0])
            raise ValueError(
                f"the Hessian of -log p(y, A) at the trained MAP is not positive definite (smallest eigenvalue {smallest:.3g}): "
                "the point is not a local maximum of the posterior yet; train longer (--max-steps) or with a smaller --lr"
            )
        covariance = torch.cholesky_inverse(factor)
        with torch.no_grad():
            self.laplace_scale_tril.copy_(torch.linalg.cholesky(covariance).to(self.laplace_scale_tril.dtype))
            self.laplace_fitted.fill_(1.0)

    @torch.no_grad()
    def posterior_mean(self):
        """The fitted point (the MAP, also the Laplace posterior's mean), per site."""
        means = {site["name"]: self._constrain(site, value)[0].detach() for site, value in self.inner._unpack_latent(self.inner.loc)}
        return {**self.fixed_site_values(), **means}

    def covariance(self) -> torch.Tensor:
        """The Laplace covariance ``H^-1`` ``(D, D)`` over the latent vector (sites in model order, flattened)."""
        if not self.fitted:
            raise RuntimeError("the Laplace covariance is set by post_fit(training batches) after training; call it first")
        return self.laplace_scale_tril @ self.laplace_scale_tril.T

    def loc_and_scale(self, site: str):
        if not self.fitted or site not in self.site_names:
            return super().loc_and_scale(site)
        std = self.laplace_scale_tril.pow(2).sum(-1).sqrt()
        for (node, loc), (_, scale) in zip(self.inner._unpack_latent(self.inner.loc), self.inner._unpack_latent(std)):
            if node["name"] == site:
                return loc, scale
        raise KeyError(site)
