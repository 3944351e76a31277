"""Fine-tune a language model with a Bayesian LoRA adapter: ``python -m blob_pyro.train [--flags]``.

Reads top to bottom: config -> task and split -> tokens -> model, prior, guide -> zero-shot evaluation ->
SVI training -> evaluation (posterior mean and N samples) -> files. ``python -m blob_pyro.train --help``
lists every option.

Output directory: ``config.json``, ``split.json``, ``adapter.safetensors``, ``guide.safetensors``,
``metrics.json`` (one entry per prediction mode: ``zero_shot``, ``mean``, ``samples_N``; with ``--eval-tasks``
also ``"ood": {task: {"mean": ..., "samples_N": ...}}`` and ``"ood_detection": {task: {score: {"auroc", "aupr",
...}}}``; written last and atomically: it marks the run finished), ``run.json`` (timings, versions), ``train_log.jsonl``.
Inputs are checked before the output directory is touched (:mod:`blob_pyro.preflight`); ``--overwrite`` removes
the old run's files, ``metrics.json`` first, right before the new run writes (:mod:`blob_pyro.rundir`).
While training: ``checkpoint.safetensors`` (every ``--checkpoint-every`` steps, at the end of training and on
SIGTERM/SIGINT; removed once ``metrics.json`` is written), which ``--resume`` continues from (:mod:`blob_pyro.resume`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pyro
import torch
from tqdm.auto import tqdm

from blob_pyro.assembly import (
    batches, build_guide, uses_answer_letters, build_model, build_objective, enable_activation_checkpointing, encode_examples, evaluation_positions, load_network, load_task,
    length_sorted, prepare_data, resolve_device, resolve_dtype, training_batches,
)
from blob_pyro.checkpoint import save_adapter_and_guide
from blob_pyro.config import TrainConfig
from blob_pyro.data import answer_token_ids, task_spec_name
from blob_pyro.distributed import DataParallel, check_divisible_epochs, environment_world_size
from blob_pyro.interrupt import Interrupted, stop_on_signals
from blob_pyro.ood_eval import detection_blocks
from blob_pyro.preflight import PreflightError, check_output_dir, check_train_inputs
from blob_pyro.rundir import clear_run_dir, save_predictions, write_json_atomic, write_split
from blob_pyro.resume import (
    check_optimiser_state_restored, checkpoint_path, continue_train_log, open_for_resume, restore_training_state, save_checkpoint,
)
from blob_pyro.evaluation.metrics import classification_metrics
from blob_pyro.evaluation.predictive import posterior_mean_probs
from blob_pyro.evaluation.weight_space import posterior_trace
from blob_pyro.evaluation.report import evaluate_modes, results_table
from blob_pyro.models import AnswerTokenHead, ChoiceLikelihoodHead
from blob_pyro.peft_adapter import (
    check_adapter_config, check_adapter_modules, init_lora_B_from_peft, peft_init_loc_fn, read_peft_adapter,
)

__all__ = ["main", "train"]


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def prepare_output_dir(cfg: TrainConfig) -> Path:
    """Create ``--output-dir``; with ``--overwrite`` (not ``--resume``) first remove the old run's files,
    ``metrics.json`` first (:func:`blob_pyro.rundir.clear_run_dir`; a baseline keeps its sub-runs, which it
    reuses only if their config matches). Call it after every check, right before the first run file."""
    out = Path(cfg.output_dir)
    check_output_dir(out, overwrite=cfg.overwrite, resume=cfg.resume and cfg.method == "svi")
    if cfg.overwrite and not cfg.resume:
        clear_run_dir(out, keep_sub_runs=cfg.method != "svi", log=log)
    out.mkdir(parents=True, exist_ok=True)
    return out


def versions() -> dict:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
            "transformers": transformers.__version__}


def train(cfg: TrainConfig) -> dict:
    """Run one configuration end to end; returns ``metrics`` (also written to ``metrics.json``).

    Under ``torchrun`` (blob_pyro.distributed) every process trains on its shard of each global batch of
    ``processes * batch_size`` examples; rank 0 alone writes files and evaluates, the others return ``{}``.
    """
    checked = check_train_inputs(cfg)  # every check that needs no model, before the output directory is touched
    peft_adapter = read_initial_adapter(cfg)  # before any file is written: a bad adapter fails fast
    if cfg.method != "svi":  # baselines that are not one SVI run (blob_pyro.baselines)
        return run_baseline(cfg)
    run = assemble_run(cfg, checked, peft_adapter)  # model, guide, objective; the checks that need the model
    if run.parallel.is_main:  # every check passed: now the run's files; rank 0 alone writes
        write_run_start(cfg, run)
    metrics = evaluate_before_training(cfg, run)
    if peft_adapter is not None:  # after the zero-shot pass: with B = 0 the model is the base model whatever M is
        init_lora_B_from_peft(run.model, peft_adapter)
        log(f"initialised M and B of {len(peft_adapter.module_paths)} layers from the PEFT adapter {cfg.init_from_peft}")
    train_seconds, resumed_at = run_training_loop(cfg, run, metrics)
    if run.parallel.active:
        difference = run.parallel.max_parameter_difference()
        if difference > 0:
            log(f"warning: trained parameters differ across the {run.parallel.world_size} processes by up to {difference:.3g}")
        if not run.parallel.is_main:  # rank 0 alone evaluates and writes files; the others wait in the group
            wait_for_run_end(run.parallel)
            return {}
    try:
        run.model.eval()  # a guide completed from the data after SVI (the Laplace autoguide's covariance) does it now
        run.guide.post_fit(batches(run.data, run.data.train, batch_size=cfg.eval_batch_size, device=run.device))
        save_adapter_and_guide(run.out, run.model, run.guide)
        timings = evaluate_after_training(cfg, run, metrics)
        write_run_end(cfg, run, metrics, {**timings, "train_seconds": train_seconds, "resumed_at_steps": resumed_at})
    except BaseException:
        if run.parallel.active:
            run.parallel.wait_for_main(failed=True)  # the waiting processes raise too, instead of timing out
        raise
    if run.parallel.active:
        run.parallel.wait_for_main()  # release the others: every run file is written
    return metrics


def wait_for_run_end(parallel: DataParallel) -> None:
    """On a process other than rank 0, after training: stay in the process group until rank 0 has evaluated
    and written the run files (at most ``--dist-timeout-minutes``). A process that left at once tore its gloo
    group down while rank 0 still evaluated; that could abort it at exit, and torchrun then stops rank 0
    mid-evaluation. Raises when rank 0 failed, so that the launcher sees every process fail."""
    if parallel.wait_for_main():
        raise RuntimeError("rank 0 failed after training (post-fit, evaluation or writing the run files); see its error above")


def run_baseline(cfg: TrainConfig) -> dict:
    """A ``--method`` other than ``svi`` (:mod:`blob_pyro.baselines`): one process, its own run files."""
    if environment_world_size() > 1:
        raise ValueError(f"--method {cfg.method} runs in one process; launch it without torchrun "
                         f"(found WORLD_SIZE={environment_world_size()})")
    from blob_pyro.baselines import run_method

    prepare_output_dir(cfg)
    return run_method(cfg)


@dataclass
class AssembledRun:
    """What :func:`assemble_run` builds for one SVI run: where it writes, the processes, the tokenized data
    and its evaluation batches, the model, guide and objective, and the checkpoint to resume from (if any)."""

    out: Path
    parallel: DataParallel
    device: torch.device
    checkpoint: object
    wall_start: float
    task: object
    data: object
    val_batches: list
    labels: torch.Tensor
    ood_sets: dict
    model: object
    guide: object
    objective: object
    global_batch: int  # examples per step over all processes


def assemble_run(cfg: TrainConfig, checked, peft_adapter) -> AssembledRun:
    """Task and split (from the preflight checks), tokens (tokenized once), model, prior, guide and objective;
    the checks that need the model run here, before any run file is written."""
    out = Path(cfg.output_dir)
    parallel = DataParallel.from_environment(cfg.device, timeout_minutes=cfg.dist_timeout_minutes)
    if cfg.gradient_checkpointing and parallel.active and cfg.flipout != "none":
        # the recomputation may run on autograd's device threads, outside this process's global_batch_rows
        raise ValueError("--gradient-checkpointing with flipout under torchrun could draw other flipout signs when "
                         f"the backward pass recomputes a layer (--flipout is {cfg.flipout!r}, also set by --recipe "
                         "official): pass --flipout none or drop --gradient-checkpointing")
    device = resolve_device(cfg.device)
    checkpoint = None
    if cfg.resume or not cfg.overwrite:  # --resume: read and check it before writing anything
        checkpoint = open_for_resume(cfg, out, device.type)
    pyro.clear_param_store()  # the global param store must not leak tensors between runs
    pyro.set_rng_seed(cfg.seed)
    pyro.enable_validation(False)  # ~15% faster steps; the unit tests run with validation on
    wall_start = time.perf_counter()

    task, split = checked.task, checked.split
    log(f"task {task.name}: {len(task)} examples, {task.num_choices} choices; train {len(split.train)}, validation {len(split.validation)}")
    network, tokenizer = load_network(cfg, task.num_choices, dtype=resolve_dtype(cfg.base_dtype, device))
    network.to(device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(network)
    data = prepare_data(cfg, task, split, tokenizer)  # validation in length order: split.json and predictions follow it
    val_batches = batches(data, data.validation, batch_size=cfg.eval_batch_size, device=device)
    ood_sets = prepare_ood_tasks(cfg, data, tokenizer, device)  # before training: a bad --eval-tasks fails fast

    model = build_model(cfg, network, data)
    if peft_adapter is not None:
        check_adapter_modules(peft_adapter, model, target_modules=cfg.target_modules)
    guide = build_guide(cfg, model, init_loc_fn=peft_init_loc_fn(peft_adapter) if peft_adapter else None).to(device)
    objective = build_objective(cfg, model, guide, num_data=len(data.train), processes=parallel.world_size)
    if parallel.active:
        check_divisible_epochs(len(data.train), cfg.batch_size * parallel.world_size, parallel.world_size)
        parallel.attach(objective)
        parallel.broadcast_parameters([p for p in model.parameters() if p.requires_grad] + list(guide.parameters()))
    log(f"adapted {len(model.adapters)} layers; trainable: "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad) + sum(p.numel() for p in guide.parameters()):,} numbers")
    return AssembledRun(out=out, parallel=parallel, device=device, checkpoint=checkpoint, wall_start=wall_start, task=task,
                        data=data, val_batches=val_batches, labels=data.validation.labels, ood_sets=ood_sets, model=model,
                        guide=guide, objective=objective, global_batch=cfg.batch_size * parallel.world_size)


def write_run_start(cfg: TrainConfig, run: AssembledRun) -> None:
    """``--overwrite`` removes the old run's files, then ``config.json`` and ``split.json`` (rank 0 only)."""
    run.out = prepare_output_dir(cfg)
    dataclasses.replace(cfg, resume=False).save(run.out / "config.json")
    write_split(run.out, run.task.source, run.data.split.remap(run.task.file_indices).to_dict())


