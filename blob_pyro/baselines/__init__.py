"""Baselines of the BLoB paper that are not one SVI run, behind one entry point.

``run_method(cfg)`` runs ``cfg.method`` (``python -m blob_pyro.train --method <name>``) and writes the same
files as a training run (``config.json``, ``metrics.json``, ``predictions.npz``, ``run.json``) into
``cfg.output_dir``; the runs it builds on live in sub-directories and are reused when finished with a matching
config. Each module also implements ``load_predictive(run_dir, cfg, *, device, dtype)``: the finished run's
:class:`blob_pyro.run_predictive.RunPredictive` (draws ``(S, n, K)``, point estimate, its prediction modes),
through which ``python -m blob_pyro.evaluate`` and ``--eval-tasks`` analyse every method alike.

* ``mc_dropout``: LoRA dropout kept on at test time, ``--eval-samples`` passes (Gal & Ghahramani 2016).
* ``ensemble``: ``--ensemble-size`` independently seeded runs, probabilities averaged (Lakshminarayanan 2017).
* ``laplace``: post-hoc Laplace (diagonal or KFAC) over the LoRA parameters of a MAP/MLE run (Yang et al. 2024).
* ``tfb``: training-free Bayesianization of a MAP/MLE run (Shi et al. 2024, arXiv 2412.05723).
* ``temperature``: post-hoc temperature scaling of any run's posterior-mean logits, T fitted on its
  calibration split (Guo et al. 2017).
"""

from __future__ import annotations

import importlib

__all__ = ["METHODS", "run_method"]

METHODS = {
    "mc_dropout": "blob_pyro.baselines.mc_dropout",
    "ensemble": "blob_pyro.baselines.ensemble",
    "laplace": "blob_pyro.baselines.laplace",
    "tfb": "blob_pyro.baselines.tfb",
    "temperature": "blob_pyro.baselines.temperature",
}


def run_method(cfg) -> dict:
    """Run the baseline ``cfg.method``; returns its metrics."""
    try:
        module = METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"unknown baseline method {cfg.method!r}; valid names: {sorted(METHODS)}") from None
    return importlib.import_module(module).run(cfg)
