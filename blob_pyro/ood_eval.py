"""Train's ``--eval-tasks`` (the OOD protocol of BLoB section 4) for a run of any method, through its
:class:`~blob_pyro.run_predictive.RunPredictive`.

Per OOD task: the metrics of each of the method's predictive modes (``metrics["ood"][task][mode]``) and
OOD detection against the run's own validation set (``metrics["ood_detection"][task][score]`` =
``{"auroc", "aupr", "aupr_chance"}``, OOD = positive, scores of
:data:`blob_pyro.evaluation.uncertainty.OOD_SCORES`: max probability, entropy, mutual information).
"""

from __future__ import annotations

import sys

import numpy as np
from tqdm.auto import tqdm

from blob_pyro.config import TrainConfig

__all__ = ["evaluate_ood_tasks_with", "num_draws_for", "detection_blocks"]


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def num_draws_for(predictive, eval_samples: int) -> int:
    """Draws to take: 1 for a point estimate (every draw is the same network), else ``max(eval_samples, 1)``."""
    return 1 if predictive.point_estimate else max(int(eval_samples), 1)


def detection_blocks(id_probs, ood_probs_by_task: dict) -> dict:
    """``{task: ood_detection(id draws, task draws)}``; draws ``(S, n, K)`` (an ``(n, K)`` array is one draw)."""
    from blob_pyro.evaluation.uncertainty import ood_detection

    as_draws = lambda p: np.asarray(p)[None] if np.asarray(p).ndim == 2 else np.asarray(p)  # noqa: E731
    return {name: ood_detection(as_draws(id_probs), as_draws(p)) for name, p in ood_probs_by_task.items()}


def evaluate_ood_tasks_with(predictive, cfg: TrainConfig) -> tuple[dict, dict]:
    """``(ood, ood_detection)`` for every ``cfg.eval_tasks`` task (a seeded stratified sample of
    ``--eval-task-size`` examples of its evaluation split, as for SVI runs) and the run's validation set."""
    from blob_pyro.assembly import batches, encode_examples, evaluation_positions, length_sorted, load_task
    from blob_pyro.data import task_spec_name
    from blob_pyro.evaluation.metrics import classification_metrics

    data, device = predictive.data, predictive.device
    draws_n = num_draws_for(predictive, cfg.eval_samples)
    id_batches = batches(data, data.validation, batch_size=cfg.eval_batch_size, device=device)
    id_draws = predictive.draws(predictive.model, id_batches, num_samples=draws_n, seed=cfg.seed)
    ood, ood_probs = {}, {}
    for spec in cfg.eval_task_specs:
        name = task_spec_name(spec)
        task = load_task(cfg, spec, roles=("validation",))
        positions = evaluation_positions(cfg, task)
        positions, encoded = length_sorted(positions, encode_examples(predictive.cfg, task, predictive.tokenizer,
                                                                      [task.examples[i] for i in positions]))
        task_batches = batches(data, encoded, batch_size=cfg.eval_batch_size, device=device)
        model = predictive.model_for(task)
        draws = predictive.draws(model, task_batches, num_samples=draws_n, seed=cfg.seed)
        labels = encoded.labels.numpy()
        ood[name] = {mode: classification_metrics(p, labels) for mode, p in predictive.modes(model, task_batches, draws).items()}
        ood_probs[name] = draws.probs
        _log(f"OOD {name}: {len(labels)} examples x {draws_n} draw(s) of the {predictive.method} predictive")
    return ood, detection_blocks(id_draws.probs, ood_probs)