def evaluate_before_training(cfg: TrainConfig, run: AssembledRun) -> dict:
    """The metrics known before training: the checkpoint's (evaluated before an interruption), or the
    zero-shot evaluation (``--zero-shot``, rank 0): B = 0 at initialisation, so the adapted model is
    exactly the base model."""
    run.model.eval()
    if run.checkpoint is not None:
        return dict(run.checkpoint.state["metrics"])
    metrics = {}
    if cfg.zero_shot and run.parallel.is_main:
        start = time.perf_counter()
        metrics["zero_shot"] = classification_metrics(posterior_mean_probs(run.model, run.guide, run.val_batches).numpy(),
                                                      run.labels.numpy())
        n = len(run.labels)
        log(f"zero-shot evaluation: {n} examples in {time.perf_counter() - start:.1f} s "
            f"({n / (time.perf_counter() - start):.1f} examples/s)")
        log(f"zero-shot: acc {100 * metrics['zero_shot']['acc']:.2f}%  ECE {metrics['zero_shot']['ece']:.2f}%  NLL {metrics['zero_shot']['nll']:.3f}")
    return metrics


def interrupted(stop, done: int, max_steps: int, path: Path) -> Interrupted:
    """The exception that ends a run stopped by a signal after step ``done``, its checkpoint at ``path``."""
    message = (f"{stop.name} received: stopped after step {done} of {max_steps}; checkpoint written to "
               f"{path}. Continue with the same command plus --resume (--output-dir {path.parent} --resume)")
    log(message)
    return Interrupted(stop.signum, message)


