"""Run files: adapter and guide parameters as safetensors, validated on load.

* ``adapter.safetensors``: every deterministic adapter parameter, keyed ``<module path>.lora_B``.
* ``guide.safetensors``: the guide's ``state_dict()`` (e.g. BLoB's M and G per site).

Loading checks that names and shapes match the model built from the run's config, and reports what
differs; a truncated or corrupt file gives an error that names it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["ADAPTER_FILE", "GUIDE_FILE", "save_adapter_and_guide", "load_adapter_and_guide", "adapter_state"]

ADAPTER_FILE = "adapter.safetensors"
GUIDE_FILE = "guide.safetensors"


def adapter_state(model) -> dict[str, torch.Tensor]:
    """``{<module path>.lora_B: (out, rank)}`` for every adapter of a BayesianLoRAModel."""
    return {f"{layer._pyro_name}.lora_B": layer.lora_B.detach() for layer in model.adapters.values()}


def _save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written file behind


def save_adapter_and_guide(run_dir: Path, model, guide) -> None:
    run_dir = Path(run_dir)
    _save(adapter_state(model), run_dir / ADAPTER_FILE)
    _save(guide.state_dict(), run_dir / GUIDE_FILE)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run did not finish saving; retrain or pick another run")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is corrupt or truncated: retrain the run") from err


def _check_match(found: dict, expected: dict, path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(found) & set(expected) if tuple(found[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            details.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if wrong:
            details.append("shape mismatch " + ", ".join(f"{k}: file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:4]))
        raise ValueError(
            f"{path} does not match the model built from the run config ({'; '.join(details)}): "
            "check --model, --target-modules, --rank and --guide against the run's config.json"
        )


def load_adapter_and_guide(run_dir: Path, model, guide) -> None:
    """Restore adapter B and guide parameters in place, after validating names and shapes."""
    run_dir = Path(run_dir)
    adapters = _read(run_dir / ADAPTER_FILE)
    _check_match(adapters, adapter_state(model), run_dir / ADAPTER_FILE)
    guide_state = _read(run_dir / GUIDE_FILE)
    _check_match(guide_state, guide.state_dict(), run_dir / GUIDE_FILE)
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.copy_(adapters[f"{layer._pyro_name}.lora_B"])
    guide.load_state_dict(guide_state)
