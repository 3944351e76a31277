"""Evaluate a finished run on one or more tasks: ``python -m blob_pyro.evaluate --run-dir DIR [--flags]``.

Reads top to bottom: run config -> base model, adapters, guide (rebuilt from ``config.json`` and
validated against ``adapter.safetensors`` / ``guide.safetensors``) -> for each task: posterior-mean
pass and N posterior draws -> metrics, InferenceData, uncertainty, plots. A ``--method temperature`` run
is evaluated as its base run (model, split) with every class logit divided by its fitted T.

The first ``--eval-tasks`` entry is the in-distribution task, the others are OOD. ``run`` (the default)
names the run's own task, evaluated on the run's validation split (``split.json``); so is any task file
whose content equals the run's task file. Other tasks are evaluated as train's ``--eval-tasks`` are: a
stratified sample of their evaluation split, with a likelihood head for their own number of choices.

Output directory (default ``<run-dir>/evaluation``):

* ``metrics.json``: one block per task (role, source, n) with modes ``mean`` (posterior mean, N = 0)
  and ``samples_<N>`` (average of N draws; omitted for point-estimate guides, whose draws all agree);
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
    batches, build_guide, build_model, encode_examples, evaluation_positions, load_network, load_task, make_split,
    length_sorted, prepare_data, resolve_device, resolve_dtype, uses_answer_letters,
)
from blob_pyro.baselines.temperature import TemperatureScaledHead, temperature_of_run
from blob_pyro.checkpoint import load_adapter_and_guide
from blob_pyro.config import TrainConfig, config_parser
from blob_pyro.data import ANSWER_LETTERS, MultipleChoiceTask, answer_token_ids, load_split_file
from blob_pyro.evaluation.inference_data import (
    build_inference_data, choose_posterior_sites, draw_predictive, guide_sample_sites, held_out_lpd, import_arviz,
    save_inference_data,
)
from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.evaluation.plots import (
    accuracy_coverage_plot, posterior_std_per_layer, reliability_diagram, uncertainty_histograms,
)
from blob_pyro.evaluation.predictive import posterior_mean_probs
from blob_pyro.evaluation.report import mode_name, results_table
from blob_pyro.evaluation.uncertainty import per_example_table, selective_prediction, summarize_tasks, uncertainty_decomposition
from blob_pyro.evaluation.weight_space import spread_by_layer
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, ChoiceLikelihoodHead, SequenceClassificationHead

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
    seed: int = _f(0, "seed of the posterior draws (draw s is the same network for every task)")
    num_bins: int = _f(15, "confidence bins of the ECE and the reliability diagram")
    output_dir: Optional[str] = _f(None, "output directory (default <run-dir>/evaluation)")
    overwrite: bool = _f(False, "allow replacing an earlier evaluation in the output directory")
    device: str = _f("auto", "auto (cuda if available), cpu or cuda[:i]")
    base_dtype: str = _f("run", "dtype of the frozen base model: run (the run's --base-dtype), auto, float32, bfloat16, float16", ["run", "auto", "float32", "bfloat16", "float16"])

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run-dir is required: the directory of a finished training run")
        for name in ("eval_samples", "eval_batch_size", "num_bins"):
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


def load_run(run_dir: Path) -> TrainConfig:
    """The run's TrainConfig. Configs written before ``answer_scoring`` existed scored answer letters."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist; pass the --output-dir of a training run")
    path = run_dir / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {run_dir} is not a run directory written by blob_pyro.train")
    run_cfg = TrainConfig.load(path)
    raw = json.loads(path.read_text())
    if "answer_scoring" not in raw and run_cfg.task_type == "causal_lm" and run_cfg.answer_scoring != "letters":
        log(f"{path} predates --answer-scoring: evaluating with 'letters', the only scoring that existed then")
        run_cfg = dataclasses.replace(run_cfg, answer_scoring="letters")
    if run_cfg.method != "svi":
        raise ValueError(
            f"{run_dir} is a --method {run_cfg.method} run; blob_pyro.evaluate rebuilds a guide from adapter.safetensors "
            "and guide.safetensors, which only --method svi runs write: evaluate an SVI run"
        )
    return run_cfg