def run_training_loop(cfg: TrainConfig, run: AssembledRun, metrics: dict) -> tuple[float, list]:
    """SVI steps up to ``--max-steps``, resumable: parameters, optimisers, RNG and data position come from the
    checkpoint. Writes ``train_log.jsonl`` and checkpoints (every ``--checkpoint-every`` steps, at the end and
    on SIGTERM/SIGINT, which then raises :class:`Interrupted`). Returns ``(train seconds, resumed_at steps)``."""
    model, guide, objective, parallel, out, checkpoint = run.model, run.guide, run.objective, run.parallel, run.out, run.checkpoint
    model.train()
    start_step, position, resumed_at, earlier_train_seconds = 0, (0, 0), [], 0.0
    if checkpoint is not None:
        position = restore_training_state(checkpoint, model=model, guide=guide, objective=objective, device=run.device,
                                          stream_batches_per_epoch=math.ceil(len(run.data.train) / run.global_batch))
        start_step, earlier_train_seconds = checkpoint.step, checkpoint.state["train_seconds"]
        resumed_at = [*checkpoint.state["resumed_at"], start_step]
        log(f"resuming from {checkpoint.path} at step {start_step} of {cfg.max_steps}")
    stream = training_batches(run.data, batch_size=run.global_batch, seed=cfg.seed, device=run.device, position=position)
    train_start = time.perf_counter()
    train_log = continue_train_log(out / "train_log.jsonl", checkpoint, log) if parallel.is_main else open(os.devnull, "w")
    with train_log as log_file, stop_on_signals() as stop, \
            tqdm(total=cfg.max_steps, initial=start_step, desc="train", file=sys.stderr, disable=not parallel.is_main) as bar:
        for step in range(start_step, cfg.max_steps):
            stats = parallel.step(objective, next(stream), step)
            if checkpoint is not None and step == start_step:
                check_optimiser_state_restored(checkpoint)
            if not math.isfinite(stats["loss"]):
                raise FloatingPointError(f"loss is {stats['loss']} at step {step}; lower --lr. Config and split are saved in {out}")
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3g}")
            if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
                trace = posterior_trace(guide) if parallel.is_main else {}  # only rank 0 writes the log
                log_file.write(json.dumps({"step": step, **stats, **trace}) + "\n")
                log_file.flush()
            done = step + 1
            # Every process acts on the agreed flag, never on its own stop.signum: a signal landing after the
            # vote is taken up by the next step's vote, so all processes save and stop after the same step.
            stopping = parallel.agree_to_stop(stop)  # a signal that reached any process stops all after this step
            if stopping:
                stop.signum = stop.signum or int(signal.SIGTERM)
            path, save_error = checkpoint_path(out), None
            if stopping or done == cfg.max_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                log_file.flush()
                if parallel.is_main:
                    try:
                        path = save_checkpoint(
                            out, cfg=cfg, step=done, model=model, guide=guide, objective=objective, stream=stream,
                            metrics=metrics, train_log_bytes=os.fstat(log_file.fileno()).st_size,
                            device_type=run.device.type, resumed_at=resumed_at,
                            train_seconds=earlier_train_seconds + time.perf_counter() - train_start,
                        )
                    except Exception as err:  # raised below, once the other processes know (when stopping)
                        save_error = err
            if stopping:
                # every process leaves once rank 0's checkpoint is on disk, or all raise if it could not be written
                if parallel.wait_for_main(failed=save_error is not None):
                    if save_error is not None:
                        raise save_error
                    raise RuntimeError(f"rank 0 could not write the checkpoint of step {done} to {out}; see its error")
                raise interrupted(stop, done, cfg.max_steps, path)
            if save_error is not None:
                raise save_error
        # a signal during the last step's checkpoint (after that step's vote): stop before the evaluation
        if start_step < cfg.max_steps and parallel.agree_to_stop(stop):
            stop.signum = stop.signum or int(signal.SIGTERM)
            raise interrupted(stop, cfg.max_steps, cfg.max_steps, checkpoint_path(out))
    train_seconds = earlier_train_seconds + time.perf_counter() - train_start
    log(f"trained {cfg.max_steps} steps in {train_seconds:.0f} s ({cfg.max_steps * run.global_batch / train_seconds:.2f} examples/s)")
    return train_seconds, resumed_at


