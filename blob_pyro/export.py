"""Export a finished run as a PEFT LoRA adapter: ``python -m blob_pyro.export --run-dir R --output-dir D``.

Writes the posterior mean of the run's adapters (A at the guide's mean M, B at its value, or its mean for
a guide whose B is random; scaling alpha / r) in the PEFT format of :mod:`blob_pyro.peft_adapter`:
``D/adapter_config.json`` + ``D/adapter_model.safetensors``, so that
``PeftModel.from_pretrained(base_model, D)`` gives the run's "N = 0" class probabilities (prediction at the
posterior mean, BLoB section 3). Guides with a per-site scale (blob, meanfield, normal) also get
``D/adapter_posterior_std.safetensors`` (the posterior std, keys ``...lora_A.std``; PEFT ignores the file),
and ``D/blob_pyro_export.json`` records where the adapter came from.

What cannot be exported is refused, with what to do instead: an unfinished run (no ``metrics.json``),
a baseline run (laplace, tfb, mc_dropout: export the SVI run in its ``base/`` folder, whose point estimate
is their posterior mean; ensemble: export a ``member_<k>/``), and a sequence-classification run (its
classification head is randomly initialised when the base model loads and is not part of a LoRA adapter).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from blob_pyro.config import TrainConfig, config_parser
from blob_pyro.peft_adapter import ADAPTER_CONFIG_FILE, POSTERIOR_STD_FILE, peft_key, write_peft_adapter

__all__ = ["ExportConfig", "export", "check_exportable", "posterior_mean_adapter", "main"]

EXPORT_INFO_FILE = "blob_pyro_export.json"


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ExportConfig:
    """Write a finished run's posterior mean as a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)."""

    run_dir: Optional[str] = _f(None, "finished run directory written by python -m blob_pyro.train --method svi (required)")
    output_dir: Optional[str] = _f(None, "folder to write the PEFT adapter into (required); load it with PeftModel.from_pretrained(base, output_dir)")
    posterior_std: bool = _f(True, f"also write the guide's posterior std to {POSTERIOR_STD_FILE} (guides with a per-site scale: blob, meanfield, normal)")
    overwrite: bool = _f(False, "allow replacing an adapter already in --output-dir")
    device: str = _f("cpu", "device to rebuild the run on: cpu, cuda[:i] or auto")

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("--run-dir is required: the directory of a finished training run")
        if not self.output_dir:
            raise ValueError("--output-dir is required: the folder to write the PEFT adapter into")

    @classmethod
    def from_argv(cls, argv: Optional[Sequence[str]] = None) -> "ExportConfig":
        args = config_parser(cls, prog="python -m blob_pyro.export").parse_args(argv)
        try:
            return cls(**vars(args))
        except ValueError as err:
            raise SystemExit(f"python -m blob_pyro.export: error: {err}") from None


def check_exportable(run_dir: Path) -> TrainConfig:
    """The run's config, if the run can be exported; else a ``ValueError`` saying why and what to do."""
    if not (run_dir / "config.json").exists():
        raise ValueError(f"--run-dir {run_dir}: no config.json; expected the --output-dir of a python -m blob_pyro.train run")
    cfg = TrainConfig.load(run_dir / "config.json")
    if not (run_dir / "metrics.json").exists():
        raise ValueError(f"--run-dir {run_dir}: the run is not finished (no metrics.json); wait for it to finish or rerun it")
    if cfg.method in ("laplace", "tfb", "mc_dropout"):
        base = Path(cfg.base_run) if cfg.base_run else run_dir / "base"
        raise ValueError(
            f"--run-dir {run_dir} is a --method {cfg.method} run: its posterior mean is the point estimate of its base run; "
            f"export that: --run-dir {base}"
        )
    if cfg.method == "ensemble":
        raise ValueError(f"--run-dir {run_dir} is an ensemble (a mixture, not one adapter); export one member, e.g. --run-dir {run_dir / 'member_0'}")
    if cfg.task_type != "causal_lm":
        raise ValueError(
            f"--run-dir {run_dir} is a --task-type {cfg.task_type} run: its classification head is initialised at random when "
            "the base model loads and is not part of a LoRA adapter, so PEFT could not reproduce it; only causal_lm runs export"
        )
    return cfg


