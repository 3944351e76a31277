"""MC dropout (Gal & Ghahramani 2016): train with LoRA dropout (``--lora-dropout``, 0.1 in the paper),
keep the adapters' dropout on at test time and average the softmax over ``--eval-samples`` passes
(10 in the paper). Everything else (A, B) is at its point estimate / posterior mean."""

from __future__ import annotations

import time

import torch

from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.evaluation.predictive import posterior_mean_probs

from . import register_method
from .common import load_run, read_metrics, train_base_run, write_baseline_run

__all__ = ["mc_dropout_probs", "run"]


@torch.no_grad()
def mc_dropout_probs(model, guide, batches, *, num_samples: int) -> torch.Tensor:
    """``(num_samples, n, K)`` probabilities with the adapters' dropout on (the rest of the model in eval)."""
    dropouts = [layer._modules["lora_dropout"] for layer in model.adapters.values()]
    if not any(isinstance(d, torch.nn.Dropout) for d in dropouts):
        raise ValueError("the model's adapters have no dropout: train with --lora-dropout > 0 for MC dropout")
    try:
        for d in dropouts:
            d.train()
        return torch.stack([posterior_mean_probs(model, guide, batches) for _ in range(num_samples)])
    finally:
        for d in dropouts:
            d.eval()


@register_method("mc_dropout", help="LoRA dropout kept on at test, --eval-samples passes; needs --lora-dropout > 0",
                 compare={"mc_dropout": ["--guide", "mle", "--lora-dropout", "0.1"]})
def run(cfg) -> dict:
    start = time.perf_counter()
    base = train_base_run(cfg, "base")
    loaded = load_run(base)
    torch.manual_seed(cfg.seed)
    batches = loaded.validation_batches()
    labels = loaded.data.validation.labels
    samples = max(cfg.eval_samples, 1)
    draws = mc_dropout_probs(loaded.model, loaded.guide, batches, num_samples=samples)
    base_metrics = read_metrics(base)
    name = f"samples_{samples}"
    metrics = {k: base_metrics[k] for k in ("zero_shot", "mean") if k in base_metrics}
    metrics[name] = classification_metrics(draws.mean(0).numpy(), labels.numpy())
    info = {"method": "mc_dropout", "base_run": "base", "dropout": cfg.lora_dropout, "num_samples": samples,
            "wall_seconds": time.perf_counter() - start}
    return write_baseline_run(cfg, metrics, {name: draws.mean(0)}, labels, info)
