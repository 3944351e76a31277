"""Post-hoc Laplace over the LoRA parameters (A and B) of a MAP/MLE run (Laplace-LoRA, Yang et al. 2024;
the marginal-likelihood recipe of Immer et al. 2021 / Daxberger et al. 2021's ``laplace-torch``).

* Curvature: the diagonal of the generalised Gauss-Newton, which for a categorical likelihood equals the
  expected Fisher, ``h_j = sum_n sum_c p_nc (d log p_nc / d theta_j)^2`` (``diag``: K backward passes per
  example), the empirical Fisher ``sum_n (d log p_{n,y_n} / d theta_j)^2`` (``diag_ef``: one), or the
  Kronecker-factored GGN ``n (G ⊗ A)`` of every LoRA factor (``kfac``: K backward passes per example;
  :mod:`.kfac`). Computed on ``--laplace-examples`` training examples (0 = all) and scaled to the full
  training set.
* Prior ``N(0, 1/lambda)`` on every LoRA element; ``lambda`` maximises the Laplace evidence
  ``log p(D | theta*) - lambda/2 |theta*|^2 + P/2 log lambda - 1/2 sum_j log(h_j + lambda)`` (a
  log-spaced grid, then a refined one), unless ``--laplace-prior-precision`` fixes it. With ``kfac`` the
  ``h_j`` are the eigenvalues ``n lg_i la_k`` of the Kronecker curvature.
* Posterior ``N(theta*, diag(1 / (h + lambda)))``, or with ``kfac`` ``N(W*, (n (G ⊗ A) + lambda I)^-1)`` per
  factor. Predictive: ``mc`` (softmax averaged over ``--eval-samples`` draws of A and B) or ``probit``
  (linearised logits with variance ``J_k Sigma J_k^T`` per class, diagonal ``sum_j J_kj^2 / (h_j + lambda)``
  or Kronecker, then the probit approximation ``softmax(mu / sqrt(1 + pi/8 var))``).

laplace-torch is not used: this keeps the curvature on our Pyro model's LoRA sites and adds no dependency.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from pyro import poutine

from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.models.adapt import with_random_B
from blob_pyro.models.bayesian_model import extra_batch_inputs
from blob_pyro.evaluation.predictive import sample_probs

from blob_pyro.run_predictive import RunPredictive

from blob_pyro.guides.fixed import FixedGaussianGuide
from blob_pyro.rundir import read_metrics

from . import register_method
from .common import load_run, train_base_run, write_baseline_run
from .kfac import KroneckerGaussianGuide, KroneckerPosterior, kfac_curvature

__all__ = [
    "diagonal_curvature", "log_marginal_likelihood", "tune_prior_precision", "posterior_variance",
    "probit_predictive", "LaplaceFit", "fit_laplace", "probit_moments", "LaplaceProbitPredictive", "laplace_predictive",
    "load_predictive", "run",
]


def diagonal_curvature(logits_fn: Callable[[dict], torch.Tensor], params: Sequence[torch.Tensor], examples: Iterable[dict],
                       *, kind: str = "diag") -> list[torch.Tensor]:
    """Diagonal GGN (``kind="diag"``) or empirical Fisher (``"diag_ef"``) of ``params``, summed over examples.

    :param logits_fn: one example (a batch of size 1 with ``labels``) -> ``(1, K)`` logits, differentiable in ``params``.
    :returns: one tensor per parameter, its shape.
    """
    if kind not in ("diag", "diag_ef"):
        raise ValueError(f"curvature kind must be 'diag' or 'diag_ef', got {kind!r}")
    curvature = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for example in examples:
        log_probs = torch.log_softmax(logits_fn(example).double(), -1)[0]
        if kind == "diag_ef":
            terms = [(int(example["labels"][0]), 1.0)]
        else:
            terms = [(c, float(log_probs[c].detach().exp())) for c in range(log_probs.numel())]
        for index, (c, weight) in enumerate(terms):
            grads = torch.autograd.grad(log_probs[c], params, retain_graph=index < len(terms) - 1, allow_unused=True)
            for h, g in zip(curvature, grads):
                if g is not None:
                    h.add_(weight * g.double() ** 2)
    return curvature


def log_marginal_likelihood(log_likelihood: float, theta: torch.Tensor, curvature: torch.Tensor, prior_precision) -> torch.Tensor:
    """Laplace evidence with an isotropic Gaussian prior ``N(0, 1/lambda)`` and diagonal curvature ``h``:
    ``log_lik - lambda/2 |theta|^2 + P/2 log lambda - 1/2 sum log(h + lambda)`` (the 2 pi terms cancel).

    Exact for a linear-Gaussian model with orthogonal features evaluated at its MAP (tested).
    ``theta``, ``curvature``: flat ``(P,)``; ``prior_precision``: scalar or ``(L,)`` -> ``(L,)``.
    """
    lam = torch.as_tensor(prior_precision, dtype=torch.float64).reshape(-1, 1)
    theta, h = theta.double().reshape(1, -1), curvature.double().reshape(1, -1)
    P = theta.shape[-1]
    return (log_likelihood - 0.5 * lam[:, 0] * (theta**2).sum(-1) + 0.5 * P * torch.log(lam[:, 0])
            - 0.5 * torch.log(h + lam).sum(-1))


def tune_prior_precision(theta: torch.Tensor, curvature: torch.Tensor, *, low: float = 1e-4, high: float = 1e6) -> float:
    """The ``lambda`` maximising :func:`log_marginal_likelihood` (``theta*`` fixed: post-hoc tuning)."""
    grid = torch.logspace(math.log10(low), math.log10(high), 201, dtype=torch.float64)
    for _ in range(3):  # refine around the best point
        values = log_marginal_likelihood(0.0, theta, curvature, grid)
        best = int(values.argmax())
        lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
        grid = torch.logspace(math.log10(lo), math.log10(hi), 101, dtype=torch.float64)
    return float(grid[int(log_marginal_likelihood(0.0, theta, curvature, grid).argmax())])


def posterior_variance(curvature: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """Diagonal posterior variance ``1 / (h + lambda)``."""
    return 1.0 / (curvature.double() + prior_precision)


def probit_predictive(mean_logits: torch.Tensor, logit_variance: torch.Tensor) -> torch.Tensor:
    """``softmax(mu / sqrt(1 + pi/8 var))``: the probit approximation of the linearised predictive, ``(n, K)``."""
    return torch.softmax(mean_logits / torch.sqrt(1.0 + math.pi / 8.0 * logit_variance), dim=-1)


@contextmanager
def _at(theta: dict):
    with poutine.block(), poutine.condition(data=theta):
        yield


def _single_examples(batches):
    """One example at a time; with choice scoring an example is its K consecutive rows."""
    for b in batches:
        n = b["labels"].shape[0]
        per = b["input_ids"].shape[0] // n  # rows per example: 1, or K with choice scoring
        for i in range(n):
            yield {k: (v[i : i + 1] if k in ("labels", "indices") else v[i * per : (i + 1) * per]) for k, v in b.items()}


@dataclass
class _Posterior:
    """A fitted Laplace posterior as :func:`run` uses it.

    ``guide``: draws every site (for the ``mc`` predictive); ``quadratic_form(site, grad)``:
    ``vec(grad)^T Sigma_site vec(grad)`` (for ``probit``); ``mean_std``: mean marginal posterior std.
    """

    prior_precision: float
    guide: object
    quadratic_form: Callable[[str, torch.Tensor], torch.Tensor]
    mean_std: float


def _diagonal_posterior(model, theta: dict, logits_fn, examples, scale: float, kind: str, prior_precision: float) -> _Posterior:
    """``diag`` / ``diag_ef``: diagonal curvature (times ``scale`` = n_train / used), tuned prior, mean-field posterior."""
    names, params = list(theta), list(theta.values())
    curvature = diagonal_curvature(logits_fn, params, examples, kind=kind)
    h = torch.cat([c.reshape(-1) for c in curvature]) * scale
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    lam = prior_precision or tune_prior_precision(flat, h)
    variance = posterior_variance(h, lam)
    scales, offset = {}, 0
    for name, p in zip(names, params):
        scales[name] = variance[offset : offset + p.numel()].sqrt().reshape(p.shape).to(p.dtype)
        offset += p.numel()
    guide = FixedGaussianGuide(model, {k: v.detach() for k, v in theta.items()}, scales)
    quadratic = lambda site, g: ((g.double() * scales[site].double()) ** 2).sum()  # noqa: E731
    return _Posterior(lam, guide, quadratic, float(variance.sqrt().mean()))


def _kfac_posterior(model, theta: dict, logits_fn, examples, n_train: int, prior_precision: float) -> _Posterior:
    """``kfac``: Kronecker-factored GGN of every A and B, scaled to ``n_train`` examples; the prior
    precision tuned on its eigenvalues; a :class:`KroneckerGaussianGuide`."""
    curvature = kfac_curvature(logits_fn, model.adapters, examples, kind="kfac")
    curvature = {site: curvature[site].with_num_data(n_train) for site in theta}
    eigenvalues = torch.cat([c.eigenvalues().reshape(-1).cpu() for c in curvature.values()])
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in theta.values()])
    lam = prior_precision or tune_prior_precision(flat, eigenvalues)
    posteriors = {site: KroneckerPosterior(theta[site], curvature[site], lam) for site in theta}
    guide = KroneckerGaussianGuide(model, posteriors)
    mean_std = float(torch.cat([p.marginal_std().reshape(-1).cpu() for p in posteriors.values()]).mean())
    return _Posterior(lam, guide, lambda site, g: posteriors[site].quadratic_form(g), mean_std)


@dataclass
class LaplaceFit:
    """A Laplace posterior fitted to a loaded base run: ``model`` (the base run's network, rebuilt with B a
    sample site: use it, not the loaded model), ``theta`` = ``{site: leaf tensor}`` (A and B at the MAP),
    ``posterior``, and the curvature's cost."""

    model: object
    theta: dict
    posterior: _Posterior
    used: int
    curvature_seconds: float

    def logits_fn(self, model):
        """One example -> ``(1, K)`` logits of ``model`` at ``theta``, differentiable in ``theta``."""
        def logits(example):
            with _at(self.theta):
                return model.class_logits(example["input_ids"], example["attention_mask"], **extra_batch_inputs(example))
        return logits


