"""The predictive of a finished run of ANY method, behind one interface.

``python -m blob_pyro.evaluate``, train's ``--eval-tasks`` for the baselines and ``compare`` ask a
:class:`RunPredictive` for three things on a list of evaluation batches of any task the base model can
score (its own K; :meth:`RunPredictive.model_for` puts the task's likelihood head on the shared network):

* :meth:`~RunPredictive.draws`: ``S`` draws of the class probabilities ``(S, n, K)`` (with sampled labels, and
  posterior draws of the sites asked for), draw ``s`` seeded by ``draw_seed(seed, s)`` so that it is the
  same network for every task: the input of the uncertainty decomposition, OOD detection and InferenceData;
* :meth:`~RunPredictive.point_probs`: the ``(n, K)`` point-estimate predictive ("mean", N = 0), if the method has one;
* :meth:`~RunPredictive.modes`: ``{mode: (n, K)}``, the method's own predictives, named as in its ``metrics.json``.

One implementation per method (:func:`load_run_predictive` dispatches on the run's ``--method``):

* ``svi``: the guide's draws (:class:`GuidePredictive`); point estimate at the posterior mean.
* ``mc_dropout``: the base run's network with the adapters' dropout ON while drawing (Gal & Ghahramani 2016).
* ``laplace`` / ``tfb``: draws from the fitted Gaussian over the LoRA factors (``mc``), or for
  ``--laplace-predictive probit`` the linearised predictive: the probit mode plus draws of the linearised
  logits ``N(mu, diag var)`` for the uncertainty decomposition (:mod:`blob_pyro.baselines.laplace`).
* ``ensemble``: the mixture: every member's draws (1 for a point-estimate member) stacked, so the mean over
  draws is the average of the members' probabilities (Lakshminarayanan et al. 2017).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from blob_pyro.config import TrainConfig

__all__ = [
    "RunPredictive", "GuidePredictive", "load_run_predictive", "load_svi_run", "run_task_and_split", "task_model",
    "concatenate_draws", "base_run_dir",
]


def task_model(run_cfg: TrainConfig, network, tokenizer, task, device):
    """The adapted ``network`` with a likelihood head for ``task`` (its own K; as train's OOD evaluation)."""
    from blob_pyro.assembly import uses_answer_letters
    from blob_pyro.data import answer_token_ids
    from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, ChoiceLikelihoodHead, SequenceClassificationHead

    if uses_answer_letters(run_cfg):
        head = AnswerTokenHead(answer_token_ids(tokenizer, task.num_choices))
    elif run_cfg.task_type == "causal_lm":
        head = ChoiceLikelihoodHead(task.num_choices)
    else:
        head = SequenceClassificationHead(task.num_choices)
    return BayesianLoRAModel(network, head).to(device).eval()


@dataclass
class RunPredictive:
    """A finished run's predictive; subclasses implement :meth:`draws`, :meth:`point_probs`, :meth:`modes`.

    :param cfg: the config its model was built from (a post-hoc baseline's: its base run's).
    :param model: ``BayesianLoRAModel`` with the run task's head; ``data``: the run task tokenized with its split.
    :param point_estimate: every draw is the same network (evaluate then draws once).
    :param draws_per_pass: posterior draws stacked along the batch axis of one network pass
        (:func:`~blob_pyro.evaluation.predictive.draw_predictive`); a speed setting: the same draws, probabilities
        equal up to float rounding (a draw context such as MC dropout's keeps one pass per draw).
    """

    method: str
    description: str
    cfg: TrainConfig
    model: object
    data: object
    tokenizer: object
    device: torch.device
    point_estimate: bool = False
    guide: object = None
    draws_per_pass: int = 1

    def model_for(self, task):
        """The model scoring ``task``: the run's own for its task, else the same network with ``task``'s head."""
        if task is self.data.task:
            return self.model
        return task_model(self.cfg, self.model.network, self.tokenizer, task, self.device)

    def sample_sites(self, batch: dict) -> list[str]:
        """Sites whose posterior draws can go into an InferenceData ``posterior`` group (none by default)."""
        return []

    def point_probs(self, model, batches: list) -> Optional[np.ndarray]:
        raise NotImplementedError

    def draws(self, model, batches: list, *, num_samples: int, seed: int, posterior_sites: Sequence[str] = ()):
        raise NotImplementedError

    def modes(self, model, batches: list, draws) -> dict[str, np.ndarray]:
        """``{mode: (n, K)}``: ``mean`` (point estimate, if any) and the averaged draws ``samples_<S>``."""
        from blob_pyro.evaluation.report import mode_name

        out = {}
        point = self.point_probs(model, batches)
        if point is not None:
            out["mean"] = point
        if not self.point_estimate or point is None:
            out[mode_name(draws.num_draws)] = draws.probs.mean(0)
        return out


@dataclass
class GuidePredictive(RunPredictive):
    """Draws of a guide over the LoRA factors (SVI guides, Laplace ``mc``, TFB), optionally inside
    ``draw_context(model)`` (MC dropout: the adapters' dropout on)."""

    draw_context: Optional[Callable] = None
    record_sites: bool = True

    def sample_sites(self, batch: dict) -> list[str]:
        from blob_pyro.evaluation.predictive import guide_sample_sites

        return guide_sample_sites(self.guide, batch) if self.record_sites else []

    def point_probs(self, model, batches: list) -> np.ndarray:
        from blob_pyro.evaluation.predictive import posterior_mean_probs

        return posterior_mean_probs(model, self.guide, batches).numpy()

    def draws(self, model, batches: list, *, num_samples: int, seed: int, posterior_sites: Sequence[str] = ()):
        from blob_pyro.evaluation.predictive import draw_predictive

        context = self.draw_context(model) if self.draw_context else contextlib.nullcontext()
        # a draw context (MC dropout) draws its randomness inside the pass: one pass per draw keeps its draws
        per_pass = 1 if self.draw_context else self.draws_per_pass
        with context:
            return draw_predictive(model, self.guide, batches, num_samples=num_samples, seed=seed, posterior_sites=posterior_sites,
                                   draws_per_pass=per_pass)


def concatenate_draws(parts: list):
    """One ``PredictiveDraws`` of the draws of ``parts`` stacked (posterior draws only of sites all parts have)."""
    from blob_pyro.evaluation.predictive import PredictiveDraws

    sites = set.intersection(*(set(p.posterior) for p in parts)) if parts else set()
    return PredictiveDraws(
        probs=np.concatenate([p.probs for p in parts]), sampled_labels=np.concatenate([p.sampled_labels for p in parts]),
        posterior={s: np.concatenate([p.posterior[s] for p in parts]) for s in sorted(sites)},
        seeds=[seed for p in parts for seed in p.seeds],
    )


# --- loading -------------------------------------------------------------------------------------------


def run_task_and_split(run_cfg: TrainConfig, run_dir: Path):
    """The run's task (falling back to the file recorded in split.json) and the split it used."""
    from blob_pyro.assembly import load_task, make_split
    from blob_pyro.data import load_split_file

    recorded = json.loads((run_dir / "split.json").read_text()) if (run_dir / "split.json").exists() else {}
    try:
        task = load_task(run_cfg)
    except FileNotFoundError:
        if "task" not in recorded:
            raise
        task = load_task(dataclasses.replace(run_cfg, task=recorded["task"]))
    if recorded:  # the split the run actually used, in file indices
        split = load_split_file(run_dir / "split.json", file_indices=task.file_indices)
    else:
        split = make_split(run_cfg, task)
    return task, split


@dataclass
class LoadedSVIRun:
    cfg: TrainConfig
    model: object
    guide: object
    data: object
    tokenizer: object
    device: torch.device


def load_svi_run(run_dir, cfg: Optional[TrainConfig] = None, *, device: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None) -> LoadedSVIRun:
    """Rebuild the model and guide of the SVI run in ``run_dir`` (its split from ``split.json``) and restore
    its parameters (names and shapes validated). ``dtype``: of the frozen base (default: the run's)."""
    import pyro

    from blob_pyro.assembly import build_guide, build_model, load_network, prepare_data, resolve_device, resolve_dtype
    from blob_pyro.checkpoint import load_adapter_and_guide

    run_dir = Path(run_dir)
    cfg = cfg or TrainConfig.load(run_dir / "config.json")
    pyro.clear_param_store()
    # A sequence classifier's new head is drawn at load time and frozen, and not saved with the adapters:
    # seeding as train does draws the same head again.
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(device or cfg.device)
    task, split = run_task_and_split(cfg, run_dir)
    network, tokenizer = load_network(cfg, task.num_choices, dtype=dtype or resolve_dtype(cfg.base_dtype, device))
    network.to(device)
    data = prepare_data(cfg, task, split, tokenizer)
    model = build_model(cfg, network, data)
    guide = build_guide(cfg, model).to(device)
    load_adapter_and_guide(run_dir, model, guide)  # raises if layer names or shapes differ
    model.eval()
    return LoadedSVIRun(cfg, model, guide, data, tokenizer, device)


def base_run_dir(run_dir: Path, cfg: TrainConfig, subdir: str = "base") -> Path:
    """The SVI run a baseline built on: ``--base-run`` if it was given (for ``base`` / ``member_0``), else its sub-run."""
    if cfg.base_run and subdir in ("base", "member_0"):
        path = Path(cfg.base_run)
        if not path.is_dir() and not path.is_absolute():
            raise FileNotFoundError(
                f"{run_dir} was fitted to --base-run {cfg.base_run}, a relative path that does not exist from here; "
                "run from the folder the run was started in"
            )
        return path
    return Path(run_dir) / subdir


def svi_predictive(run_dir, cfg: TrainConfig, *, device=None, dtype=None) -> GuidePredictive:
    loaded = load_svi_run(run_dir, cfg, device=device, dtype=dtype)
    guide = loaded.guide
    point = getattr(guide, "point_estimate", not guide.scores_prior)
    return GuidePredictive(
        method="svi", description=f"guide {cfg.guide}", cfg=loaded.cfg, model=loaded.model, data=loaded.data,
        tokenizer=loaded.tokenizer, device=loaded.device, point_estimate=point, guide=guide,
    )


def load_run_predictive(run_dir, *, device: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> RunPredictive:
    """The :class:`RunPredictive` of the finished run in ``run_dir``, whatever its ``--method``."""
    from blob_pyro.baselines import registered_methods

    run_dir = Path(run_dir)
    cfg = TrainConfig.load(run_dir / "config.json")
    if cfg.method == "svi":
        return svi_predictive(run_dir, cfg, device=device, dtype=dtype)
    return registered_methods()[cfg.method].load_predictive(run_dir, cfg, device=device, dtype=dtype)
