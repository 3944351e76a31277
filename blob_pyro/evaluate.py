"""Evaluate a finished run on one or more tasks: ``python -m blob_pyro.evaluate --run-dir DIR [--flags]``.

Reads top to bottom: run config -> checks that need no model (before the output folder is touched) ->
the run's predictive, whatever its ``--method`` (:mod:`blob_pyro.run_predictive`: an SVI guide's draws, MC
dropout draws, Laplace / TFB draws or the linearised probit predictive, the mixture of ensemble members;
rebuilt from ``config.json`` and validated against the run's safetensors) -> for each task: the method's
prediction modes and S draws -> metrics, InferenceData, uncertainty, OOD detection, plots. A ``--method temperature``
run is evaluated as its base run (model, split) with every class logit divided by its fitted T.

The first ``--eval-tasks`` entry is the in-distribution task, the others are OOD. ``run`` (the default)
names the run's own task, evaluated on the run's validation split (``split.json``); so is any task file
whose content equals the run's task file. Other tasks are evaluated as train's ``--eval-tasks`` are: a
stratified sample of their evaluation split, with a likelihood head for their own number of choices.

Output directory (default ``<run-dir>/evaluation``):

* ``metrics.json`` (written last: marks the evaluation finished): one block per task (role, source, n) with
  the method's modes: ``mean`` (posterior mean / point estimate, N = 0) and ``samples_<N>`` (average of N
  draws; omitted for point estimates, whose draws all agree); ``probit`` and ``linearised_<N>`` for Laplace
  with the probit predictive; ``ensemble_<M>`` (the mixture) for ensembles;
* ``inference_data_<task>.nc``: ArviZ InferenceData (NetCDF), see :mod:`blob_pyro.evaluation.inference_data`:
  its ``log_likelihood`` group holds ``--loo-examples`` of the run's TRAINING examples (what PSIS-LOO and
  WAIC assume the posterior was fitted to; the same examples in every task's file), the evaluated
  held-out examples are in ``posterior_predictive`` / ``observed_data``;
* ``metrics.json`` also gives each task's ``held_out_lpd``: the held-out log predictive density
  ``sum_i log mean_s p(y_i | theta_s)`` over the S draws (= ``-n * NLL`` of the averaged predictive), a
  held-out score in its own right, not a LOO estimate;
* ``uncertainty.json``: per-task uncertainty decomposition summaries, OOD detection (AUROC/AUPR by
  max-probability, entropy, mutual information), AURC, posterior std of A per site and, for guides with
  a per-site loc and scale, the weight-space size of the mean update against the sampled part
  (``weight_space_spread``, :mod:`blob_pyro.evaluation.weight_space`);
* ``per_example_<task>.json``: label, prediction, confidence, total/aleatoric/epistemic per example;
* ``plots/``: ``reliability_<task>.png``, ``uncertainty_histograms.png``, ``accuracy_coverage.png``,
  ``posterior_std.png`` (guides with a scale only);
* ``evaluate_config.json``, ``evaluate_run.json`` (examples used, timings, versions).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from blob_pyro.assembly import (
    batches, encode_examples, evaluation_positions, length_sorted, load_task, resolve_device, resolve_dtype,
)
from blob_pyro.config import TrainConfig, config_parser
from blob_pyro.data import ANSWER_LETTERS, MultipleChoiceTask
from blob_pyro.evaluation.inference_data import (
    build_inference_data, choose_posterior_sites, held_out_lpd, import_arviz,
    save_inference_data,
)
from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.evaluation.plots import (
    accuracy_coverage_plot, posterior_std_per_layer, reliability_diagram, uncertainty_histograms,
)
from blob_pyro.evaluation.report import results_table
from blob_pyro.evaluation.uncertainty import per_example_table, selective_prediction, summarize_tasks, uncertainty_decomposition
from blob_pyro.evaluation.weight_space import spread_by_layer
from blob_pyro.preflight import PreflightError, check_device, check_model, check_output_dir, check_run_dir
from blob_pyro.baselines.temperature import temperature_of_run
from blob_pyro.rundir import write_json_atomic
from blob_pyro.run_predictive import load_run_predictive, run_task_and_split

__all__ = ["EvaluateConfig", "evaluate", "main", "RUN_TASK"]

RUN_TASK = "run"


def _f(default, help: str, choices: Optional[Sequence] = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EvaluateConfig:
    """Evaluate a finished run (config.json + safetensors) on its own task and on OOD tasks."""

    run_dir: Optional[str] = _f(None, "finished run directory written by python -m blob_pyro.train (required)")
    eval_tasks: str = _f(RUN_TASK, "comma-separated tasks (same forms as train's --task: BIG-bench JSON, 'bundled:social_iqa', 'paper:<name>', tables) or 'run' (the run's own task, on its validation split); the first is in-distribution, the others OOD")
    eval_samples: int = _f(10, "posterior draws N per example (point-estimate guides use 1: every draw is the same)")
    max_examples: int = _f(400, "examples per task (0: all); the run's task takes the first of its validation split, other tasks a stratified sample seeded by the run's --split-seed (as train's --eval-task-size)")
    loo_examples: int = _f(200, "training examples (a subsample of the run's training split seeded by --seed; 0: all) whose pointwise log-likelihood under each draw forms the InferenceData log_likelihood group, the data az.loo / az.waic assume the posterior was fitted to")
    posterior_sites: str = _f("all", "sites whose posterior draws go into the InferenceData: 'all', 'none', names or suffixes ('q_proj,lm_head') or 're:<regex>'")
    eval_batch_size: int = _f(16, "evaluation batch size (memory is one batch and one draw of the adapters at a time)")
    draws_per_pass: int = _f(1, "posterior draws that share one network pass, stacked along the batch axis (same draws, same probabilities up to float rounding; faster on a GPU, D times the activation memory; MC dropout draws one pass per draw)")
    seed: Optional[int] = _f(None, "seed of the posterior draws (draw s is the same network for every task); default: the run's --seed, so samples_N repeats the run's own")
    num_bins: int = _f(15, "confidence bins of the ECE and the reliability diagram")
    output_dir: Optional[str] = _f(None, "output directory (default <run-dir>/evaluation)")
    overwrite: bool = _f(False, "allow replacing an earlier evaluation in the output directory")
    device: str = _f("auto", "auto (cuda if available), cpu or cuda[:i]")
    base_dtype: str = _f("run", "dtype of the frozen base model: run (the run's --base-dtype), auto, float32, bfloat16, float16", ["run", "auto", "float32", "bfloat16", "float16"])

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run-dir is required: the directory of a finished training run")
        for name in ("eval_samples", "eval_batch_size", "num_bins", "draws_per_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if isinstance(self.loo_examples, bool) or not isinstance(self.loo_examples, int) or self.loo_examples < 0:
            raise ValueError(f"--loo-examples must be an integer >= 0 (0: every training example), got {self.loo_examples!r}")
        if self.max_examples < 0:
            raise ValueError(f"--max-examples must be >= 0 (0: all), got {self.max_examples}")
        if not self.task_list:
            raise ValueError("--eval-tasks is empty; e.g. run,/path/to/strategyqa.json")

    @property
    def task_list(self) -> list[str]:
        return [t.strip() for t in self.eval_tasks.split(",") if t.strip()]

    @classmethod
    def from_argv(cls, argv: Optional[Sequence[str]] = None) -> "EvaluateConfig":
        args = config_parser(cls, prog="python -m blob_pyro.evaluate").parse_args(argv)
        try:
            return cls(**vars(args))
        except ValueError as err:
            raise SystemExit(f"python -m blob_pyro.evaluate: error: {err}") from None


@dataclass
class EvalTask:
    """One task to evaluate: which examples (positions in ``task.examples``) and its role."""

    name: str
    task: MultipleChoiceTask
    positions: list[int]
    role: str  # "in_distribution" or "ood"
    held_out: str  # how the examples were chosen


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _digest(path) -> Optional[str]:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def load_run_config(run_dir: Path) -> TrainConfig:
    """The run's TrainConfig, if it is a finished run (of any method; :func:`blob_pyro.preflight.check_run_dir`).
    Configs written before ``answer_scoring`` existed scored answer letters."""
    run_cfg = check_run_dir(run_dir)
    path = run_dir / "config.json"
    raw = json.loads(path.read_text())
    if "answer_scoring" not in raw and run_cfg.task_type == "causal_lm" and run_cfg.answer_scoring != "letters":
        log(f"{path} predates --answer-scoring: evaluating with 'letters', the only scoring that existed then")
        run_cfg = dataclasses.replace(run_cfg, answer_scoring="letters")
    return run_cfg


def resolve_eval_tasks(cfg: EvaluateConfig, run_cfg: TrainConfig, run_task, split) -> list[EvalTask]:
    run_digest = _digest(run_task.source)
    sample_cfg = dataclasses.replace(run_cfg, eval_task_size=cfg.max_examples)
    chosen, names = [], set()
    for i, spec in enumerate(cfg.task_list):
        role = "in_distribution" if i == 0 else "ood"
        same = spec in (RUN_TASK, run_cfg.task) or (run_digest is not None and Path(spec).is_file() and _digest(spec) == run_digest)
        if same:
            task = run_task
            positions = list(split.validation)[: cfg.max_examples or None]
            held_out = f"the run's validation split (first {len(positions)} of {len(split.validation)}; none seen in training)"
        else:
            try:
                task = load_task(run_cfg, spec, roles=("validation",))
            except (FileNotFoundError, ValueError, KeyError, OSError) as err:
                raise PreflightError(f"--eval-tasks {spec!r} cannot be loaded: {err}") from None
            positions = evaluation_positions(sample_cfg, task)
            held_out = (f"{len(positions)} examples of its evaluation split (whole file if none): stratified sample "
                        f"seeded by the run's --split-seed {run_cfg.split_seed}")
            if task.name == run_task.name:
                log(f"warning: {spec} is named {task.name!r} like the run's task but is not its file; "
                    "its examples may overlap the training set: pass 'run' to evaluate the held-out split")
        if task.name in names:
            raise ValueError(f"task {task.name!r} appears twice in --eval-tasks {cfg.eval_tasks!r}; list each task once")
        names.add(task.name)
        if run_cfg.task_type != "causal_lm" and task.num_choices != run_task.num_choices:
            raise ValueError(
                f"task {task.name!r} has {task.num_choices} classes but the run's sequence-classification head has "
                f"{run_task.num_choices}; evaluate it with a causal_lm run (its likelihood head adapts to K)"
            )
        chosen.append(EvalTask(task.name, task, positions, role, held_out))
    return chosen


def versions() -> dict:
    import transformers

    arviz = import_arviz()

    return {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
            "transformers": transformers.__version__, "arviz": arviz.__version__}


EVALUATION_FILES = ("metrics.json", "uncertainty.json", "evaluate_config.json", "evaluate_run.json")


def prepare_output_dir(cfg: EvaluateConfig, out: Path) -> Path:
    """Create the evaluation folder; with ``--overwrite`` first remove an earlier evaluation's files
    (``metrics.json`` first), so nothing of it survives next to the new one."""
    check_output_dir(out, overwrite=cfg.overwrite, flag="--output-dir", what="an evaluation")
    if cfg.overwrite and (out / "metrics.json").exists():
        (out / "metrics.json").unlink()
        for path in [*(out / f for f in EVALUATION_FILES), *out.glob("inference_data_*.nc"), *out.glob("per_example_*.json")]:
            path.unlink(missing_ok=True)
        shutil.rmtree(out / "plots", ignore_errors=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate ``cfg.run_dir``; returns ``{"metrics": ..., "uncertainty": ...}`` (also written to files)."""
    run_dir = Path(cfg.run_dir)
    run_cfg = load_run_config(run_dir)  # a finished run of any method, else a PreflightError
    if cfg.seed is None:  # the run's seed: the same draws as the run's own samples_N
        cfg = dataclasses.replace(cfg, seed=run_cfg.seed)
    out = Path(cfg.output_dir) if cfg.output_dir else run_dir / "evaluation"
    # Every check that needs no model, before the output directory is touched
    check_output_dir(out, overwrite=cfg.overwrite, flag="--output-dir", what="an evaluation")
    check_device(cfg.device)
    check_model(run_cfg.model, flag=f"the run's --model (config.json of {run_dir})")
    wall_start = time.perf_counter()
    ctx = load_evaluation(cfg, run_dir, run_cfg)  # the run's predictive (any method), the tasks, the LOO draws
    out = prepare_output_dir(cfg, out)
    (out / "evaluate_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")

    metrics, draws_by_task, examples_used, timings = {}, {}, {}, {}
    for et in ctx.tasks:
        start = time.perf_counter()
        metrics[et.name], draws_by_task[et.name], examples_used[et.name] = evaluate_task(cfg, ctx, et, out)
        timings[et.name] = time.perf_counter() - start
        log(f"{et.name}: {len(draws_by_task[et.name][1])} examples x ({ctx.num_draws} draws + mean) in {timings[et.name]:.1f} s")
    summary = uncertainty_summary(cfg, ctx, draws_by_task, out / "plots")

    write_json_atomic(out / "uncertainty.json", summary)
    write_json_atomic(out / "evaluate_run.json", {
        "wall_seconds": time.perf_counter() - wall_start, "task_seconds": timings, "device": str(ctx.device),
        "versions": versions(), "posterior_sites": ctx.posterior_sites, "examples": examples_used,
        "log_likelihood_train_file_indices": [int(i) for i in ctx.loo["train_example_ids"]],
    })
    write_json_atomic(out / "metrics.json", metrics)  # last: marks the evaluation finished
    print_results(metrics, summary, id_name=ctx.tasks[0].name)
    return {"metrics": metrics, "uncertainty": summary}