def fit_laplace(cfg, loaded) -> LaplaceFit:
    """Curvature on ``--laplace-examples`` training examples of the base run, prior precision, posterior
    (deterministic given the base run and the config)."""
    from blob_pyro.assembly import batches as make_batches

    data = loaded.data
    # theta* = (A, B) of every adapter as leaf tensors, in a model rebuilt with B a (conditioned) sample site
    means = loaded.guide.posterior_mean()
    model = with_random_B(loaded.model)
    theta = {}
    for site, layer in model.adapters.items():
        theta[site] = means[site].detach().clone().requires_grad_(True)
        theta[layer.site_name_B] = layer.lora_B.detach().clone().requires_grad_(True)
    fit = LaplaceFit(model, theta, None, 0, 0.0)
    logits_fn = fit.logits_fn(model)
    n_train = len(data.train)
    used = n_train if cfg.laplace_examples == 0 else min(cfg.laplace_examples, n_train)
    examples = _single_examples(make_batches(data, data.train.first(used), batch_size=1, device=loaded.device))
    curvature_start = time.perf_counter()
    if cfg.laplace_hessian == "kfac":
        posterior = _kfac_posterior(model, theta, logits_fn, examples, n_train, cfg.laplace_prior_precision)
    else:
        posterior = _diagonal_posterior(model, theta, logits_fn, examples, n_train / used, cfg.laplace_hessian,
                                        cfg.laplace_prior_precision)
    fit.posterior, fit.used, fit.curvature_seconds = posterior, used, time.perf_counter() - curvature_start
    return fit


