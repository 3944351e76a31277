"""The training entry point end to end on a tiny saved model: files, metrics, errors, resumability rules."""

import json

import pytest
import torch

from blob_pyro.checkpoint import load_adapter_and_guide
from blob_pyro.config import TrainConfig
from blob_pyro.train import main
from tests.conftest import write_bigbench_task


def run_args(model_dir, task, out, *extra):
    return [
        "--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "24",
        "--num-validation", "12", "--max-steps", "4", "--batch-size", "4", "--eval-samples", "2",
        "--eval-batch-size", "6", "--rank", "2", "--target-modules", "q_proj,v_proj,lm_head", *extra,
    ]


def test_train_writes_every_run_file(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    metrics = main(run_args(tiny_causal_lm_dir, task, out))
    assert set(metrics) == {"zero_shot", "mean", "samples_2"}
    saved = json.loads((out / "metrics.json").read_text())
    for mode in saved.values():
        assert set(mode) == {"acc", "ece", "nll", "brier", "n_examples", "ece_bins"}
        assert mode["n_examples"] == 12 and mode["ece_bins"] == 15 and 0 <= mode["ece"] <= 100
    config = TrainConfig.load(out / "config.json")
    assert config.max_steps == 4 and config.guide == "blob"
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 24 and len(split["validation"]) == 12 and not set(split["train"]) & set(split["validation"])
    assert (out / "adapter.safetensors").exists() and (out / "guide.safetensors").exists()
    assert len((out / "train_log.jsonl").read_text().splitlines()) >= 2


def test_saved_run_restores_identical_predictions(tmp_path, tiny_causal_lm_dir):
    import pyro

    from blob_pyro.assembly import build_guide, build_model, load_network, load_task, make_split, prepare_data
    from blob_pyro.evaluation.predictive import posterior_mean_probs
    from blob_pyro.assembly import batches

    task_file = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    main(run_args(tiny_causal_lm_dir, task_file, out, "--no-zero-shot", "--eval-samples", "0"))
    probs = []
    for _ in range(2):  # two fresh builds from the saved config: the second must not reuse the first's params
        pyro.clear_param_store()
        cfg = TrainConfig.load(out / "config.json")
        task = load_task(cfg)
        network, tokenizer = load_network(cfg, task.num_choices, dtype=torch.float32)
        data = prepare_data(cfg, task, make_split(cfg, task), tokenizer)
        model = build_model(cfg, network, data)
        guide = build_guide(cfg, model)
        load_adapter_and_guide(out, model, guide)
        model.eval()
        probs.append(posterior_mean_probs(model, guide, batches(data, data.validation, batch_size=6, device=torch.device("cpu"))))
    torch.testing.assert_close(probs[0], probs[1])
    expected = json.loads((out / "metrics.json").read_text())["mean"]["acc"]
    labels = data.validation.labels
    assert (probs[0].argmax(-1) == labels).float().mean().item() == pytest.approx(expected)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path, tiny_causal_lm_dir):
    from blob_pyro.guides import BLoBGuide
    from tests.helpers import tiny_bayesian_llama

    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    main(run_args(tiny_causal_lm_dir, task, out, "--no-zero-shot", "--eval-samples", "0"))
    model = tiny_bayesian_llama()  # a different architecture than the saved run
    with pytest.raises(ValueError, match="does not match the model built from the run config"):
        load_adapter_and_guide(out, model, BLoBGuide(model))
    (out / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter_and_guide(out, model, BLoBGuide(model))


def test_finished_run_is_not_overwritten_without_flag(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    main(run_args(tiny_causal_lm_dir, task, out, "--no-zero-shot", "--eval-samples", "0"))
    before = (out / "adapter.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a finished run"):
        main(run_args(tiny_causal_lm_dir, task, out, "--no-zero-shot", "--eval-samples", "0"))
    assert (out / "adapter.safetensors").read_bytes() == before


@pytest.mark.parametrize("flag,value,message", [
    ("--rank", "0", "--rank must be a positive integer"),
    ("--lr", "-1", "--lr must be a finite positive number"),
    ("--dist-timeout-minutes", "0", "--dist-timeout-minutes must be a finite positive number"),
    ("--lora-dropout", "1.5", "--lora-dropout must be in"),
    ("--guide", "nonexistent", "unknown guide 'nonexistent'"),
])
def test_bad_hyper_parameters_fail_before_loading_anything(flag, value, message, capsys):
    with pytest.raises(SystemExit, match=message):
        TrainConfig.from_argv([flag, value])


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        TrainConfig.from_argv(["--help"])
    text = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text


def test_unknown_target_module_error_reaches_the_cli(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    with pytest.raises(ValueError, match="matched no nn.Linear layer.*q_proj"):
        main(run_args(tiny_causal_lm_dir, task, tmp_path / "run", "--target-modules", "qkv"))