@dataclass
class EvaluationContext:
    """What every task's evaluation shares: the run's predictive (model, guide, data), the tasks, the number
    of draws, the sites recorded in the ``posterior`` group, the ``log_likelihood`` draws and file metadata."""

    run_cfg: TrainConfig
    predictive: object
    tasks: list
    device: torch.device
    num_draws: int
    posterior_sites: list
    loo: dict
    attrs: dict
    method: str


def load_evaluation(cfg: EvaluateConfig, run_dir: Path, run_cfg: TrainConfig) -> EvaluationContext:
    """The run's predictive, whatever its method (:mod:`blob_pyro.run_predictive`: rebuilt from ``config.json`` and
    validated against its safetensors; a ``--method temperature`` run is its base run with the logits divided by
    T), the tasks to evaluate, and the S draws on the ``--loo-examples`` training examples. Writes nothing."""
    pyro.clear_param_store()  # the global param store must not leak tensors between runs
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(cfg.device)
    scaled = temperature_of_run(run_dir)  # (base run, T) for a --method temperature run, else None
    model_dir, temperature = scaled if scaled else (run_dir, None)
    run_task, split = run_task_and_split(run_cfg, model_dir)
    tasks = resolve_eval_tasks(cfg, run_cfg, run_task, split)

    dtype = None if cfg.base_dtype == "run" else resolve_dtype(cfg.base_dtype, device)
    predictive = load_run_predictive(run_dir, device=cfg.device, dtype=dtype)
    predictive.draws_per_pass = cfg.draws_per_pass
    pyro.set_rng_seed(cfg.seed)  # loading seeded the RNG with the run's seed (a sequence classifier's new head)
    model, data = predictive.model, predictive.data
    for et in tasks:  # the run's own task: the predictive's copy (its model carries that task's head)
        if et.task is run_task:
            et.task = data.task
    num_draws = 1 if predictive.point_estimate else cfg.eval_samples
    method = run_cfg.method if run_cfg.method != "svi" else f"guide {run_cfg.guide}"
    log(f"run {run_dir}: {predictive.description}, {len(model.adapters)} adapters; "
        f"{num_draws} draw(s){' (point estimate: every draw is the same)' if predictive.point_estimate else ''}; tasks "
        + ", ".join(f"{t.name} ({'ID' if t.role == 'in_distribution' else 'OOD'}, {len(t.positions)})" for t in tasks))

    # Which sites go into the posterior group: the sample sites of one guide trace (none for MC dropout,
    # ensembles and the linearised Laplace predictive)
    probe = batches(data, data.validation, batch_size=1, device=device)[0]
    sites = predictive.sample_sites(probe)
    posterior_sites = choose_posterior_sites(sites, cfg.posterior_sites) if sites else []
    loo = loo_training_draws(cfg, data, data.task, predictive, num_draws, device)  # the log_likelihood group
    attrs = {
        "model": run_cfg.model, "method": run_cfg.method, "predictive": predictive.description, "guide": run_cfg.guide,
        "prior": run_cfg.prior, "prior_scale": run_cfg.prior_scale,
        "rank": run_cfg.rank, "target_modules": run_cfg.target_modules, "train_seed": run_cfg.seed,
        "run_dir": str(run_dir.resolve()), "run_task": run_task.name, "eval_seed": cfg.seed,
        "num_draws": num_draws, "versions": versions(), "run_config": run_cfg.to_dict(),
    }
    if temperature is not None:
        attrs.update({"temperature": temperature, "base_run_dir": str(model_dir.resolve())})
    return EvaluationContext(run_cfg=run_cfg, predictive=predictive, tasks=tasks, device=device, num_draws=num_draws,
                             posterior_sites=posterior_sites, loo=loo, attrs=attrs, method=method)