def evaluate_after_training(cfg: TrainConfig, run: AssembledRun, metrics: dict) -> dict:
    """The trained posterior on the validation split (``mean`` and ``samples_N``, N = ``--eval-samples`` draws
    seeded by ``--seed`` as ``python -m blob_pyro.evaluate`` draws them; point estimates: ``mean`` only), its
    ``predictions.npz``, and the ``--eval-tasks`` (``ood``, ``ood_detection``). Fills ``metrics``; returns timings."""
    model, guide, labels = run.model, run.guide, run.labels
    model.eval()
    eval_start = time.perf_counter()
    samples = cfg.eval_samples if guide.scores_prior and not guide.point_estimate else 0  # point estimates: every draw is the same
    mode_metrics, probs = evaluate_modes(model, guide, run.val_batches, labels, num_samples=samples, seed=cfg.seed, log=log,
                                         draws_per_pass=cfg.draws_per_pass)
    metrics.update(mode_metrics)
    draws = probs["samples"]
    save_predictions(run.out, {"mean": probs["mean"]} if draws is None else {f"samples_{samples}": draws.mean(0)}, labels)
    eval_seconds = time.perf_counter() - eval_start
    ood_start = time.perf_counter()
    if run.ood_sets:
        metrics["ood"], ood_probs = evaluate_ood_tasks(cfg, model, guide, run.ood_sets, num_samples=samples)
        metrics["ood_detection"] = detection_blocks((draws if draws is not None else probs["mean"]).numpy(), ood_probs)
    return {"eval_seconds": eval_seconds, "eval_examples_per_second": len(labels) * (1 + samples) / eval_seconds,  # forward passes per second
            "ood_seconds": time.perf_counter() - ood_start}


