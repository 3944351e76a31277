"""Typed run configuration; the command line is generated from it (every field is a flag with help).

``TrainConfig.from_argv(argv)`` parses ``--field-name value`` flags; ``--help`` lists every field with
its help text and default. Validation happens in ``__post_init__`` so a bad value fails before any
model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["TrainConfig", "config_parser", "field_help", "field_choices", "DEFAULT_TASK", "RECIPES", "RESULT_NEUTRAL_FIELDS"]

#: Config fields that do not change a run's numbers (where it is written, how often it logs or checkpoints,
#: the device index, how evaluation draws are batched, activation recomputation; equal results bitwise or up
#: to float rounding): a finished run is reused and a checkpoint resumed whatever their values (a checkpoint
#: still refuses another device type, see ``blob_pyro.resume``).
RESULT_NEUTRAL_FIELDS = ("resume", "checkpoint_every", "log_every", "output_dir", "overwrite", "device", "draws_per_pass",
                         "gradient_checkpointing", "dist_timeout_minutes")

DEFAULT_TASK = "bundled:social_iqa"

#: Named bundles of field values. ``official``: the update rule and hyper-parameters of the BLoB paper's
#: LLaMA runs as its released code runs them (Wang et al. 2024, section 4 and appendix): two optimisers
#: (AdamW on the NLL, SGD at ``kllr`` on pi_i * KL), the increasing KL re-weighting cycle with dataset
#: rescaling, per-token flipout, no gradient clipping.
RECIPES: dict[str, dict[str, Any]] = {
    "official": {
        "guide": "blob", "objective": "parity", "kl_schedule": "blob", "kl_weight": 1.0, "dataset_rescaling": True,
        "gamma": 8.0, "flipout": "token", "max_grad_norm": 0.0, "lr": 1e-4, "kllr": 0.01, "adam_eps": 1e-6,
        "weight_decay": 0.0, "eps": 0.05, "prior": "normal", "prior_scale": 0.2, "max_steps": 5000,
        "warmup_ratio": 0.06,
    },
}


def _f(default, help: str, choices: Optional[Sequence[Any]] = None, registry: Optional[Callable[[], dict]] = None):
    """A field with its help text; ``registry`` (``() -> {name: description}``, read when the help is shown)
    fills ``{registered}`` in ``help``, so the registries, not this file, list the guides, priors and methods."""
    return field(default=default, metadata={"help": help, "choices": choices, "registry": registry})


def _guides() -> dict:
    from blob_pyro.guides import registry

    registry.registered_guides()
    return registry.GUIDE_HELP


def _priors() -> dict:
    from blob_pyro.models.priors import PRIOR_HELP

    return PRIOR_HELP


def _methods() -> dict:
    from blob_pyro.baselines import METHOD_HELP, registered_methods

    registered_methods()
    return {"svi": "train the --guide by SVI", **METHOD_HELP}


def field_help(f: dataclasses.Field) -> str:
    """The help text of field ``f`` with its registry's names and descriptions filled in."""
    text = f.metadata.get("help", "")
    registry = f.metadata.get("registry")
    if registry is not None:
        text = text.replace("{registered}", "; ".join(f"{name}: {description}" for name, description in registry().items()))
    return text


def field_choices(f: dataclasses.Field) -> Optional[list]:
    """The allowed values of field ``f`` (None: any value of its type)."""
    choices = f.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