def evaluate_task(cfg: EvaluateConfig, ctx: EvaluationContext, et: EvalTask, out: Path) -> tuple[dict, tuple, dict]:
    """One task: the method's prediction modes and S draws -> metrics, InferenceData, per-example table and
    reliability diagram (written to ``out``). Returns ``(metrics block, (draws (S, n, K), labels (n,)),
    examples used)``."""
    predictive, task = ctx.predictive, et.task
    positions, encoded = length_sorted(et.positions, encode_examples(ctx.run_cfg, task, predictive.tokenizer,
                                                                     [task.examples[i] for i in et.positions]))
    task_batches = batches(predictive.data, encoded, batch_size=cfg.eval_batch_size, device=ctx.device)
    labels = encoded.labels.numpy()
    tmodel = predictive.model_for(task)
    draws = predictive.draws(tmodel, task_batches, num_samples=ctx.num_draws, seed=cfg.seed, posterior_sites=ctx.posterior_sites)
    file_ids = [int(task.file_indices[i]) if task.file_indices else int(i) for i in positions]
    block = {"role": et.role, "source": task.source, "examples": et.held_out, "n_examples": len(labels),
             "num_classes": task.num_choices}
    for mode, probs in predictive.modes(tmodel, task_batches, draws).items():  # the method's own predictives
        block[mode] = classification_metrics(probs, labels, num_bins=cfg.num_bins)
    block["held_out_lpd"] = held_out_lpd(draws.probs, labels)  # sum_i log mean_s p(y_i | theta_s) = -n * NLL

    idata = build_inference_data(
        draws.probs, labels, sampled_labels=draws.sampled_labels, posterior=draws.posterior,
        class_names=list(ANSWER_LETTERS[: task.num_choices]), example_ids=file_ids,
        **ctx.loo,
        attrs={**ctx.attrs, "task": et.name, "task_source": task.source, "role": et.role,
               "label_names": list(task.label_names) if task.label_names else None, "draw_seeds": draws.seeds},
    )
    save_inference_data(idata, out / f"inference_data_{_safe(et.name)}.nc")
    (out / f"per_example_{_safe(et.name)}.json").write_text(
        json.dumps(per_example_table(draws.probs, labels, file_ids), indent=1) + "\n")
    reliability_diagram(draws.probs.mean(0), labels, out / "plots" / f"reliability_{_safe(et.name)}.png", num_bins=cfg.num_bins,
                        title=f"{et.name} ({'ID' if et.role == 'in_distribution' else 'OOD'}), {ctx.method}, "
                              f"{'posterior mean' if predictive.point_estimate else f'{ctx.num_draws} draws'}")
    return block, (draws.probs, labels), {"source": task.source, "file_indices": file_ids}


