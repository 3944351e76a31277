"""MC dropout (Gal & Ghahramani 2016): train with LoRA dropout (``--lora-dropout``, 0.1 in the paper),
keep the adapters' dropout on at test time and average the softmax over ``--eval-samples`` passes
(10 in the paper). Everything else (A, B) is at its point estimate / posterior mean
(:class:`~blob_pyro.guides.fixed.PosteriorMeanGuide`); pass s is draw s of the shared sampler
(:func:`blob_pyro.evaluation.predictive.draw_predictive`, seeded by ``draw_seed(seed, s)``), so ``train`` and
``evaluate`` see the same dropout masks."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.evaluation.predictive import sample_probs
from blob_pyro.guides.fixed import PosteriorMeanGuide

from blob_pyro.rundir import read_metrics

from . import register_method
from .common import load_run, train_base_run, write_baseline_run

__all__ = ["dropout_on", "mc_dropout_probs", "load_predictive", "run"]


@contextmanager
def dropout_on(model):
    """Inside: the adapters' dropout in train mode (a fresh mask per pass), the rest of ``model`` as it was."""
    dropouts = [layer._modules["lora_dropout"] for layer in model.adapters.values()]
    if not any(isinstance(d, torch.nn.Dropout) for d in dropouts):
        raise ValueError("the model's adapters have no dropout: train with --lora-dropout > 0 for MC dropout")
    try:
        for d in dropouts:
            d.train()
        yield model
    finally:
        for d in dropouts:
            d.eval()


@torch.no_grad()
def mc_dropout_probs(model, guide, batches, *, num_samples: int, seed: int = 0) -> torch.Tensor:
    """``(num_samples, n, K)`` probabilities at ``guide``'s posterior mean with the adapters' dropout on (the
    rest of the model in eval); pass s seeded by ``draw_seed(seed, s)``."""
    with dropout_on(model):
        return sample_probs(model, PosteriorMeanGuide(guide), batches, num_samples=num_samples, seed=seed)


def load_predictive(run_dir, cfg, *, device=None, dtype=None):
    """The run's :class:`~blob_pyro.run_predictive.RunPredictive`: the base run's network, its point estimate
    as ``mean``, and draws with the adapters' dropout on (draw s seeded, so the same masks' stream per task)."""
    from blob_pyro.run_predictive import GuidePredictive, base_run_dir

    loaded = load_run(base_run_dir(run_dir, cfg), device=device, dtype=dtype)
    return GuidePredictive(
        method="mc_dropout", description=f"MC dropout p = {cfg.lora_dropout}", cfg=loaded.cfg, model=loaded.model,
        data=loaded.data, tokenizer=loaded.tokenizer, device=loaded.device, point_estimate=False,
        guide=PosteriorMeanGuide(loaded.guide), draw_context=dropout_on, record_sites=False,
    )


@register_method("mc_dropout", help="LoRA dropout kept on at test, --eval-samples passes; needs --lora-dropout > 0",
                 compare={"mc_dropout": ["--guide", "mle", "--lora-dropout", "0.1"]})
def run(cfg) -> dict:
    start = time.perf_counter()
    base = train_base_run(cfg, "base")
    loaded = load_run(base)
    batches = loaded.validation_batches()
    labels = loaded.data.validation.labels
    samples = max(cfg.eval_samples, 1)
    draws = mc_dropout_probs(loaded.model, loaded.guide, batches, num_samples=samples, seed=cfg.seed)
    base_metrics = read_metrics(base)
    name = f"samples_{samples}"
    metrics = {k: base_metrics[k] for k in ("zero_shot", "mean") if k in base_metrics}
    metrics[name] = classification_metrics(draws.mean(0).numpy(), labels.numpy())
    info = {"method": "mc_dropout", "base_run": "base", "dropout": cfg.lora_dropout, "num_samples": samples,
            "wall_seconds": time.perf_counter() - start}
    return write_baseline_run(cfg, metrics, {name: draws.mean(0)}, labels, info)