def run_task_and_split(run_cfg: TrainConfig, run_dir: Path):
    """The run's task (falling back to the file recorded in split.json) and the split it used."""
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
            task = load_task(run_cfg, spec, roles=("validation",))
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


def task_model(run_cfg: TrainConfig, network, tokenizer, task: MultipleChoiceTask, device, *,
               temperature: Optional[float] = None) -> BayesianLoRAModel:
    """The adapted network with a likelihood head for ``task`` (its own K; as train's OOD evaluation),
    its logits divided by ``temperature`` if given."""
    if uses_answer_letters(run_cfg):
        head = AnswerTokenHead(answer_token_ids(tokenizer, task.num_choices))
    elif run_cfg.task_type == "causal_lm":
        head = ChoiceLikelihoodHead(task.num_choices)
    else:
        head = SequenceClassificationHead(task.num_choices)
    if temperature is not None:
        head = TemperatureScaledHead(head, temperature)
    return BayesianLoRAModel(network, head).to(device).eval()


def versions() -> dict:
    import transformers

    arviz = import_arviz()

    return {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
            "transformers": transformers.__version__, "arviz": arviz.__version__}


def prepare_output_dir(cfg: EvaluateConfig, run_dir: Path) -> Path:
    out = Path(cfg.output_dir) if cfg.output_dir else run_dir / "evaluation"
    if (out / "metrics.json").exists() and not cfg.overwrite:
        raise SystemExit(f"error: {out} already holds an evaluation (metrics.json); pass --overwrite or choose another --output-dir")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Evaluate ``cfg.run_dir``; returns ``{"metrics": ..., "uncertainty": ...}`` (also written to files)."""
    run_dir = Path(cfg.run_dir)
    scaled = temperature_of_run(run_dir)  # (base run, T) for a --method temperature run, else None
    model_dir, temperature = scaled if scaled else (run_dir, None)
    run_cfg = load_run(model_dir)
    out = prepare_output_dir(cfg, run_dir)
    (out / "evaluate_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    pyro.clear_param_store()  # the global param store must not leak tensors between runs
    pyro.set_rng_seed(cfg.seed)
    device = resolve_device(cfg.device)
    wall_start = time.perf_counter()

    # The run's model, rebuilt from its config and validated against its files
    run_task, split = run_task_and_split(run_cfg, model_dir)
    pyro.set_rng_seed(run_cfg.seed)  # a sequence classifier's frozen new head is drawn at load time, as in training
    network, tokenizer = load_network(run_cfg, run_task.num_choices, dtype=resolve_dtype(run_cfg.base_dtype if cfg.base_dtype == "run" else cfg.base_dtype, device))
    network.to(device)
    data = prepare_data(run_cfg, run_task, split, tokenizer)
    model = build_model(run_cfg, network, data)
    guide = build_guide(run_cfg, model).to(device)
    load_adapter_and_guide(model_dir, model, guide)  # raises if layer names or shapes differ
    if temperature is not None:
        model.head = TemperatureScaledHead(model.head, temperature)
        log(f"temperature-scaled run: base run {model_dir}, class logits divided by T = {temperature:.4g}")
    pyro.set_rng_seed(cfg.seed)
    model.eval()
    point_estimate = guide.point_estimate
    num_draws = 1 if point_estimate else cfg.eval_samples
    tasks = resolve_eval_tasks(cfg, run_cfg, run_task, split)
    log(f"run {run_dir}: guide {run_cfg.guide}, {len(model.adapters)} adapters; "
        f"{num_draws} draw(s){' (point estimate: every draw is the same)' if point_estimate else ''}; tasks "
        + ", ".join(f"{t.name} ({'ID' if t.role == 'in_distribution' else 'OOD'}, {len(t.positions)})" for t in tasks))

    # Which guide sites go into the posterior group: the sample sites of one guide trace
    probe = batches(data, data.validation, batch_size=1, device=device)[0]
    posterior_sites = choose_posterior_sites(guide_sample_sites(guide, probe), cfg.posterior_sites)

    # The log_likelihood group: the same S draws on a seeded subsample of the training examples
    loo = loo_training_draws(cfg, data, run_task, model, guide, num_draws, device)

    metrics, draws_by_task, parts, curves, examples_used, timings = {}, {}, {}, {}, {}, {}
    common_attrs = {
        "model": run_cfg.model, "guide": run_cfg.guide, "prior": run_cfg.prior, "prior_scale": run_cfg.prior_scale,
        "rank": run_cfg.rank, "target_modules": run_cfg.target_modules, "train_seed": run_cfg.seed,
        "run_dir": str(run_dir.resolve()), "run_task": run_task.name, "eval_seed": cfg.seed,
        "num_draws": num_draws, "versions": versions(), "run_config": run_cfg.to_dict(),
    }
    if temperature is not None:
        common_attrs.update({"temperature": temperature, "base_run_dir": str(model_dir.resolve())})
    for et in tasks:
        start = time.perf_counter()
        task = et.task
        positions, encoded = length_sorted(et.positions, encode_examples(run_cfg, task, tokenizer, [task.examples[i] for i in et.positions]))
        task_batches = batches(data, encoded, batch_size=cfg.eval_batch_size, device=device)
        labels = encoded.labels.numpy()
        tmodel = model if task is run_task else task_model(run_cfg, network, tokenizer, task, device, temperature=temperature)
        mean_probs = posterior_mean_probs(tmodel, guide, task_batches).numpy()
        draws = draw_predictive(tmodel, guide, task_batches, num_samples=num_draws, seed=cfg.seed, posterior_sites=posterior_sites)
        file_ids = [int(task.file_indices[i]) if task.file_indices else int(i) for i in positions]
        block = {"role": et.role, "source": task.source, "examples": et.held_out, "n_examples": len(labels),
                 "num_classes": task.num_choices, "mean": classification_metrics(mean_probs, labels, num_bins=cfg.num_bins)}
        if not point_estimate:
            block[mode_name(num_draws)] = classification_metrics(draws.probs.mean(0), labels, num_bins=cfg.num_bins)
        block["held_out_lpd"] = held_out_lpd(draws.probs, labels)  # sum_i log mean_s p(y_i | theta_s) = -n * NLL
        metrics[et.name] = block
        draws_by_task[et.name] = (draws.probs, labels)
        parts[et.name] = uncertainty_decomposition(draws.probs)
        curves[et.name] = selective_prediction(draws.probs, labels)
        examples_used[et.name] = {"source": task.source, "file_indices": file_ids}

        idata = build_inference_data(
            draws.probs, labels, sampled_labels=draws.sampled_labels, posterior=draws.posterior,
            class_names=list(ANSWER_LETTERS[: task.num_choices]), example_ids=file_ids,
            **loo,
            attrs={**common_attrs, "task": et.name, "task_source": task.source, "role": et.role,
                   "label_names": list(task.label_names) if task.label_names else None, "draw_seeds": draws.seeds},
        )
        save_inference_data(idata, out / f"inference_data_{_safe(et.name)}.nc")
        (out / f"per_example_{_safe(et.name)}.json").write_text(
            json.dumps(per_example_table(draws.probs, labels, file_ids), indent=1) + "\n")
        reliability_diagram(draws.probs.mean(0), labels, out / "plots" / f"reliability_{_safe(et.name)}.png", num_bins=cfg.num_bins,
                            title=f"{et.name} ({'ID' if et.role == 'in_distribution' else 'OOD'}), guide {run_cfg.guide}, "
                                  f"{'posterior mean' if point_estimate else f'{num_draws} draws'}")
        timings[et.name] = time.perf_counter() - start
        log(f"{et.name}: {len(labels)} examples x ({num_draws} draws + mean) in {timings[et.name]:.1f} s")

    # Uncertainty, OOD detection, plots
    id_name = tasks[0].name
    summary = summarize_tasks(draws_by_task, id_task=id_name, num_bins=cfg.num_bins)
    summary["num_draws"] = num_draws
    if point_estimate:
        summary["note"] = "point-estimate guide: one draw, so epistemic uncertainty (mutual information) is 0 by construction"
    if any(t.task.num_choices != tasks[0].task.num_choices for t in tasks):
        summary["note_num_classes"] = ("tasks differ in K: raw entropies are bounded by log K, so compare the "
                                       "*_normalized OOD scores (divided by log K) as well")
    plots = out / "plots"
    title = f"guide {run_cfg.guide}, {num_draws} draw(s)"
    uncertainty_histograms(parts, plots / "uncertainty_histograms.png", id_task=id_name,
                           num_classes={t.name: t.task.num_choices for t in tasks}, title=f"Uncertainty, ID ({id_name}) vs OOD; {title}")
    accuracy_coverage_plot(curves, plots / "accuracy_coverage.png", title=f"Selective prediction ({title})")
    if guide.has_loc_and_scale():
        with torch.no_grad():
            stds = {site: guide.loc_and_scale(site)[1].float().cpu().numpy() for site in guide.site_names}
        summary["posterior_std"] = {site: {"mean": float(s.mean()), "median": float(np.median(s)), "max": float(s.max())}
                                    for site, s in stds.items()}
        posterior_std_per_layer(stds, plots / "posterior_std.png", prior_scale=run_cfg.prior_scale,
                                title=f"Posterior std of LoRA A per layer (guide {run_cfg.guide}, prior {run_cfg.prior})")
    if guide.has_loc_and_scale() and not guide.bayesian_B:
        summary["weight_space_spread"] = spread_by_layer(model, guide)

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "uncertainty.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "evaluate_run.json").write_text(json.dumps({
        "wall_seconds": time.perf_counter() - wall_start, "task_seconds": timings, "device": str(device),
        "versions": versions(), "posterior_sites": posterior_sites, "examples": examples_used,
        "log_likelihood_train_file_indices": [int(i) for i in loo["train_example_ids"]],
    }, indent=2) + "\n")
    for name, block in metrics.items():
        modes = {k: v for k, v in block.items() if isinstance(v, dict)}
        print(results_table(modes, title=f"\n{name} ({block['role']}, n = {block['n_examples']})"))
    for name, scores in summary["ood_detection"].items():
        print(f"\nOOD {name} vs {id_name}: " + ", ".join(f"AUROC[{k}] {v['auroc']:.3f}" for k, v in scores.items()))
    return {"metrics": metrics, "uncertainty": summary}


def loo_training_draws(cfg: EvaluateConfig, data, run_task, model, guide, num_draws: int, device) -> dict:
    """``build_inference_data`` keyword arguments for the ``log_likelihood`` group: the S draws of
    :func:`draw_predictive` (seeded by ``cfg.seed``, so the same networks as every task's) on
    ``cfg.loo_examples`` training examples, a subsample seeded by ``cfg.seed`` (0: all).

    Returns ``{"train_probs": (S, m, K), "train_labels": (m,), "train_example_ids": (m,) task-file indices}``.
    """
    n_train = len(data.train.labels)
    size = n_train if cfg.loo_examples == 0 else min(cfg.loo_examples, n_train)
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(n_train, size=size, replace=False))
    positions, encoded = length_sorted([data.split.train[i] for i in chosen], data.train.select(chosen.tolist()))
    train_batches = batches(data, encoded, batch_size=cfg.eval_batch_size, device=device)
    draws = draw_predictive(model, guide, train_batches, num_samples=num_draws, seed=cfg.seed)
    file_ids = [int(run_task.file_indices[i]) if run_task.file_indices else int(i) for i in positions]
    log(f"log_likelihood group: {size} of {n_train} training examples x {num_draws} draw(s)")
    return {"train_probs": draws.probs, "train_labels": encoded.labels.numpy(), "train_example_ids": file_ids}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return evaluate(EvaluateConfig.from_argv(argv))


if __name__ == "__main__":
    main()