def uncertainty_summary(cfg: EvaluateConfig, ctx: EvaluationContext, draws_by_task: dict, plots: Path) -> dict:
    """Uncertainty decomposition and OOD detection of every task against the first, posterior std of A per
    site and the weight-space spread (guides with a per-site loc and scale), and the plots of them."""
    tasks, guide, run_cfg = ctx.tasks, ctx.predictive.guide, ctx.run_cfg
    id_name = tasks[0].name
    summary = summarize_tasks(draws_by_task, id_task=id_name, num_bins=cfg.num_bins)
    summary["num_draws"] = ctx.num_draws
    if ctx.predictive.point_estimate:
        summary["note"] = "point-estimate predictive: one draw, so epistemic uncertainty (mutual information) is 0 by construction"
    if any(t.task.num_choices != tasks[0].task.num_choices for t in tasks):
        summary["note_num_classes"] = ("tasks differ in K: raw entropies are bounded by log K, so compare the "
                                       "*_normalized OOD scores (divided by log K) as well")
    title = f"{ctx.method}, {ctx.num_draws} draw(s)"
    parts = {name: uncertainty_decomposition(probs) for name, (probs, _) in draws_by_task.items()}
    curves = {name: selective_prediction(probs, labels) for name, (probs, labels) in draws_by_task.items()}
    uncertainty_histograms(parts, plots / "uncertainty_histograms.png", id_task=id_name,
                           num_classes={t.name: t.task.num_choices for t in tasks}, title=f"Uncertainty, ID ({id_name}) vs OOD; {title}")
    accuracy_coverage_plot(curves, plots / "accuracy_coverage.png", title=f"Selective prediction ({title})")
    if guide is not None and guide.has_loc_and_scale():
        with torch.no_grad():
            stds = {site: guide.loc_and_scale(site)[1].float().cpu().numpy() for site in guide.site_names}
        summary["posterior_std"] = {site: {"mean": float(s.mean()), "median": float(np.median(s)), "max": float(s.max())}
                                    for site, s in stds.items()}
        posterior_std_per_layer(stds, plots / "posterior_std.png", prior_scale=run_cfg.prior_scale,
                                title=f"Posterior std of LoRA A per layer (guide {run_cfg.guide}, prior {run_cfg.prior})")
    if guide is not None and guide.has_loc_and_scale() and not guide.bayesian_B:
        summary["weight_space_spread"] = spread_by_layer(ctx.predictive.model, guide)
    return summary