@torch.no_grad()
def posterior_mean_adapter(model, guide) -> tuple[dict, dict, dict]:
    """``(lora_A, lora_B, std)`` of a ``BayesianLoRAModel`` and its guide, keyed by module path.

    A: ``(r, in)`` the guide's posterior mean; B: ``(out, r)`` the model's parameter, or the mean of the
    B site for a guide whose B is random (then E[B A] = E[B] E[A] under the guide's independent factors).
    std: ``{peft_key(path, factor, "std"): tensor}`` for guides with a ``scale(site)`` method, else empty.
    """
    means = guide.posterior_mean()
    lora_A, lora_B, std = {}, {}, {}
    for site, layer in model.adapters.items():
        path = layer._pyro_name
        lora_A[path] = means[site].float().cpu()
        lora_B[path] = means.get(layer.site_name_B, layer.lora_B).float().cpu()
    if guide.has_loc_and_scale():
        for site in guide.site_names:
            path = model.adapters[site]._pyro_name
            std[peft_key(path, "lora_A", "std")] = guide.loc_and_scale(site)[1].float().cpu()
            if guide.bayesian_B:
                std[peft_key(path, "lora_B", "std")] = guide.loc_and_scale(model.adapters[site].site_name_B)[1].float().cpu()
    return lora_A, lora_B, std


def export(cfg: ExportConfig) -> Path:
    """Export ``cfg.run_dir`` to ``cfg.output_dir``; returns the output directory."""
    from blob_pyro.baselines.common import load_run
    from blob_pyro.preflight import check_device

    run_dir, out = Path(cfg.run_dir), Path(cfg.output_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir} does not exist; pass the --output-dir of a finished training run")
    run_cfg = check_exportable(run_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: expected a folder for the adapter, found a file; choose another --output-dir")
    check_device(cfg.device)  # before anything is written
    if (out / ADAPTER_CONFIG_FILE).exists() and not cfg.overwrite:
        raise ValueError(f"--output-dir {out} already holds an adapter ({ADAPTER_CONFIG_FILE}); pass --overwrite or choose another folder")
    loaded = load_run(run_dir, device=cfg.device)  # the run's model and guide, parameters restored
    lora_A, lora_B, std = posterior_mean_adapter(loaded.model, loaded.guide)
    write_peft_adapter(
        out, lora_A=lora_A, lora_B=lora_B, rank=run_cfg.rank, alpha=run_cfg.alpha, dropout=run_cfg.lora_dropout,
        base_model_name_or_path=run_cfg.model, task_type="CAUSAL_LM", posterior_std=std if cfg.posterior_std else None,
    )
    if not (cfg.posterior_std and std) and (out / POSTERIOR_STD_FILE).exists():
        (out / POSTERIOR_STD_FILE).unlink()  # a stale std file from an earlier export must not describe this adapter
    info = {
        "run_dir": str(run_dir.resolve()), "guide": run_cfg.guide, "model": run_cfg.model, "task": run_cfg.task,
        "exported": "posterior mean: A = the guide's mean of A, B = " + (
            "the guide's mean of B (B is random under this guide)" if loaded.guide.bayesian_B else "the trained B"),
        "scaling": run_cfg.alpha / run_cfg.rank, "posterior_std_file": POSTERIOR_STD_FILE if (cfg.posterior_std and std) else None,
        "posterior_std_keys": "base_model.model.<module path>.lora_A.std (and .lora_B.std when B is random); layers without an "
                              "entry are deterministic under the guide",
        "export_config": dataclasses.asdict(cfg),
    }
    (out / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote PEFT LoRA adapter of {run_dir} ({len(lora_A)} layers, r = {run_cfg.rank}, alpha = {run_cfg.alpha:g}) to {out}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    cfg = ExportConfig.from_argv(argv)
    try:
        return export(cfg)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"python -m blob_pyro.export: error: {err}") from None


if __name__ == "__main__":
    main()
