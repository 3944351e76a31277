"""--gradient-checkpointing: activations recomputed in the backward pass, the same training run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from blob_pyro import train
from blob_pyro.assembly import enable_activation_checkpointing
from blob_pyro.train import main
from tests.conftest import write_bigbench_task


def run(tmp_path, model_dir, task, name, extra):
    out = tmp_path / name
    main(["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16",
          "--num-validation", "8", "--max-steps", "3", "--batch-size", "4", "--eval-samples", "2", "--rank", "2",
          "--device", "cpu", "--no-zero-shot", "--seed", "2", *extra])
    return {**{f"adapter/{k}": v for k, v in load_file(out / "adapter.safetensors").items()},
            **{f"guide/{k}": v for k, v in load_file(out / "guide.safetensors").items()}}, out


def test_checkpointed_training_reaches_the_same_parameters(tmp_path, tiny_causal_lm_dir, monkeypatch):
    """Flipout signs and LoRA dropout are random inside the recomputed layers, and A is random: any draw
    that differs between the forward pass and its recomputation would change the gradients."""
    import blob_pyro.models.lora as lora

    draws = []

    def counting_signs(shape, like):
        draws.append(tuple(shape))
        return flipout_signs(shape, like)

    flipout_signs = lora.flipout_signs
    monkeypatch.setattr(lora, "flipout_signs", counting_signs)
    task = write_bigbench_task(tmp_path / "task.json")
    extra = ["--flipout", "token", "--lora-dropout", "0.1", "--eps", "0.3", "--lr", "0.01"]
    plain, _ = run(tmp_path, tiny_causal_lm_dir, task, "plain", extra)
    plain_draws, draws[:] = len(draws), []
    checkpointed, out = run(tmp_path, tiny_causal_lm_dir, task, "checkpointed", [*extra, "--gradient-checkpointing"])
    # the decoder layers' adapters (q_proj, v_proj) draw their signs again when the backward pass recomputes
    # them (lm_head is outside the checkpointed layers): more draws, and the same parameters
    assert len(draws) > plain_draws
    assert json.loads((out / "config.json").read_text())["gradient_checkpointing"] is True
    assert plain.keys() == checkpointed.keys()
    assert max(float(v.abs().max()) for k, v in plain.items() if "lora_B" in k) > 1e-3  # B moved from 0
    for key, value in plain.items():  # bitwise here; the tolerance only absorbs a changed summation order
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-7, msg=key)


def test_checkpointing_with_flipout_under_torchrun_is_refused_before_anything_is_written(tmp_path, tiny_causal_lm_dir,
                                                                                         monkeypatch):
    class TwoProcesses:
        active, world_size, rank = True, 2, 0

    monkeypatch.setattr(train.DataParallel, "from_environment", staticmethod(lambda device, **kwargs: TwoProcesses()))
    task = write_bigbench_task(tmp_path / "task.json")
    with pytest.raises(ValueError, match="pass --flipout none or drop --gradient-checkpointing"):
        run(tmp_path, tiny_causal_lm_dir, task, "refused", ["--flipout", "token", "--gradient-checkpointing"])
    assert not (tmp_path / "refused").exists()


def test_a_network_without_checkpointing_support_is_refused():
    with pytest.raises(ValueError, match="does not support activation checkpointing.*without the flag"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_gradient_checkpointing_may_change_on_resume_and_reuse():
    from blob_pyro.config import RESULT_NEUTRAL_FIELDS, TrainConfig
    from blob_pyro.resume import config_differences
    from blob_pyro.rundir import config_differences_for_reuse

    recorded = TrainConfig().to_dict()
    toggled = TrainConfig(gradient_checkpointing=True)
    assert "gradient_checkpointing" in RESULT_NEUTRAL_FIELDS
    assert config_differences(recorded, toggled) == {}
    assert config_differences_for_reuse(recorded, toggled.to_dict()) == {}
    assert config_differences(recorded, TrainConfig(lr=0.5)) == {"lr": (recorded["lr"], 0.5)}  # a real change is named