def write_run_end(cfg: TrainConfig, run: AssembledRun, metrics: dict, timings: dict) -> None:
    """``run.json`` (timings, versions), then ``metrics.json`` (last, atomically: it marks the run finished);
    the spent checkpoint goes; the results tables are printed."""
    run_info = {
        "wall_seconds": time.perf_counter() - run.wall_start, "train_seconds": timings["train_seconds"],
        "eval_seconds": timings["eval_seconds"], "eval_examples_per_second": timings["eval_examples_per_second"],
        "ood_seconds": timings["ood_seconds"],
        "ood_tasks": {name: {"spec": s["spec"], "source": s["task"].source, "num_choices": s["task"].num_choices,
                             "positions": s["positions"]} for name, s in run.ood_sets.items()},
        "train_examples_per_second": cfg.max_steps * run.global_batch / timings["train_seconds"],
        "processes": run.parallel.world_size, "device": str(run.device), "versions": versions(),
        "num_train": len(run.data.train), "num_validation": len(run.labels), "resumed_at_steps": timings["resumed_at_steps"],
    }
    write_json_atomic(run.out / "run.json", run_info)
    write_json_atomic(run.out / "metrics.json", metrics)  # last, atomically: marks the run finished
    checkpoint_path(run.out).unlink(missing_ok=True)  # finished: metrics.json marks it, the checkpoint is spent
    in_task = {mode: m for mode, m in metrics.items() if mode not in ("ood", "ood_detection")}
    print(results_table(in_task, title=f"\n{run.task.name} validation, guide {cfg.guide}, {cfg.max_steps} steps ({run.out})"))
    for name, block in metrics.get("ood", {}).items():
        print(results_table(block, title=f"\nOOD {name} (trained on {run.task.name}, not on {name})"))


