"""The PEFT LoRA adapter format, read and written without importing ``peft``.

A PEFT LoRA adapter directory holds

* ``adapter_config.json``: ``{"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ...}``;
  PEFT scales the update by ``lora_alpha / r`` (``use_rslora`` false), the same ``alpha / rank`` as
  :class:`~blob_pyro.models.BayesianLoRALinear`;
* ``adapter_model.safetensors``: ``base_model.model.<module path>.lora_A.weight`` ``(r, in_features)`` and
  ``base_model.model.<module path>.lora_B.weight`` ``(out_features, r)`` for every adapted ``nn.Linear``,
  ``<module path>`` relative to the transformers model (``model.layers.0.self_attn.q_proj``, ``lm_head``).

So ``W0 + (alpha / r) B A`` is the same layer in both libraries: a LoRA layer of PEFT 0.21 loaded with
``PeftModel.from_pretrained(base, directory)`` computes exactly what our adapter computes with A at the
guide's posterior mean M and B at its (mean) value (BLoB, Wang et al. 2024, section 3: prediction with
"N = 0" uses the mean of q(A)).

:data:`POSTERIOR_STD_FILE` (``adapter_posterior_std.safetensors``, beside the adapter and ignored by PEFT)
holds the guide's posterior standard deviations, keyed like the adapter with ``.std`` in place of
``.weight``: ``base_model.model.<module path>.lora_A.std`` ``(r, in_features)`` (and ``lora_B.std`` for a
guide whose B is random).

Importing (``--init-from-peft``) checks the adapter against the run's configuration and model:
:func:`check_adapter_config` (rank, alpha, LoRA variants we do not implement; no model needed) and
:func:`check_adapter_modules` (the adapted module paths and tensor shapes); then the training code calls
:func:`init_lora_B_from_peft` on the model and gives the guide :func:`peft_init_loc_fn` as its
``init_loc_fn``, so M starts at the adapter's A.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

__all__ = [
    "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "POSTERIOR_STD_FILE", "KEY_PREFIX", "PeftLoRAAdapter",
    "peft_key", "write_peft_adapter", "read_peft_adapter", "check_adapter_config", "check_adapter_modules",
    "peft_init_loc_fn", "init_lora_B_from_peft", "target_modules_flag",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
POSTERIOR_STD_FILE = "adapter_posterior_std.safetensors"
KEY_PREFIX = "base_model.model."

# PEFT LoRA options that change what the adapter computes, with the value under which it equals our layer.
_NEUTRAL_OPTIONS = {
    "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "layers_to_transform": None,
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_qalora": False, "lora_bias": False,
}


def peft_key(module_path: str, factor: str, suffix: str = "weight") -> str:
    """``("lm_head", "lora_A")`` -> ``"base_model.model.lm_head.lora_A.weight"`` (PEFT's saved key)."""
    return f"{KEY_PREFIX}{module_path}.{factor}.{suffix}"


@dataclass
class PeftLoRAAdapter:
    """A PEFT LoRA adapter in memory.

    Attributes:
        config: the parsed ``adapter_config.json``.
        lora_A: ``{module path: (r, in_features)}``. lora_B: ``{module path: (out_features, r)}``.
        source: the directory it was read from (for messages).
    """

    config: dict
    lora_A: dict[str, torch.Tensor]
    lora_B: dict[str, torch.Tensor]
    source: str = ""

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def alpha(self) -> float:
        return float(self.config["lora_alpha"])

    @property
    def module_paths(self) -> list[str]:
        return list(self.lora_A)


def write_peft_adapter(
    directory: Union[str, Path],
    *,
    lora_A: dict[str, torch.Tensor],
    lora_B: dict[str, torch.Tensor],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = "CAUSAL_LM",
    posterior_std: Optional[dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (float32) into ``directory``.

    ``target_modules`` is the list of the exact module paths of ``lora_A`` (PEFT matches a list entry
    exactly or as a dotted suffix, so it selects precisely these layers). ``posterior_std``:
    ``{peft_key(path, factor, "std"): tensor}`` written to :data:`POSTERIOR_STD_FILE`.
    Files are written under a temporary name and renamed, the config last.
    """
    if set(lora_A) != set(lora_B):
        raise ValueError(f"lora_A and lora_B must cover the same modules; differ in {sorted(set(lora_A) ^ set(lora_B))}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path in lora_A:
        tensors[peft_key(path, "lora_A")] = lora_A[path].detach().to("cpu", torch.float32).contiguous()
        tensors[peft_key(path, "lora_B")] = lora_B[path].detach().to("cpu", torch.float32).contiguous()
    _save(tensors, directory / ADAPTER_WEIGHTS_FILE)
    if posterior_std:
        _save({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in posterior_std.items()}, directory / POSTERIOR_STD_FILE)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank), "lora_alpha": float(alpha), "lora_dropout": float(dropout), "target_modules": list(lora_A),
        "init_lora_weights": True, "inference_mode": True, "revision": None, **_NEUTRAL_OPTIONS,
    }
    tmp = directory / (ADAPTER_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(directory / ADAPTER_CONFIG_FILE)
    return directory


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def read_peft_adapter(directory: Union[str, Path]) -> PeftLoRAAdapter:
    """Read a PEFT LoRA adapter directory; refuses what it cannot represent, saying what to do.

    :raises FileNotFoundError: no directory, no ``adapter_config.json`` or no ``adapter_model.safetensors``.
    :raises ValueError: not a LoRA adapter, an unreadable file, keys other than LoRA A/B weights, or A
        and B that do not pair up.
    """
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG_FILE, directory / ADAPTER_WEIGHTS_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"--init-from-peft {directory}: no such directory; pass a folder written by PEFT's save_pretrained (adapter_config.json + adapter_model.safetensors)")
    if not config_path.exists():
        raise FileNotFoundError(f"--init-from-peft {directory}: no {ADAPTER_CONFIG_FILE}; pass a folder written by PEFT's save_pretrained")
    if not weights_path.exists():
        legacy = " (it holds adapter_model.bin: re-save it with save_pretrained(..., safe_serialization=True))" if (directory / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"--init-from-peft {directory}: no {ADAPTER_WEIGHTS_FILE}{legacy}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); re-save the adapter with PEFT") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: expected a LoRA adapter (peft_type 'LORA'), found peft_type {config.get('peft_type')!r}; only LoRA adapters can start a Bayesian LoRA run")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)):
            raise ValueError(f"{config_path}: expected a number for {key!r}, found {config.get(key)!r}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{weights_path} is not a readable safetensors file ({err}); re-save the adapter") from None
    lora_A, lora_B, other = {}, {}, []
    for key, value in tensors.items():
        stem = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else None
        if stem is not None and stem.endswith(".lora_A.weight"):
            lora_A[stem[: -len(".lora_A.weight")]] = value
        elif stem is not None and stem.endswith(".lora_B.weight"):
            lora_B[stem[: -len(".lora_B.weight")]] = value
        else:
            other.append(key)
    if other:
        raise ValueError(
            f"{weights_path}: expected only '{KEY_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' keys (plain LoRA on "
            f"Linear layers), found {other[:4]}{' ...' if len(other) > 4 else ''}; adapters with embedding LoRA, "
            "DoRA magnitudes, biases or modules_to_save cannot start a run"
        )
    if set(lora_A) != set(lora_B) or not lora_A:
        raise ValueError(f"{weights_path}: lora_A and lora_B must cover the same (non-empty) set of modules; "
                         f"only A: {sorted(set(lora_A) - set(lora_B))[:4]}, only B: {sorted(set(lora_B) - set(lora_A))[:4]}")
    return PeftLoRAAdapter(config, lora_A, dict((k, lora_B[k]) for k in lora_A), source=str(directory))


def target_modules_flag(config: dict) -> str:
    """The ``--target-modules`` value that selects what an adapter config's ``target_modules`` selects."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return f"re:{targets}"
    return ",".join(targets or [])


def check_adapter_config(adapter: PeftLoRAAdapter, *, rank: int, alpha: float) -> None:
    """Rank and alpha against the run's ``--rank`` / ``--alpha``, and no LoRA variant we do not implement.

    :raises ValueError: naming every mismatch and the flag (or PEFT option) to change.
    """
    problems = []
    if adapter.rank != rank:
        problems.append(f"rank: adapter r = {adapter.rank}, run --rank {rank} (pass --rank {adapter.rank})")
    if adapter.alpha != float(alpha):
        problems.append(f"alpha: adapter lora_alpha = {adapter.alpha:g}, run --alpha {alpha:g} (pass --alpha {adapter.alpha:g})")
    for option, neutral in _NEUTRAL_OPTIONS.items():
        value = adapter.config.get(option, neutral)
        if value not in (neutral, None, {}, [], False):
            problems.append(f"{option} = {value!r} (this library implements plain LoRA only: needs {neutral!r})")
    shapes = {tuple(a.shape[:1]) for a in adapter.lora_A.values()} | {tuple(b.shape[1:]) for b in adapter.lora_B.values()}
    if shapes != {(adapter.rank,)}:
        problems.append(f"tensor ranks {sorted(shapes)} differ from the config's r = {adapter.rank}")
    if problems:
        raise ValueError(f"--init-from-peft {adapter.source} does not fit this run: " + "; ".join(problems))


def check_adapter_modules(adapter: PeftLoRAAdapter, model, *, target_modules: str) -> None:
    """The adapter's module paths and shapes against the adapters of ``model`` (a ``BayesianLoRAModel``).

    :raises ValueError: naming the paths only in the adapter, only in the run, or of another shape, with
        the ``--target-modules`` value that selects the adapter's layers.
    """
    layers = {layer._pyro_name: layer for layer in model.adapters.values()}
    only_adapter = [p for p in adapter.module_paths if p not in layers]
    only_run = [p for p in layers if p not in adapter.lora_A]
    wrong = []
    for path in set(adapter.module_paths) & set(layers):
        layer = layers[path]
        expected_A, expected_B = (layer.rank, layer.in_features), (layer.out_features, layer.rank)
        if tuple(adapter.lora_A[path].shape) != expected_A or tuple(adapter.lora_B[path].shape) != expected_B:
            wrong.append(f"{path}: adapter A {tuple(adapter.lora_A[path].shape)}, B {tuple(adapter.lora_B[path].shape)} vs "
                         f"model A {expected_A}, B {expected_B}")
    if only_adapter or only_run:
        raise ValueError(
            f"--init-from-peft {adapter.source} adapts other layers than --target-modules {target_modules!r}: "
            f"only in the adapter {only_adapter[:4]}{' ...' if len(only_adapter) > 4 else ''}, "
            f"only in this run {only_run[:4]}{' ...' if len(only_run) > 4 else ''}; "
            f"pass --target-modules {target_modules_flag(adapter.config)!r} (the adapter's target_modules)"
        )
    if wrong:
        raise ValueError(f"--init-from-peft {adapter.source} has tensors of other shapes than the model ({'; '.join(sorted(wrong)[:4])}): "
                         "was it trained on another --model?")


def peft_init_loc_fn(adapter: PeftLoRAAdapter):
    """An ``init_loc_fn`` (``layer -> (rank, in_features)``) returning the adapter's A of that layer."""

    def init_loc(layer) -> torch.Tensor:
        B = layer._parameters["lora_B"]
        return adapter.lora_A[layer._pyro_name].to(device=B.device, dtype=B.dtype).clone()

    return init_loc


@torch.no_grad()
def init_lora_B_from_peft(model, adapter: PeftLoRAAdapter, *, paths: Optional[Sequence[str]] = None) -> None:
    """Set every adapter's ``lora_B`` parameter of ``model`` to the adapter's B (training code calls it
    once, before training; the guide never writes into the model)."""
    for layer in model.adapters.values():
        if paths is None or layer._pyro_name in paths:
            layer.lora_B.copy_(adapter.lora_B[layer._pyro_name])