def print_results(metrics: dict, summary: dict, *, id_name: str) -> None:
    for name, block in metrics.items():
        modes = {k: v for k, v in block.items() if isinstance(v, dict)}
        print(results_table(modes, title=f"\n{name} ({block['role']}, n = {block['n_examples']})"))
    for name, scores in summary["ood_detection"].items():
        print(f"\nOOD {name} vs {id_name}: " + ", ".join(f"AUROC[{k}] {v['auroc']:.3f}" for k, v in scores.items()))


def loo_training_draws(cfg: EvaluateConfig, data, run_task, predictive, num_draws: int, device) -> dict:
    """``build_inference_data`` keyword arguments for the ``log_likelihood`` group: the S draws of the run's
    predictive (:meth:`RunPredictive.draws`, seeded by ``cfg.seed``, so the same networks as every task's) on
    ``cfg.loo_examples`` training examples, a subsample seeded by ``cfg.seed`` (0: all).

    Returns ``{"train_probs": (S, m, K), "train_labels": (m,), "train_example_ids": (m,) task-file indices}``.
    """
    n_train = len(data.train.labels)
    size = n_train if cfg.loo_examples == 0 else min(cfg.loo_examples, n_train)
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(n_train, size=size, replace=False))
    positions, encoded = length_sorted([data.split.train[i] for i in chosen], data.train.select(chosen.tolist()))
    train_batches = batches(data, encoded, batch_size=cfg.eval_batch_size, device=device)
    draws = predictive.draws(predictive.model, train_batches, num_samples=num_draws, seed=cfg.seed)
    file_ids = [int(run_task.file_indices[i]) if run_task.file_indices else int(i) for i in positions]
    log(f"log_likelihood group: {size} of {n_train} training examples x {num_draws} draw(s)")
    return {"train_probs": draws.probs, "train_labels": encoded.labels.numpy(), "train_example_ids": file_ids}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = EvaluateConfig.from_argv(argv)
    try:
        return evaluate(cfg)
    except PreflightError as err:  # a bad input found before anything was written: the message, no traceback
        raise SystemExit(f"python -m blob_pyro.evaluate: error: {err}") from None


if __name__ == "__main__":
    main()