def probit_moments(fit: LaplaceFit, model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearised logits per example: mean ``mu`` and per-class variance ``J_k Sigma J_k^T``, both ``(n, K)`` float64."""
    names, params = list(fit.theta), list(fit.theta.values())
    logits_fn = fit.logits_fn(model)
    mus, variances = [], []
    for example in _single_examples(batches):
        logits = logits_fn(example)[0]
        var = torch.zeros_like(logits, dtype=torch.float64)
        for c in range(logits.numel()):
            grads = torch.autograd.grad(logits[c], params, retain_graph=c < logits.numel() - 1, allow_unused=True)
            var[c] = sum(fit.posterior.quadratic_form(site, g) for site, g in zip(names, grads) if g is not None)
        mus.append(logits.detach().double())
        variances.append(var)
    return torch.stack(mus), torch.stack(variances)


@register_method(
    "laplace", help="post-hoc Laplace over the LoRA parameters of a --guide map/mle run",
    compare={"laplace": ["--guide", "map"],  # Laplace-LoRA as the paper runs it: KFAC GGN, linearised (probit) predictive
             "laplace_kfac": ["--guide", "map", "--laplace-hessian", "kfac", "--laplace-predictive", "probit"]},
    base_method="map",
)
def run(cfg) -> dict:
    start = time.perf_counter()
    base = train_base_run(cfg, "base")
    loaded = load_run(base)
    data = loaded.data
    fit = fit_laplace(cfg, loaded)
    model = fit.model  # B a sample site
    posterior, curvature_seconds, used = fit.posterior, fit.curvature_seconds, fit.used
    lam, flat = posterior.prior_precision, torch.cat([p.detach().reshape(-1) for p in fit.theta.values()])

    val_batches = loaded.validation_batches()
    labels = data.validation.labels
    samples = max(cfg.eval_samples, 1)
    if cfg.laplace_predictive == "mc":
        name = f"samples_{samples}"
        probs = sample_probs(model, posterior.guide, val_batches, num_samples=samples, seed=cfg.seed).mean(0)
    else:
        name = "probit"
        probs = probit_predictive(*probit_moments(fit, model, val_batches)).float()
    base_metrics = read_metrics(base)
    metrics = {k: base_metrics[k] for k in ("zero_shot", "mean") if k in base_metrics}
    metrics[name] = classification_metrics(probs.numpy(), labels.numpy())
    info = {"method": "laplace", "base_run": "base", "hessian": cfg.laplace_hessian, "prior_precision": lam,
            "prior_precision_tuned": cfg.laplace_prior_precision == 0, "curvature_examples": used,
            "curvature_seconds": curvature_seconds, "num_parameters": int(flat.numel()),
            "mean_posterior_std": posterior.mean_std, "predictive": cfg.laplace_predictive,
            "wall_seconds": time.perf_counter() - start}
    print(f"Laplace: lambda = {lam:.4g}, mean posterior std {info['mean_posterior_std']:.4g} over {flat.numel():,} parameters")
    predictive = laplace_predictive(cfg, loaded, fit) if cfg.eval_task_specs else None
    return write_baseline_run(cfg, metrics, {name: probs}, labels, info, predictive=predictive)


@dataclass
class LaplaceProbitPredictive(RunPredictive):
    """``--laplace-predictive probit``: modes ``mean`` (MAP), ``probit`` (:func:`probit_predictive` of the
    linearised logits) and ``linearised_<S>``; the draws are ``softmax(mu + sqrt(var) z)``, ``z ~ N(0, I)``
    per class (the per-class Gaussian the probit approximation integrates), seeded by ``draw_seed(seed, s)``."""

    fit: LaplaceFit = None

    def point_probs(self, model, batches):
        from blob_pyro.evaluation.predictive import posterior_mean_probs

        return posterior_mean_probs(model, self.fit.posterior.guide, batches).numpy()

    def draws(self, model, batches, *, num_samples, seed, posterior_sites=()):
        from blob_pyro.evaluation.predictive import PredictiveDraws, draw_seed

        mu, var = (t.numpy() for t in self._moments(model, batches))
        probs, labels, seeds = [], [], []
        for s in range(num_samples):
            seeds.append(draw_seed(seed, s))
            rng = np.random.default_rng(seeds[-1])
            logits = mu + np.sqrt(np.maximum(var, 0.0)) * rng.standard_normal(mu.shape)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            probs.append(p.astype(np.float32))
            labels.append(np.array([rng.choice(p.shape[-1], p=row / row.sum()) for row in p], dtype=np.int64))
        return PredictiveDraws(probs=np.stack(probs), sampled_labels=np.stack(labels), posterior={}, seeds=seeds)

    def _moments(self, model, batches):
        """:func:`probit_moments`, kept for the last batch list (``draws`` then ``modes`` on the same batches)."""
        key = (id(model), id(batches))
        if getattr(self, "_cache", (None,))[0] != key:
            self._cache = (key, probit_moments(self.fit, model, batches))
        return self._cache[1]

    def modes(self, model, batches, draws):
        mu, var = self._moments(model, batches)
        return {"mean": self.point_probs(model, batches), "probit": probit_predictive(mu, var).float().numpy(),
                f"linearised_{draws.num_draws}": draws.probs.mean(0)}


def laplace_predictive(cfg, loaded, fit: LaplaceFit) -> RunPredictive:
    """The :class:`~blob_pyro.run_predictive.RunPredictive` of a fitted Laplace posterior: draws of A and B
    (``mc``) or the linearised predictive (``probit``)."""
    from blob_pyro.run_predictive import GuidePredictive

    common = dict(method="laplace", cfg=loaded.cfg, model=fit.model, data=loaded.data, tokenizer=loaded.tokenizer,
                  device=loaded.device, guide=fit.posterior.guide,
                  description=f"Laplace {cfg.laplace_hessian} ({cfg.laplace_predictive}), lambda = {fit.posterior.prior_precision:.3g}")
    if cfg.laplace_predictive == "probit":
        return LaplaceProbitPredictive(**common, fit=fit)
    return GuidePredictive(**common)


def load_predictive(run_dir, cfg, *, device=None, dtype=None) -> RunPredictive:
    """Refit the Laplace posterior to the run's base run (the curvature pass again: deterministic, the same
    posterior as the run's; no posterior file is stored) and return its predictive."""
    from blob_pyro.run_predictive import base_run_dir

    loaded = load_run(base_run_dir(run_dir, cfg), device=device, dtype=dtype)
    return laplace_predictive(cfg, loaded, fit_laplace(cfg, loaded))