@dataclass
class TrainConfig:
    """Everything a run depends on; written to ``<output_dir>/config.json``."""

    # What to fine-tune on what
    model: str = _f("smollm2", "pretrained model: 'smollm2' (offline SmolLM2-135M-Instruct package), 'minilm' (offline all-MiniLM-L6-v2), a local directory, or a Hugging Face hub id")
    task: str = _f(DEFAULT_TASK, "task: a BIG-bench multiple-choice JSON file, 'bundled:social_iqa' (shipped with the package), 'paper:<name>' (the BLoB paper's tasks: winogrande_s, winogrande_m, arc_challenge, arc_easy, openbookqa, boolq; hub or --data-dir) or a .jsonl/.json/.csv/.parquet table (see --column-mapping)")
    task_format: str = _f("auto", "how to read a task file: auto (BIG-bench for a .json object, else a table by suffix), bigbench, json (rows or JSON lines), csv, parquet", ["auto", "bigbench", "json", "csv", "parquet"])
    column_mapping: Optional[str] = _f(None, "table columns, comma-separated key=column: question (or text), choices (a list column, or col1|col2|... one choice each), label (0-based index, letter A.. or choice text), label_names (class1|class2 for text classification); e.g. 'question=sentence,choices=option1|option2,label=answer'. Default: columns question/text, choices, label")
    data_dir: Optional[str] = _f(None, "folder of local files in the hub schema for paper:<name> tasks (<data_dir>/<name>/<split>.jsonl|.parquet|...); unset: datasets.load_dataset from the Hugging Face hub")
    subsample_task_splits: bool = _f(False, "for tasks with their own splits (paper:<name>): draw --num-train/--num-validation examples from them (seeded, stratified) instead of using them whole")
    eval_tasks: str = _f("", "comma-separated tasks (same forms as --task) evaluated after training without training on them (OOD protocol); one block per task under 'ood' in metrics.json")
    eval_task_size: int = _f(200, "examples evaluated per --eval-tasks task: a seeded stratified sample of its evaluation split (the whole file for tasks without splits); 0 = all")
    task_type: str = _f("causal_lm", "likelihood head: 'causal_lm' (answer-letter logits at the last position) or 'sequence_classification' (BERT-style)", ["causal_lm", "sequence_classification"])
    answer_scoring: str = _f("choice_loglik", "causal-LM multiple choice: 'choice_loglik' (default: each choice's mean token log-probability as a continuation of the question; see --choice-layout) or 'letters' (the BLoB paper: lettered choices, softmax over the answer-letter logits after 'Answer:')", ["choice_loglik", "letters"])
    choice_layout: str = _f("shared_prompt", "choice_loglik batches: shared_prompt (one row per example, prompt + all choices, a block attention mask keeps the choices apart; the prompt runs once) or separate (one row per choice; for causal LMs that reject a 4D attention mask and position_ids, or that use sliding-window attention; a model that scores the layouts differently, e.g. GPT-2, is refused with this advice). Same class logits; sequence flipout and MC-dropout draw once per row, so per example with shared_prompt and per choice with separate", ["shared_prompt", "separate"])
    list_choices: bool = _f(False, "choice_loglik: list the choices in the prompt where the task asks for it (BIG-bench append_choices_to_input, with its choice_prefix); off: the prompt is the question alone")
    drop_mismatched_choices: bool = _f(True, "drop examples whose number of choices differs from the task's most common count (social_iqa has 4 such)")
    num_train: int = _f(640, "training examples in the seeded stratified split (the pool; with --num-calibration K the run trains on num_train - K)")
    num_validation: int = _f(100, "validation examples in the seeded stratified split")
    num_calibration: int = _f(0, "calibration examples carved out of the training pool before training (stratified, seeded by --split-seed, recorded in split.json as 'calibration'), for post-hoc calibration (--method temperature): the run trains on num_train - K examples, while the validation split stays the one of K = 0. Give every method of a comparison the same K. 0: none")
    split_seed: int = _f(0, "seed of the stratified train/validation split")
    split_file: Optional[str] = _f(None, "JSON split file with 'train'/'validation' index lists (overrides num_train/num_validation/split_seed)")
    max_length: int = _f(256, "maximum prompt length in tokens (the question is truncated from the left)")

    # Recipe (applied first; any field named on the command line or in --recipe-overrides keeps its value)
    recipe: str = _f("none", "a named bundle of settings: none, or official (BLoB paper's update rule and LLaMA hyper-parameters: --objective parity --kl-schedule blob --dataset-rescaling --flipout token --max-grad-norm 0 --lr 1e-4 --kllr 0.01 --eps 0.05 --prior normal --prior-scale 0.2 --max-steps 5000 --warmup-ratio 0.06). Flags given on the command line override the recipe", ["none", *RECIPES])
    recipe_overrides: str = _f("", "comma-separated field names that keep their given value under --recipe (filled in automatically from the flags on the command line; recorded in config.json)")

    # Adapter and prior
    init_from_peft: Optional[str] = _f(None, "start from a trained PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors): the guide's mean of A (M) and B begin at its A and B; its r, lora_alpha and adapted layers must equal --rank, --alpha and --target-modules (mismatches are named). Guides blob, map, mle, normal, lowrank (not meanfield, whose B is random); with --max-steps 0 the run evaluates the adapter as is, and --method laplace/tfb then Bayesianize it post hoc (its base run is the adapter). --zero-shot still evaluates the base model")
    target_modules: str = _f("q_proj,v_proj,lm_head", "comma-separated Linear-layer names or suffixes to adapt, or 're:<regex>' for a full-match regex")
    rank: int = _f(8, "LoRA rank r")
    alpha: float = _f(16.0, "LoRA alpha (update scaled by alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout on the adapter input")
    prior: str = _f("normal", "prior over LoRA A: a registered name ({registered}; built with --prior-scale, and --prior-df where it takes df), or an import path module:callable called with --prior-kwargs: a pyro.distributions class (each element i.i.d., e.g. pyro.distributions:StudentT) or a function returning a blob_pyro.models.Prior or a scalar distribution", registry=_priors)
    prior_kwargs: Optional[str] = _f(None, "import-path --prior only: its keyword arguments as a JSON object, e.g. '{\"df\": 3, \"loc\": 0, \"scale\": 0.2}'")
    prior_scale: float = _f(0.2, "prior scale (BLoB: 0.2)")
    prior_df: float = _f(3.0, "degrees of freedom of the student_t prior")

    # Variational family and objective
    guide: str = _f("blob", "variational family: a registered name ({registered}), or an import path module:Class of a blob_pyro.guides.LoRAGuide subclass or of any autoguide (e.g. pyro.infer.autoguide:AutoDiagonalNormal, AutoLowRankMultivariateNormal, AutoLaplaceApproximation: MAP by SVI, then the Hessian of the log joint over the training set)", registry=_guides)
    guide_kwargs: Optional[str] = _f(None, "keyword arguments of the --guide constructor as a JSON object, e.g. '{\"rank\": 4, \"init_scale\": 0.01}'; they override the values the guide takes from --eps, --init-scale and --guide-rank")
    bayesian_sites: Optional[str] = _f(None, "regex (re.search) of the LoRA-A sites that are Bayesian, e.g. 'lm_head' (fixed when the model is built; the guide covers exactly these); the other adapters are deterministic plain-LoRA layers (no prior term). Unset: all")
    guide_rank: int = _f(8, "rank of the covariance factor of guides that take rank (lowrank, pyro.infer.autoguide:AutoLowRankMultivariateNormal)")
    init_scale: float = _f(0.0025, "initial posterior scale of guides that take init_scale (normal, lowrank, autoguides such as AutoNormal, AutoDiagonalNormal); BLoB's initial std is eps^2 = 0.0025")
    method: str = _f("svi", "{registered}; the baselines (blob_pyro.baselines) write the same run files", _methods, registry=_methods)
    base_run: Optional[str] = _f(None, "laplace, tfb, temperature: fit post hoc to this finished run directory (e.g. the MAP / MLE run of the same seed) instead of training a new base run; ensemble: use it as member 0. Its config must match this run's in model, data, adapter and seed")
    ensemble_size: int = _f(3, "ensemble: number of independently seeded members")
    laplace_hessian: str = _f("diag", "laplace: curvature of the LoRA parameters: diag (diagonal GGN; exact for the categorical likelihood, K backward passes per example), diag_ef (empirical Fisher, one per example) or kfac (Kronecker-factored GGN n kron(G, A) of every LoRA A and B: A the layer-input, G the output-gradient second moment, K backward passes per example; correlated posterior draws for mc, the Kronecker covariance for probit; factors larger than 4096, e.g. lm_head's vocabulary side, kept diagonal)", ["diag", "diag_ef", "kfac"])
    laplace_prior_precision: float = _f(0.0, "laplace: prior precision of the LoRA parameters; 0 = tune it by maximising the Laplace marginal likelihood")
    laplace_predictive: str = _f("mc", "laplace: mc (average the softmax over --eval-samples parameter draws) or probit (linearised predictive of the lm logits via the probit approximation, diagonal-covariance Jacobian pass)", ["mc", "probit"])
    laplace_examples: int = _f(0, "laplace: training examples used for the curvature (0 = all)")
    tfb_anchor_size: int = _f(64, "tfb: training examples in the anchor set of the variance search")
    tfb_nll_tolerance: float = _f(0.01, "tfb: largest allowed increase of the anchor NLL (nats per example) over the point estimate's")
    tfb_search_steps: int = _f(10, "tfb: bisection steps of the log-std search")
    tfb_search_samples: int = _f(0, "tfb: posterior draws per candidate std in the search (0 = --eval-samples); fewer makes the search cheaper")
    tfb_min_std: float = _f(1e-5, "tfb: lower end of the log-std search; if even it breaks the tolerance the posterior is the point estimate")
    tfb_max_std: float = _f(0.1, "tfb: upper end of the std search interval")
    eps: float = _f(0.05, "BLoB: initial G ~ U(eps/sqrt(2), eps), std = G^2")
    objective: str = _f("elbo", "elbo: textbook ELBO through pyro SVI; parity: the official BLoB update rule (AdamW on NLL + SGD on pi*KL)", ["elbo", "parity"])
    elbo: str = _f("trace", "ELBO estimator for --objective elbo: trace (Trace_ELBO, MC KL) or meanfield (TraceMeanField_ELBO, closed-form KL)", ["trace", "meanfield"])
    kl_schedule: str = _f("constant", "KL re-weighting: constant, blob (official, increasing 2^i/(2^(M+1)-1)) or blundell (decreasing)", ["constant", "blob", "blundell"])
    kl_weight: float = _f(1.0, "constant multiplier on the KL term (elbo: in per-dataset ELBO units; parity: on pi_i*KL)")
    dataset_rescaling: bool = _f(False, "BLoB dataset rescaling of the cycle length: M = int(100 N^(pi/gamma) / P / b), P the number of processes (torchrun), b the per-process batch")
    gamma: float = _f(8.0, "gamma of the dataset-rescaling formula")
    kllr: float = _f(0.01, "parity objective: SGD learning rate of the KL step (LLaMA 0.01, RoBERTa 0.002)")
    flipout: str = _f("none", "flipout on A during training: none, token (official per-token signs) or sequence (exactly unbiased per example)", ["none", "token", "sequence"])

    # Optimisation
    max_steps: int = _f(200, "training steps (minibatches); 0 only with --init-from-peft (evaluate the imported adapter)")
    batch_size: int = _f(4, "training minibatch size per process (under torchrun with K processes the global batch is K times this)")
    lr: float = _f(1e-3, "AdamW learning rate (peak, after warm-up)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_eps: float = _f(1e-6, "AdamW epsilon")
    scale_lr_factor: float = _f(1.0, "elbo objective: learning rate of the guide's spread parameters (BLoB's G, AutoNormal scales, low-rank scale/cov_factor) as a multiple of --lr (Adam moves a parameter by at most about its learning rate per step; parity: use --kllr)")
    warmup_ratio: float = _f(0.06, "fraction of steps of linear LR warm-up (then linear decay to 0)")
    max_grad_norm: float = _f(1.0, "global gradient-norm clipping (0 disables)")
    seed: int = _f(1, "seed of initialisation, batching, sampling")
    log_every: int = _f(20, "log training loss every this many steps")

    # Evaluation and output
    eval_samples: int = _f(10, "posterior samples N for the predictive (0: posterior mean only)")
    eval_batch_size: int = _f(16, "evaluation batch size")
    draws_per_pass: int = _f(1, "posterior draws that share one network pass, stacked along the batch axis (the same draws and, up to float rounding, the same probabilities as one pass per draw; fewer, larger passes are faster on a GPU and hold D times the activations). Used by the SVI guides' evaluation in train and by evaluate for every method; the baselines' own evaluation inside train (laplace, tfb, mc_dropout, ensemble) draws one pass per draw")
    zero_shot: bool = _f(True, "also evaluate the base model (B = 0) before training")
    output_dir: str = _f("runs/default", "run directory: config, split, adapter/guide safetensors, metrics.json")
    overwrite: bool = _f(False, "allow writing into an output directory that already holds a finished run")
    checkpoint_every: int = _f(0, "write a resumable training checkpoint (<output-dir>/checkpoint.safetensors, replaced atomically) every this many steps; 0: only at the end of training. SIGTERM/SIGINT always finish the current step, write one and exit")
    resume: bool = _f(False, "continue the unfinished run in --output-dir from its checkpoint, bitwise as if never interrupted (up to float rounding where --draws-per-pass or --gradient-checkpointing changes); the config must match the checkpoint's except --resume, --checkpoint-every, --log-every, --output-dir, --overwrite, --draws-per-pass, --gradient-checkpointing, --dist-timeout-minutes and --device (same device type)")
    device: str = _f("auto", "auto (cuda if available), cpu or cuda[:i]")
    dist_timeout_minutes: float = _f(60.0, "under torchrun: how long a process waits at a collective for the others before it fails; the other ranks wait this long for rank 0's zero-shot and final evaluation (raise it for a long --eval-samples evaluation of a large model)")
    base_dtype: str = _f("auto", "dtype of the frozen base model: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16", ["auto", "float32", "bfloat16", "float16"])
    gradient_checkpointing: bool = _f(False, "recompute the base model's layer activations in the backward pass (transformers' activation checkpointing, non-reentrant): much less activation memory for 1-8B models (README memory table) for one extra forward pass per step; the same gradients up to float rounding (A is drawn once per step, outside the recomputed forward). Not with --flipout under torchrun")
    base_quantization: str = _f("none", "quantize the frozen base's linear layers with bitsandbytes (pip install 'blob-pyro[quant]'): none, 8bit (LLM.int8()) or 4bit (NF4, double quantization, compute in --base-dtype). Adapters, guide and KL stay fp32; lm_head stays unquantized", ["none", "8bit", "4bit"])

    def __post_init__(self):
        self._apply_recipe()
        positive_ints = ["num_train", "num_validation", "max_length", "rank", "max_steps", "batch_size", "eval_batch_size", "log_every", "draws_per_pass"]
        if self.init_from_peft and self.max_steps == 0:  # evaluate / Bayesianize the imported adapter as it is
            positive_ints.remove("max_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        positive = ["alpha", "prior_scale", "prior_df", "eps", "lr", "kllr", "gamma", "adam_eps", "scale_lr_factor",
                    "dist_timeout_minutes"]
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"--{_flag(name)} must be a finite positive number, got {value!r}")
        for name in ["weight_decay", "max_grad_norm", "kl_weight"]:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{_flag(name)} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0):
            raise ValueError(f"--checkpoint-every must be an integer >= 0 (0 = only at the end), got {self.checkpoint_every!r}")
        if self.eval_samples < 0:
            raise ValueError(f"--eval-samples must be >= 0 (0 = posterior mean only), got {self.eval_samples}")
        for f in dataclasses.fields(self):
            choices = field_choices(f)
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{_flag(f.name)} must be one of {list(choices)}, got {getattr(self, f.name)!r}")
        if self.objective == "parity" and self.guide != "blob":
            raise ValueError("--objective parity reproduces BLoB's update rule and needs --guide blob")
        guide = self.guide_class()  # raises for an unknown name, a failed import or a refused autoguide
        if self.flipout != "none" and not guide.provides_flipout_loc:
            raise ValueError(f"--flipout needs a guide that hands flipout its mean of A, such as --guide blob (it perturbs "
                             f"around the guide mean), got --guide {self.guide}")
        if self.num_calibration < 0:
            raise ValueError(f"--num-calibration must be >= 0 (0 = no calibration split), got {self.num_calibration}")
        if self.method == "temperature" and self.num_calibration == 0 and not self.base_run:
            raise ValueError(
                "--method temperature fits T on calibration examples carved from the training data, and --num-calibration "
                "is 0: pass --num-calibration K (e.g. 64; the base run then trains on num_train - K examples)"
            )
        if self.eval_task_size < 0:
            raise ValueError(f"--eval-task-size must be >= 0 (0 = every example), got {self.eval_task_size}")
        if self.column_mapping:
            from blob_pyro.data.tabular import ColumnMapping

            ColumnMapping.parse(self.column_mapping)  # raises with the fix on a malformed mapping
        for spec in [self.task, *self.eval_task_specs]:
            if spec.startswith("paper:"):
                from blob_pyro.data.paper_tasks import paper_task

                paper_task(spec[len("paper:"):])  # raises listing the paper tasks
        self.guide_options()  # raises for malformed --guide-kwargs
        if not self.target_modules.strip():
            raise ValueError("--target-modules is empty; e.g. q_proj,v_proj,lm_head")
        if self.tfb_search_samples < 0:
            raise ValueError(f"--tfb-search-samples must be >= 0 (0 = --eval-samples), got {self.tfb_search_samples}")
        for name in ["guide_rank", "ensemble_size", "tfb_anchor_size", "tfb_search_steps"]:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"--{_flag(name)} must be a positive integer, got {getattr(self, name)!r}")
        if not self.tfb_min_std < self.tfb_max_std:
            raise ValueError(f"--tfb-min-std ({self.tfb_min_std}) must be below --tfb-max-std ({self.tfb_max_std})")
        for name in ["init_scale", "tfb_nll_tolerance", "tfb_min_std", "tfb_max_std"]:
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{_flag(name)} must be a finite positive number, got {getattr(self, name)!r}")
        if not (math.isfinite(self.laplace_prior_precision) and self.laplace_prior_precision >= 0):
            raise ValueError(f"--laplace-prior-precision must be >= 0 (0 = marginal likelihood), got {self.laplace_prior_precision}")
        if self.laplace_examples < 0:
            raise ValueError(f"--laplace-examples must be >= 0 (0 = all training examples), got {self.laplace_examples}")
        if self.method in ("laplace", "tfb") and not guide.point_estimate:
            raise ValueError(f"--method {self.method} is post-hoc on a point estimate: use --guide map or mle, got --guide {self.guide}")
        if self.method == "mc_dropout" and self.lora_dropout == 0:
            raise ValueError("--method mc_dropout needs dropout to sample from: pass --lora-dropout 0.1 (the paper's value)")
        if self.objective == "parity" and self.scale_lr_factor != 1.0:
            raise ValueError("--scale-lr-factor applies to --objective elbo; the parity rule steps G by SGD at --kllr")
        if self.init_from_peft is not None:
            self._check_init_from_peft()
        prior = self.build_prior()  # raises for an unknown name, a failed import or bad --prior-kwargs
        if self.objective == "parity":
            from blob_pyro.models.priors import parity_support

            if self.bayesian_sites:
                raise ValueError("--objective parity does not support --bayesian-sites; use --objective elbo")
            reason = parity_support(prior)
            if reason is not None:
                raise ValueError(f"--objective parity cannot use --prior {self.prior}: {reason}. It supports priors with a "
                                 "closed-form KL against a Normal guide and no learned parameters (normal, laplace, or an "
                                 "import path to such a distribution); use --objective elbo with this prior")

    def guide_class(self) -> type:
        """The ``blob_pyro.guides.LoRAGuide`` subclass that ``--guide`` builds (nothing is built)."""
        from blob_pyro.guides import guide_class

        return guide_class(self.guide)

    def guide_options(self) -> dict:
        """Keyword arguments of the guide: the run-config fields it declares (``LoRAGuide.config_fields``),
        then ``--guide-kwargs``."""
        from blob_pyro.guides import guide_config_fields

        options = {key: getattr(self, name) for key, name in guide_config_fields(self.guide).items()}
        if self.guide_kwargs:
            options.update(_json_object("--guide-kwargs", self.guide_kwargs, example='{"rank": 4}'))
        return options

    def build_prior(self):
        """The prior named by ``--prior`` (with ``--prior-scale``/``--prior-df`` or ``--prior-kwargs``)."""

        from blob_pyro.models.priors import resolve_prior

        kwargs = _json_object("--prior-kwargs", self.prior_kwargs, example='{"scale": 0.2}') if self.prior_kwargs else None
        return resolve_prior(self.prior, kwargs=kwargs, scale=self.prior_scale, df=self.prior_df)

    def _check_init_from_peft(self) -> None:
        if not self.init_from_peft.strip():
            raise ValueError("--init-from-peft is empty: pass the folder of a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)")
        if self.guide_class().random_B is True:
            raise ValueError(f"--init-from-peft sets the deterministic B of the LoRA layers, but --guide {self.guide} makes B random; "
                             "use --guide blob, map, mle, normal or lowrank")
        if self.base_run:
            raise ValueError("--init-from-peft starts a new base run, --base-run reuses a finished one: pass only one of them")

    def _apply_recipe(self) -> None:
        """Set the recipe's values on every field not named in ``recipe_overrides``. A field that holds
        neither its default nor the recipe's value and is not named there is a conflict, not silently lost."""
        if self.recipe == "none":
            return
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {['none', *RECIPES]}, got {self.recipe!r}")
        known = {f.name: f for f in dataclasses.fields(self)}
        overrides = [name.strip().replace("-", "_") for name in self.recipe_overrides.split(",") if name.strip()]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"--recipe-overrides names unknown fields {unknown}; use field names such as lr,max_steps")
        for name, value in RECIPES[self.recipe].items():
            current = getattr(self, name)
            if name in overrides or current == value:
                continue
            if current != known[name].default:
                raise ValueError(
                    f"--{_flag(name)} {current!r} conflicts with --recipe {self.recipe} ({value!r}); to override the "
                    f"recipe pass the flag on the command line or name it in --recipe-overrides"
                )
            setattr(self, name, value)
        self.recipe_overrides = ",".join(sorted(set(overrides)))

    @classmethod
    def from_recipe(cls, recipe: str, **fields) -> "TrainConfig":
        """``TrainConfig(recipe=recipe, **fields)`` where every field given here overrides the recipe."""
        named = [name.strip() for name in fields.pop("recipe_overrides", "").split(",") if name.strip()]
        return cls(recipe=recipe, recipe_overrides=",".join([*named, *fields]), **fields)

    @property
    def eval_task_specs(self) -> list:
        """``eval_tasks`` as a list of task specs (empty when unset)."""
        return [spec.strip() for spec in self.eval_tasks.split(",") if spec.strip()]

    @property
    def target_module_spec(self):
        """``target_modules`` as ``bayesianize`` takes it: a regex string or a list of names."""
        if self.target_modules.startswith("re:"):
            return self.target_modules[3:]
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        """Write ``config.json`` atomically (a kill leaves the old file or the new one, never half)."""
        from blob_pyro.rundir import write_text_atomic

        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read run config {path}: {err}") from err
        # Runs written before --answer-scoring existed scored causal-LM choices with answer letters.
        data.setdefault("answer_scoring", "letters")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown config fields {unknown}; was it written by another version?")
        return cls(**data)

    @classmethod
    def from_argv(cls, argv: Optional[Sequence[str]] = None, *, prog: str = "python -m blob_pyro.train") -> "TrainConfig":
        args = vars(config_parser(cls, prog=prog).parse_args(argv))
        if args["recipe"] != "none":  # the flags given on the command line override the recipe
            given = vars(config_parser(cls, prog=prog, keep_defaults=False).parse_args(argv))
            named = [name.strip() for name in args["recipe_overrides"].split(",") if name.strip()]
            args["recipe_overrides"] = ",".join([*named, *(name for name in given if name in RECIPES[args["recipe"]])])
        try:
            return cls(**args)
        except ValueError as err:
            raise SystemExit(f"{prog}: error: {err}") from None


def _json_object(flag: str, text: str, *, example: str) -> dict:
    """``text`` parsed as a JSON object, or a ValueError naming ``flag`` with an example of what it expects."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object such as '{example}', got {text!r} ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object such as '{example}', got {text!r}")
    return value


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_parser(cls, *, prog: str, description: Optional[str] = None, keep_defaults: bool = True) -> argparse.ArgumentParser:
    """An ``argparse`` parser with one ``--flag`` per dataclass field (bools get ``--no-flag`` too).

    ``keep_defaults=False``: fields not given on the command line are absent from the parsed namespace
    (how :meth:`TrainConfig.from_argv` tells which flags override a recipe).
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description or cls.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)  # Optional[X] -> X
        kwargs: dict[str, Any] = {"default": f.default if keep_defaults else argparse.SUPPRESS,
                                  "help": field_help(f).replace("%", "%%"), "dest": f.name}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if field_choices(f):
                kwargs["choices"] = field_choices(f)
        parser.add_argument(f"--{_flag(f.name)}", **kwargs)
    return parser
