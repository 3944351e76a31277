"""Build everything a run needs from a :class:`TrainConfig`: task, split, tokens, model, guide, objective.

Each function does one step, so ``train``, ``evaluate`` and ``compare`` share them, and a researcher
can call them one by one from Python.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from blob_pyro.config import TrainConfig
from blob_pyro.data import (
    DEFAULT_FORMAT, EncodedSplit, MultipleChoiceTask, Split, answer_token_ids, carve_calibration, classification_text, encode_multiple_choice,
    encode_text_classification, iterate_batches, load_split_file, load_task_spec, stratified_sample,
    stratified_split,
)
from blob_pyro.data.choice_scoring import EncodedChoices, encode_choice_continuations, iterate_choice_batches
from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, ChoiceLikelihoodHead, SequenceClassificationHead, bayesianize
from blob_pyro.models.checks import check_classifier_adapted, check_shared_prompt_support
from blob_pyro.objectives import ELBOObjective, KLWeighting, ParityObjective
from blob_pyro.schedules import kl_cycle_length

__all__ = [
    "load_task", "make_split", "evaluation_positions", "TaskData", "prepare_data", "resolve_device", "resolve_dtype",
    "build_model", "build_guide", "build_objective", "batches", "training_batches", "enable_activation_checkpointing",
    "TrainingBatches",
]

def load_task(cfg: TrainConfig, spec: Optional[str] = None, *, roles: tuple = ("train", "validation")) -> MultipleChoiceTask:
    """The task ``spec`` (default ``cfg.task``): BIG-bench JSON, ``bundled:``, ``paper:<name>`` or a table
    (:func:`blob_pyro.data.load_task_spec`); ``roles`` picks the splits of tasks that have their own."""
    return load_task_spec(
        cfg.task if spec is None else spec, data_dir=cfg.data_dir, column_mapping=cfg.column_mapping,
        task_format=cfg.task_format, drop_mismatched_choices=cfg.drop_mismatched_choices, roles=roles,
    )


def make_split(cfg: TrainConfig, task: MultipleChoiceTask) -> Split:
    """Positions into ``task.examples``: from ``--split-file``, the task's own splits (paper tasks: used
    whole unless ``--subsample-task-splits``), or a seeded stratified split; then ``--num-calibration``
    training examples moved to ``calibration`` (:func:`blob_pyro.data.carve_calibration`, seeded by
    ``--split-seed``) unless a split file already lists exactly that many."""
    split = _train_validation_split(cfg, task)
    if split.calibration:
        if cfg.num_calibration != len(split.calibration):
            raise ValueError(
                f"--split-file {cfg.split_file} lists {len(split.calibration)} calibration examples but --num-calibration "
                f"is {cfg.num_calibration}; pass --num-calibration {len(split.calibration)}"
            )
        return split
    if cfg.num_calibration == 0:
        return split
    return carve_calibration(split, task.labels, size=cfg.num_calibration, seed=cfg.split_seed)


def _train_validation_split(cfg: TrainConfig, task: MultipleChoiceTask) -> Split:
    if cfg.split_file:
        return load_split_file(cfg.split_file, file_indices=task.file_indices)
    if task.splits is not None:
        train, validation = task.splits["train"], task.splits["validation"]
        if not cfg.subsample_task_splits:
            return Split(train=list(train), validation=list(validation), seed=cfg.split_seed, procedure=task.split_procedure)
        labels = task.labels
        picked = [
            [positions[i] for i in stratified_sample([labels[p] for p in positions], size=size, seed=cfg.split_seed)]
            for positions, size in ((train, cfg.num_train), (validation, cfg.num_validation))
        ]
        # stratified_sample returns sorted positions; shuffle the training order with the same seed.
        order = np.random.default_rng(cfg.split_seed).permutation(len(picked[0]))
        return Split(
            train=[picked[0][i] for i in order], validation=picked[1], seed=cfg.split_seed,
            procedure=f"{task.split_procedure}; stratified_sample(seed={cfg.split_seed}) of {cfg.num_train} train "
            f"and {cfg.num_validation} validation examples, training order permuted with default_rng({cfg.split_seed})",
        )
    return stratified_split(task.labels, num_train=cfg.num_train, num_validation=cfg.num_validation, seed=cfg.split_seed)


def evaluation_positions(cfg: TrainConfig, task: MultipleChoiceTask) -> list[int]:
    """Positions of the examples an ``--eval-tasks`` task is evaluated on: its evaluation split (the whole
    task when it has none), reduced to a seeded stratified sample of ``--eval-task-size`` (0 = all)."""
    pool = list(task.splits["validation"]) if task.splits is not None else list(range(len(task)))
    if cfg.eval_task_size == 0 or cfg.eval_task_size >= len(pool):
        return pool
    labels = task.labels
    return [pool[i] for i in stratified_sample([labels[p] for p in pool], size=cfg.eval_task_size, seed=cfg.split_seed)]


@dataclass
class TaskData:
    """A task tokenized once: encoded train/validation splits and what the head needs."""

    task: MultipleChoiceTask
    split: Split
    train: EncodedSplit
    validation: EncodedSplit
    pad_token_id: int
    padding_side: str
    answer_token_ids: Optional[list[int]] = None
    choice_layout: str = "shared_prompt"
    calibration: Optional[EncodedSplit] = None  # split.calibration, tokenized (None when the split has none)


def encode_examples(cfg: TrainConfig, task: MultipleChoiceTask, tokenizer, examples) -> EncodedSplit:
    if cfg.task_type == "causal_lm" and cfg.answer_scoring == "choice_loglik":
        prompt_format = task.prompt_format or DEFAULT_FORMAT
        if not cfg.list_choices:
            prompt_format = dataclasses.replace(prompt_format, append_choices=False)
        return encode_choice_continuations(examples, tokenizer, task_prefix=task.task_prefix, max_length=cfg.max_length,
                                           prompt_format=prompt_format)
    if cfg.task_type == "causal_lm":
        return encode_multiple_choice(examples, tokenizer, task_prefix=task.task_prefix, max_length=cfg.max_length,
                                      prompt_format=task.prompt_format)
    if task.label_names is None:
        raise ValueError(
            f"task {task.name!r} has per-example choice texts; sequence classification needs fixed class labels "
            "(e.g. strategyqa, winowhy, fever): use --task-type causal_lm for this task"
        )
    prompt_format = task.prompt_format or DEFAULT_FORMAT
    texts = [classification_text(e, task_prefix=task.task_prefix, prompt_format=prompt_format) for e in examples]
    return encode_text_classification(texts, [e.label for e in examples], tokenizer, max_length=cfg.max_length)


def length_sorted(positions: Sequence[int], encoded) -> tuple[list[int], object]:
    """Evaluation order: ``positions`` and their ``encoded`` examples sorted by padded width (stable),
    so each dynamically padded batch holds similar lengths (~25 % fewer tokens on the BIG-bench tasks).
    Metrics do not depend on example order; predictions files follow this order."""
    order = sorted(range(len(positions)), key=encoded.widths().__getitem__)
    return [positions[i] for i in order], encoded.select(order)


def prepare_data(cfg: TrainConfig, task: MultipleChoiceTask, split: Split, tokenizer) -> TaskData:
    """Tokenize the train, validation (and calibration) examples once. The validation examples are put in
    :func:`length_sorted` order, and ``TaskData.split.validation`` follows it (record that split)."""
    pick = lambda idx: [task.examples[i] for i in idx]  # noqa: E731
    train = encode_examples(cfg, task, tokenizer, pick(split.train))
    validation_positions, validation = length_sorted(split.validation, encode_examples(cfg, task, tokenizer, pick(split.validation)))
    split = dataclasses.replace(split, validation=validation_positions)
    ids = answer_token_ids(tokenizer, task.num_choices) if uses_answer_letters(cfg) else None
    calibration = encode_examples(cfg, task, tokenizer, pick(split.calibration)) if split.calibration else None
    return TaskData(task, split, train, validation, tokenizer.pad_token_id, tokenizer.padding_side, ids, cfg.choice_layout,
                    calibration)


def uses_answer_letters(cfg: TrainConfig) -> bool:
    """True when the head reads answer-letter logits (causal LM, ``--answer-scoring letters``)."""
    return cfg.task_type == "causal_lm" and cfg.answer_scoring == "letters"


def _iterate(encoded, *, data: TaskData, batch_size: int, shuffle: bool, generator=None):
    if isinstance(encoded, EncodedChoices):
        return iterate_choice_batches(
            encoded, batch_size=batch_size, pad_token_id=data.pad_token_id, shuffle=shuffle, generator=generator,
            layout=data.choice_layout,
        )
    return iterate_batches(
        encoded, batch_size=batch_size, pad_token_id=data.pad_token_id, shuffle=shuffle, generator=generator,
        padding_side=data.padding_side,
    )


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} requested but CUDA is not available; use --device cpu or auto")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def load_network(cfg: TrainConfig, num_classes: int, *, dtype: torch.dtype):
    """The pretrained network in ``dtype``; with ``--base-quantization`` its linear layers are bitsandbytes
    layers, placed on ``--device`` at load time (:mod:`blob_pyro.quantization`)."""
    from blob_pyro import pretrained
    from blob_pyro.quantization import bitsandbytes_config

    options = {}
    quantization = bitsandbytes_config(cfg.base_quantization, compute_dtype=dtype)
    if quantization is not None:
        options = {"quantization_config": quantization, "device_map": {"": str(resolve_device(cfg.device))}}
    if cfg.task_type == "causal_lm":
        return pretrained.load_causal_lm(cfg.model, dtype=dtype, **options)
    # The classification head is new and random (and frozen under its adapter): seed its initialisation
    # with the run's seed, so that every later load of the run (evaluate, post-hoc baselines) rebuilds
    # the head the run was trained with, whatever the RNG state of the caller.
    torch.manual_seed(cfg.seed)
    return pretrained.load_sequence_classifier(cfg.model, num_labels=num_classes, dtype=dtype, **options)


def enable_activation_checkpointing(network) -> None:
    """``--gradient-checkpointing``: the network's layers keep only their inputs in the forward pass and
    recompute their activations in the backward pass (transformers' activation checkpointing, active in
    training mode only). Non-reentrant ``torch.utils.checkpoint``, which restores the random state for the
    recomputation (LoRA dropout and flipout signs are drawn again identically); the LoRA factors are drawn once
    per step before the forward (``models.lora``), so the recomputed forward sees the same A. (transformers also
    makes the input embeddings' output require grad, a small extra backward through the first layer.)"""
    if not getattr(network, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(network).__name__} does not support activation "
                         "checkpointing in transformers; run without the flag")
    kwargs = {"use_reentrant": False}
    if hasattr(network, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated there
        network.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        network.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(cfg: TrainConfig, network, data: TaskData) -> BayesianLoRAModel:
    """Adapt ``network`` in place and wrap it with the task's likelihood head. With the shared-prompt
    choice layout the network is first probed (:func:`check_shared_prompt_support`)."""
    if cfg.task_type == "causal_lm" and not uses_answer_letters(cfg) and data.choice_layout == "shared_prompt":
        check_shared_prompt_support(network, model_name=f"--model {cfg.model}")
    bayesianize(  # a family over B (meanfield: random_B = True) needs B built as a sample site
        network, cfg.target_module_spec, rank=cfg.rank, alpha=cfg.alpha, prior=cfg.build_prior(), dropout=cfg.lora_dropout,
        bayesian_sites=cfg.bayesian_sites, random_B=cfg.guide_class().random_B is True,
    )
    if uses_answer_letters(cfg):
        head = AnswerTokenHead(data.answer_token_ids)
    elif cfg.task_type == "causal_lm":
        head = ChoiceLikelihoodHead(data.task.num_choices)
    else:
        check_classifier_adapted(network, cfg.target_modules)
        head = SequenceClassificationHead(data.task.num_choices)
    device = next(network.parameters()).device
    return BayesianLoRAModel(network, head).to(device)


def build_guide(cfg: TrainConfig, model: BayesianLoRAModel, *, init_loc_fn=None):
    """The ``--guide`` of ``model``; ``init_loc_fn`` (``layer -> (rank, in_features)``) overrides the LoRA
    init of its mean of A (e.g. :func:`blob_pyro.peft_adapter.peft_init_loc_fn`)."""
    options = cfg.guide_options()  # the config fields the guide declares, then --guide-kwargs
    if init_loc_fn is not None:
        options["init_loc_fn"] = init_loc_fn
    try:
        return make_guide(cfg.guide, model, **options)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise ValueError(f"--guide {cfg.guide} does not accept the options {sorted(options)} (from --guide-kwargs or the "
                         f"fields it declares): {err}") from None


def build_objective(cfg: TrainConfig, model, guide, *, num_data: int, processes: int = 1):
    """The training objective; ``processes`` P (data parallelism, ``--batch-size`` per process) enters
    the KL cycle length M as in the official code."""
    cycle = kl_cycle_length(num_data, cfg.batch_size, dataset_rescaling=cfg.dataset_rescaling, gamma=cfg.gamma,
                            processes=processes)
    kl = KLWeighting(cfg.kl_schedule, cycle, cfg.kl_weight)
    flipout = None if cfg.flipout == "none" else cfg.flipout
    common = dict(
        # max(.., 1): with --max-steps 0 (--init-from-peft) the objective is built but never stepped
        total_steps=max(cfg.max_steps, 1), kl=kl, lr=cfg.lr, weight_decay=cfg.weight_decay, adam_eps=cfg.adam_eps,
        warmup_ratio=cfg.warmup_ratio, max_grad_norm=cfg.max_grad_norm or None, flipout=flipout,
    )
    if cfg.objective == "parity":
        return ParityObjective(model, guide, kllr=cfg.kllr, **common)
    return ELBOObjective(model, guide, num_data=num_data, elbo=cfg.elbo, scale_lr_factor=cfg.scale_lr_factor, **common)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def batches(data: TaskData, encoded: EncodedSplit, *, batch_size: int, device: torch.device) -> list[dict]:
    """Evaluation batches in order, dynamically padded, on ``device``."""
    return [_to(b, device) for b in _iterate(encoded, data=data, batch_size=batch_size, shuffle=False)]


class TrainingBatches:
    """Endless shuffled training minibatches (a new permutation every epoch, drawn from a generator seeded
    with ``seed``), restartable: ``position=(epoch, index)`` continues exactly where a stream that had
    yielded ``epoch * batches_per_epoch + index`` batches would (the permutations of the earlier epochs are
    drawn again, ``index`` batches of the current one skipped). ``position``: that of the next batch."""

    def __init__(self, data: TaskData, *, batch_size: int, seed: int, device: torch.device, position: tuple = (0, 0)):
        self.data, self.batch_size, self.device = data, batch_size, device
        self.batches_per_epoch = -(-len(data.train) // batch_size)  # the last batch of an epoch may be short
        epoch, index = (int(v) for v in position)
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(f"data position {position} is outside an epoch of {self.batches_per_epoch} batches")
        self._generator = torch.Generator().manual_seed(seed)
        for _ in range(epoch):  # an epoch draws its permutation when its first batch is taken
            next(self._epoch())
        self._batches, self.position = None, (epoch, 0)
        for _ in range(index):
            self._next_cpu()

    def _epoch(self):
        return _iterate(self.data.train, data=self.data, batch_size=self.batch_size, shuffle=True, generator=self._generator)

    def _next_cpu(self) -> dict:
        epoch, index = self.position
        if index == 0:
            self._batches = self._epoch()
        batch = next(self._batches)
        self.position = (epoch, index + 1) if index + 1 < self.batches_per_epoch else (epoch + 1, 0)
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return _to(self._next_cpu(), self.device)


def training_batches(data: TaskData, *, batch_size: int, seed: int, device: torch.device,
                     position: tuple = (0, 0)) -> TrainingBatches:
    """Endless shuffled training minibatches from ``position`` ``(epoch, index)``: :class:`TrainingBatches`."""
    return TrainingBatches(data, batch_size=batch_size, seed=seed, device=device, position=position)
