"""``python -m blob_pyro.evaluate`` on tiny saved runs (a random Llama + a tiny BPE tokenizer, 3 SVI steps)."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blob_pyro.evaluate import EvaluateConfig, main as evaluate_main
from blob_pyro.evaluation.inference_data import load_inference_data
from blob_pyro.evaluation.plots import posterior_std_per_layer, reliability_diagram
from blob_pyro.train import main as train_main

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz 0.23's refactor notice

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = ["home", "plan", "Riley", "frost", "college", "evening", "attacks", "new", "Tracy", "which"]


def _write_task(path, name, choices, n):
    examples = [
        {"input": f"{WORDS[i % 10]} {WORDS[(3 * i + 1) % 10]} {WORDS[(7 * i) % 10]}?",
         "target_scores": {c: int(j == i % len(choices)) for j, c in enumerate(choices)}}
        for i in range(n)
    ]
    path.write_text(json.dumps({"name": name, "examples": examples}))
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_bpe_tokenizer):
    """A saved tiny model, an ID task (3 choices) and an OOD task (2 choices)."""
    root = tmp_path_factory.mktemp("evaluate")
    tok = tiny_bpe_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    id_task = _write_task(root / "tiny_id.json", "tiny_id", ["Go home", "Make a plan", "Find Riley"], 30)
    ood_task = _write_task(root / "tiny_ood.json", "tiny_ood", ["Yes", "No"], 20)
    return root, id_task, ood_task


def _train(root, task, guide, name, *extra):
    run = root / name
    if not (run / "metrics.json").exists():
        with torch.random.fork_rng():
            train_main([
                "--model", str(root / "model"), "--task", str(task), "--guide", guide, "--num-train", "12",
                "--num-validation", "8", "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--eval-samples", "2",
                "--eval-batch-size", "8", "--no-zero-shot", "--device", "cpu", "--output-dir", str(run), *extra,
            ])
    return run


@pytest.fixture(scope="module")
def blob_run(tiny_setup):
    root, id_task, _ = tiny_setup
    return _train(root, id_task, "blob", "blob_run")


def _evaluate(run, out, *extra):
    return evaluate_main(["--run-dir", str(run), "--output-dir", str(out), "--device", "cpu", "--eval-batch-size", "8", *extra])


def test_evaluate_writes_metrics_inference_data_uncertainty_and_plots(tiny_setup, blob_run, tmp_path):
    _, _, ood_task = tiny_setup
    out = tmp_path / "eval"
    result = _evaluate(blob_run, out, "--eval-tasks", f"run,{ood_task}", "--eval-samples", "3", "--max-examples", "6",
                       "--loo-examples", "5")

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["tiny_id", "tiny_ood"]
    assert metrics["tiny_id"]["role"] == "in_distribution" and metrics["tiny_ood"]["role"] == "ood"
    assert metrics["tiny_id"]["n_examples"] == 6 and metrics["tiny_ood"]["n_examples"] == 6
    assert metrics["tiny_ood"]["num_classes"] == 2
    for block in metrics.values():
        assert {"mean", "samples_3"} <= set(block)
        assert set(block["samples_3"]) == {"acc", "ece", "nll", "brier", "n_examples", "ece_bins"}
    assert result["metrics"] == metrics

    # The run's own task is evaluated on the first examples of its validation split (never trained on).
    split = json.loads((blob_run / "split.json").read_text())
    used = json.loads((out / "evaluate_run.json").read_text())["examples"]
    assert used["tiny_id"]["file_indices"] == split["validation"][:6]
    assert not set(used["tiny_id"]["file_indices"]) & set(split["train"])

    # The InferenceData reopens with arviz and agrees with metrics.json.
    idata = load_inference_data(out / "inference_data_tiny_id.nc")
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data"}
    assert idata.posterior_predictive["probs"].shape == (1, 3, 6, 3)
    assert idata.posterior_predictive["y"].shape == (1, 3, 6)
    assert len(idata.posterior.data_vars) == 5  # q_proj and v_proj of 2 blocks + lm_head: all sites by default
    assert idata.attrs["guide"] == "blob" and idata.attrs["role"] == "in_distribution"
    assert json.loads(idata.attrs["versions"])["pyro"]
    ll = idata.posterior_predictive["held_out_log_likelihood"].values[0]  # (S, n): NLL = -mean_i log mean_s exp(ll)
    assert -np.mean(np.log(np.mean(np.exp(ll), axis=0))) == pytest.approx(metrics["tiny_id"]["samples_3"]["nll"], rel=1e-5)
    # held-out lpd, reported as such: -n * NLL of the averaged predictive
    for name, block in metrics.items():
        assert block["held_out_lpd"] == pytest.approx(-block["n_examples"] * block["samples_3"]["nll"], rel=1e-5)
    assert idata.attrs["held_out_lpd"] == pytest.approx(metrics["tiny_id"]["held_out_lpd"], rel=1e-6)
    # log_likelihood: 5 of the 12 TRAINING examples (seeded), the same in every task's file; az.loo reads it
    train_ids = list(idata.log_likelihood["train_example"].values)
    assert len(train_ids) == 5 and set(train_ids) <= set(split["train"]) and len(set(train_ids)) == 5
    assert idata.log_likelihood["y_train"].shape == (1, 3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 3 draws: Pareto k warnings
        import arviz as az

        assert az.loo(idata).n_data_points == 5
    np.testing.assert_array_equal(idata.observed_data["y"].values,
                                  [r["label"] for r in json.loads((out / "per_example_tiny_id.json").read_text())])
    ood_idata = load_inference_data(out / "inference_data_tiny_ood.nc")
    assert list(ood_idata.posterior_predictive["class"].values) == ["A", "B"]
    # both tasks see the same posterior draws of A, hence the same training log-likelihoods
    site = "lm_head.lora_A"
    np.testing.assert_array_equal(ood_idata.posterior[site].values, idata.posterior[site].values)
    np.testing.assert_array_equal(ood_idata.log_likelihood["y_train"].values, idata.log_likelihood["y_train"].values)

    summary = json.loads((out / "uncertainty.json").read_text())
    assert summary["in_distribution"] == "tiny_id" and summary["num_draws"] == 3
    assert set(summary["ood_detection"]) == {"tiny_ood"}
    for score in ("max_prob", "entropy", "mutual_information", "entropy_normalized"):
        assert 0.0 <= summary["ood_detection"]["tiny_ood"][score]["auroc"] <= 1.0
    task = summary["tasks"]["tiny_id"]
    assert task["total"]["mean"] == pytest.approx(task["aleatoric"]["mean"] + task["epistemic"]["mean"])
    assert task["epistemic"]["mean"] > 0  # BLoB draws disagree
    assert "note_num_classes" in summary  # K = 3 vs K = 2 flagged
    assert len(summary["posterior_std"]) == 5
    spread = summary["weight_space_spread"]
    assert set(spread) == set(summary["posterior_std"])
    for site, row in spread.items():
        assert row["mean_std"] == pytest.approx(summary["posterior_std"][site]["mean"], rel=1e-5)
        assert row["sampled_update_rms"] > 0 and row["ratio"] > 0

    for png in ["reliability_tiny_id", "reliability_tiny_ood", "uncertainty_histograms", "accuracy_coverage", "posterior_std"]:
        assert (out / "plots" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("scoring", ["choice_loglik", "letters", "legacy_letters"])
def test_reloaded_run_reproduces_the_training_runs_own_metrics(tiny_setup, tmp_path, scoring):
    """Same adapters, same validation examples in the same order: the posterior-mean metrics must agree."""
    root, id_task, ood_task = tiny_setup
    run = _train(root, id_task, "blob", f"run_{scoring}", "--answer-scoring", scoring.replace("legacy_", ""))
    if scoring == "legacy_letters":  # a config written before --answer-scoring existed: letters was the only scoring
        run_copy = tmp_path / "legacy"
        shutil.copytree(run, run_copy)
        config = json.loads((run_copy / "config.json").read_text())
        del config["answer_scoring"]
        (run_copy / "config.json").write_text(json.dumps(config))
        run = run_copy
    trained = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "eval"
    _evaluate(run, out, "--eval-tasks", f"run,{ood_task}", "--eval-samples", "2", "--max-examples", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tiny_id"]["n_examples"] == trained["mean"]["n_examples"] == 8
    for key in ("acc", "ece", "nll", "brier"):
        assert metrics["tiny_id"]["mean"][key] == pytest.approx(trained["mean"][key], rel=1e-5, abs=1e-7)
    assert metrics["tiny_ood"]["num_classes"] == 2  # the OOD task gets a head with its own K
    assert load_inference_data(out / "inference_data_tiny_ood.nc").posterior_predictive["probs"].shape == (1, 2, 20, 2)


def test_task_file_equal_to_the_runs_task_uses_the_validation_split(tiny_setup, blob_run, tmp_path):
    root, id_task, _ = tiny_setup
    copy = shutil.copy(id_task, tmp_path / "same_content.json")
    out = tmp_path / "eval"
    _evaluate(blob_run, out, "--eval-tasks", str(copy), "--eval-samples", "2", "--max-examples", "0",
              "--posterior-sites", "lm_head")
    split = json.loads((blob_run / "split.json").read_text())
    used = json.loads((out / "evaluate_run.json").read_text())
    assert used["examples"]["tiny_id"]["file_indices"] == split["validation"]
    assert used["posterior_sites"] == ["lm_head.lora_A"]
    assert list(load_inference_data(out / "inference_data_tiny_id.nc").posterior.data_vars) == ["lm_head.lora_A"]
    summary = json.loads((out / "uncertainty.json").read_text())
    assert summary["ood_detection"] == {}


def test_point_estimate_run_has_one_draw_and_no_posterior_std(tiny_setup, tmp_path):
    root, id_task, ood_task = tiny_setup
    run = _train(root, id_task, "mle", "mle_run")
    out = tmp_path / "eval"
    _evaluate(run, out, "--eval-tasks", f"run,{ood_task}", "--eval-samples", "4", "--max-examples", "4")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(k for k, v in metrics["tiny_id"].items() if isinstance(v, dict)) == {"mean"}
    summary = json.loads((out / "uncertainty.json").read_text())
    assert summary["num_draws"] == 1 and "point-estimate" in summary["note"]
    assert summary["tasks"]["tiny_id"]["epistemic"]["mean"] == 0.0
    assert summary["ood_detection"]["tiny_ood"]["mutual_information"]["auroc"] == 0.5
    assert not (out / "plots" / "posterior_std.png").exists()
    assert "weight_space_spread" not in summary
    idata = load_inference_data(out / "inference_data_tiny_id.nc")
    assert idata.posterior_predictive["probs"].shape[1] == 1
    # log_likelihood (--loo-examples 200 > 12: every training example) = log of the point estimate's
    # probability of the gold label, computed here independently from the reloaded run
    from blob_pyro.assembly import batches
    from blob_pyro.baselines.common import load_run
    from blob_pyro.evaluation.predictive import posterior_mean_probs

    loaded = load_run(run)
    train_batches = batches(loaded.data, loaded.data.train, batch_size=8, device=loaded.device)
    probs = posterior_mean_probs(loaded.model, loaded.guide, train_batches).numpy()
    task, positions = loaded.data.task, loaded.data.split.train
    file_ids = [int(task.file_indices[p]) if task.file_indices else int(p) for p in positions]
    expected = dict(zip(file_ids, np.log(probs[np.arange(len(positions)), loaded.data.train.labels.numpy()])))
    ll = idata.log_likelihood["y_train"]
    assert len(ll["train_example"]) == 12
    for file_id, value in zip(ll["train_example"].values, ll.values[0, 0]):
        assert value == pytest.approx(expected[int(file_id)], abs=1e-5)


def test_checkpoint_that_does_not_match_the_config_fails_clearly(blob_run, tmp_path):
    run = tmp_path / "tampered"
    shutil.copytree(blob_run, run, ignore=shutil.ignore_patterns("evaluation"))
    config = json.loads((run / "config.json").read_text())
    config["rank"] = 4  # the safetensors hold rank-8 factors
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match the model built from the run config \(shape mismatch .*file \(16, 8\) vs model \(16, 4\)"):
        _evaluate(run, tmp_path / "eval")


def test_missing_run_files_fail_clearly(blob_run, tmp_path):
    with pytest.raises(SystemExit, match="--run-dir .*nope: expected the --output-dir of a training run, found no such directory"):
        _evaluate(tmp_path / "nope", tmp_path / "eval")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="expected config.json, found none"):
        _evaluate(tmp_path / "empty", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    run = tmp_path / "no_guide"
    shutil.copytree(blob_run, run, ignore=shutil.ignore_patterns("evaluation", "guide.safetensors"))
    with pytest.raises(FileNotFoundError, match="guide.safetensors is missing"):
        _evaluate(run, tmp_path / "eval")


def test_refuses_to_overwrite_an_earlier_evaluation(blob_run, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds an evaluation"):
        _evaluate(blob_run, out)


@pytest.mark.parametrize(
    "argv, match",
    [
        ([], "--run-dir is required"),
        (["--run-dir", "x", "--eval-samples", "0"], "--eval-samples must be a positive integer, got 0"),
        (["--run-dir", "x", "--max-examples", "-1"], "--max-examples must be >= 0"),
        (["--run-dir", "x", "--loo-examples", "-1"], r"--loo-examples must be an integer >= 0 \(0: every training example\), got -1"),
        (["--run-dir", "x", "--eval-tasks", " , "], "--eval-tasks is empty"),
    ],
)
def test_bad_arguments(argv, match):
    with pytest.raises(SystemExit, match=match):
        EvaluateConfig.from_argv(argv)


def test_duplicate_tasks_and_unknown_sites_are_errors(tiny_setup, blob_run, tmp_path):
    _, id_task, ood_task = tiny_setup
    with pytest.raises(ValueError, match="task 'tiny_ood' appears twice"):
        _evaluate(blob_run, tmp_path / "a", "--eval-tasks", f"run,{ood_task},{ood_task}")
    with pytest.raises(ValueError, match="posterior sites 'k_proj' match none"):
        _evaluate(blob_run, tmp_path / "b", "--posterior-sites", "k_proj")


# --- plots on fixed arrays ------------------------------------------------------------------------------


def test_plot_functions_write_pngs(tmp_path):
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [1.0, 0.0]])
    path = reliability_diagram(probs, [0, 0, 0], tmp_path / "r" / "rel.png", num_bins=5, title="t")
    assert path.read_bytes()[:8] == PNG_MAGIC
    stds = {"model.layers.0.q_proj.lora_A": np.full((2, 3), 0.01), "model.layers.1.q_proj.lora_A": np.full((2, 3), 0.02),
            "lm_head.lora_A": np.full((2, 3), 0.03)}
    assert posterior_std_per_layer(stds, tmp_path / "std.png", prior_scale=0.2).read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="no posterior standard deviations to plot"):
        posterior_std_per_layer({}, tmp_path / "none.png")