def read_initial_adapter(cfg: TrainConfig):
    """The ``--init-from-peft`` adapter checked against ``--rank`` / ``--alpha`` (None without the flag)."""
    if cfg.init_from_peft is None:
        return None
    adapter = read_peft_adapter(cfg.init_from_peft)
    check_adapter_config(adapter, rank=cfg.rank, alpha=cfg.alpha)
    return adapter


def prepare_ood_tasks(cfg: TrainConfig, data, tokenizer, device) -> dict:
    """Load and tokenize every ``--eval-tasks`` task once: ``{name: {"spec", "task", "positions", "batches",
    "labels", "answer_token_ids"}}``. Causal LMs get the task's own answer-letter tokens (its K may differ
    from the training task's); a sequence classifier's head is fixed, so its K must match."""
    sets = {}
    for spec in cfg.eval_task_specs:
        name = task_spec_name(spec)
        if name in sets or name == data.task.name and spec == cfg.task:
            raise ValueError(f"--eval-tasks names {name!r} twice or names the training task; list each other task once")
        task = load_task(cfg, spec, roles=("validation",))
        if cfg.task_type == "sequence_classification" and task.num_choices != data.task.num_choices:
            raise ValueError(
                f"--eval-tasks {spec}: {task.num_choices} classes, but the classifier head has {data.task.num_choices} "
                f"(from {data.task.name}); with --task-type sequence_classification evaluate only tasks with the same classes"
            )
        if cfg.task_type == "sequence_classification" and task.label_names != data.task.label_names:
            log(f"warning: {name} classes {task.label_names} differ from {data.task.name}'s {data.task.label_names}; "
                "class i is read as class i")
        positions = evaluation_positions(cfg, task)
        positions, encoded = length_sorted(positions, encode_examples(cfg, task, tokenizer, [task.examples[i] for i in positions]))
        ids = answer_token_ids(tokenizer, task.num_choices) if uses_answer_letters(cfg) else None
        sets[name] = {"spec": spec, "task": task, "positions": positions, "labels": encoded.labels, "answer_token_ids": ids,
                      "batches": batches(data, encoded, batch_size=cfg.eval_batch_size, device=device)}
        log(f"OOD task {name}: evaluating {len(positions)} of {len(task)} examples, {task.num_choices} choices")
    return sets


def evaluate_ood_tasks(cfg: TrainConfig, model, guide, ood_sets: dict, *, num_samples: int) -> dict:
    """OOD protocol (BLoB section 4): the trained posterior, no training on these tasks.
    Returns ``({name: {"mean": metrics, "samples_N": metrics}}, {name: (N, n, K) draws, or (n, K) for N = 0})``."""
    results, draws = {}, {}
    trained_head = model.head
    try:
        for name, s in ood_sets.items():
            if s["answer_token_ids"] is not None:
                model.head = AnswerTokenHead(s["answer_token_ids"]).to(next(model.network.parameters()).device)
            elif isinstance(trained_head, ChoiceLikelihoodHead):  # the OOD task may have another K
                model.head = ChoiceLikelihoodHead(s["task"].num_choices)
            log(f"OOD evaluation on {name}:")
            results[name], probs = evaluate_modes(model, guide, s["batches"], s["labels"], num_samples=num_samples, seed=cfg.seed, log=log,
                                                  draws_per_pass=cfg.draws_per_pass)
            draws[name] = (probs["samples"] if probs["samples"] is not None else probs["mean"]).numpy()
            model.head = trained_head
    finally:
        model.head = trained_head
    return results, draws


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = TrainConfig.from_argv(argv)
    try:
        return train(cfg)
    except PreflightError as err:  # a bad input found before anything was written: the message, no traceback
        raise SystemExit(f"python -m blob_pyro.train: error: {err}") from None


if __name__ == "__main__":
    main()
