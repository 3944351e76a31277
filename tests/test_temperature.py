"""Temperature scaling: the fit recovers a known T and minimises the calibration NLL; the calibration split is
carved from training data only, seeded and recorded; the method refuses a base run without one, applies T
to the base run's posterior-mean logits, is evaluated by blob_pyro.evaluate, and compare wires it to mle."""

import json
import math

import numpy as np
import pytest
import torch

from blob_pyro.baselines.temperature import MIN_TEMPERATURE, TemperatureScaledHead, fit_temperature
from blob_pyro.data import Split, carve_calibration, load_split_file, stratified_split


# --- the fit ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("true_temperature", [3.0, 0.5])
def test_fit_recovers_the_temperature_of_scaled_logits(true_temperature):
    """Labels drawn from softmax(z); the fit sees logits T* z and must return T*.

    Tolerance: the MLE of beta = 1/T has asymptotic standard error 1 / sqrt(n I), with the Fisher
    information I = mean_i Var_{y ~ softmax(z_i)}(s_iy) of the logits s = T* z fed to the fit (the score
    of beta is s_y - E_p[s]); by the delta method se(T) = T*^2 se(beta). Four standard errors (computed
    here from the same z) leave a chance of ~6e-5 of a false failure, and must be small enough to reject
    the wrong answers 1 and 1 / T*."""
    g = torch.Generator().manual_seed(0)
    n = 8000
    z = 1.5 * torch.randn(n, 4, generator=g, dtype=torch.float64)
    p = torch.softmax(z, -1)
    labels = torch.multinomial(p, 1, generator=g).squeeze(-1)
    logits = true_temperature * z
    fitted = fit_temperature(logits, labels)
    fisher = ((p * logits**2).sum(-1) - (p * logits).sum(-1) ** 2).mean()
    se = true_temperature**2 / math.sqrt(n * float(fisher))
    assert 4 * se < 0.1 * true_temperature  # the test can tell T* from a 10 % error
    assert abs(fitted - true_temperature) < 4 * se, (fitted, se)


def _nll_numpy(logits, labels, t):
    scaled = logits / t
    log_norm = np.log(np.exp(scaled - scaled.max(1, keepdims=True)).sum(1)) + scaled.max(1)
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def test_fit_minimises_the_nll_over_a_grid_and_ignores_per_row_shifts():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 3)) * 4.0  # labels unrelated to half the logits: over-confident, T > 1
    labels = np.where(rng.random(300) < 0.5, logits.argmax(1), rng.integers(0, 3, 300))
    fitted = fit_temperature(torch.tensor(logits), torch.tensor(labels))
    grid = np.exp(np.linspace(np.log(0.1), np.log(30.0), 4001))
    values = np.array([_nll_numpy(logits, labels, t) for t in grid])
    assert fitted > 1.5
    assert _nll_numpy(logits, labels, fitted) <= values.min() + 1e-9
    assert abs(math.log(fitted) - math.log(grid[values.argmin()])) <= np.diff(np.log(grid))[0]
    shifted = logits + rng.normal(size=(300, 1)) * 10.0  # e.g. log-probabilities instead of logits
    assert fit_temperature(torch.tensor(shifted), torch.tensor(labels)) == pytest.approx(fitted, rel=1e-6)
    # separable calibration data: the NLL keeps falling as T -> 0; the fit stops where it is ~0, inside the bounds
    separable = np.array([[5.0, 0.0], [0.0, 5.0]])
    t = fit_temperature(torch.tensor(separable), torch.tensor([0, 1]))
    assert MIN_TEMPERATURE <= t < 1.0 and _nll_numpy(separable, np.array([0, 1]), t) < 1e-8
    with pytest.raises(ValueError, match="finite logits"):
        fit_temperature(torch.tensor([[0.0, -math.inf]]), torch.tensor([0]))


def test_temperature_scaled_head_divides_the_class_logits():
    class Fixed(torch.nn.Module):
        num_classes = 2

        def forward(self, network, input_ids, attention_mask, **unused):
            return torch.tensor([[2.0, -4.0]])

    head = TemperatureScaledHead(Fixed(), 2.0)
    assert head.num_classes == 2 and torch.equal(head(None, None, None), torch.tensor([[1.0, -2.0]]))
    with pytest.raises(ValueError, match="finite positive"):
        TemperatureScaledHead(Fixed(), 0.0)


# --- the calibration split ----------------------------------------------------------------------------

def test_calibration_is_carved_from_train_stratified_disjoint_and_seeded(tmp_path):
    labels = [0] * 100 + [1] * 60 + [2] * 40
    split = stratified_split(labels, num_train=100, num_validation=50, seed=3)
    carved = carve_calibration(split, labels, size=10, seed=3)
    assert sorted(carved.calibration + carved.train) == sorted(split.train)  # only training examples move
    assert carved.validation == split.validation
    assert not set(carved.calibration) & set(carved.validation) and not set(carved.calibration) & set(carved.train)
    assert len(carved.train) == 90 and len(carved.calibration) == 10
    assert sorted(labels[i] for i in carved.calibration) == [0] * 5 + [1] * 3 + [2] * 2  # the train shares 50/30/20
    assert carved.train == [i for i in split.train if i not in set(carved.calibration)]  # training order kept
    assert carve_calibration(split, labels, size=10, seed=3) == carved
    assert carve_calibration(split, labels, size=10, seed=4).calibration != carved.calibration
    record = carved.to_dict()
    assert record["num_calibration"] == 10 and record["num_train"] == 90
    (tmp_path / "split.json").write_text(json.dumps(record))
    assert load_split_file(tmp_path / "split.json") == carved
    with pytest.raises(ValueError, match="lower --num-calibration or raise --num-train"):
        carve_calibration(split, labels, size=100, seed=3)
    with pytest.raises(ValueError, match="carve calibration once"):
        carve_calibration(carved, labels, size=2, seed=3)
    with pytest.raises(ValueError, match="calibration and validation share 1 indices"):
        Split(train=[1], validation=[2], seed=0, procedure="hand-made", calibration=[2])


def test_make_split_holds_out_calibration_and_keeps_the_validation_split(tmp_path):
    from blob_pyro.assembly import load_task, make_split
    from blob_pyro.config import TrainConfig
    from tests.conftest import write_bigbench_task

    task_file = write_bigbench_task(tmp_path / "task.json", num_examples=60)
    cfg = TrainConfig(task=str(task_file), num_train=30, num_validation=12, split_seed=5)
    task = load_task(cfg)
    plain = make_split(cfg, task)
    cal_cfg = TrainConfig(task=str(task_file), num_train=30, num_validation=12, split_seed=5, num_calibration=6)
    held = make_split(cal_cfg, task)
    assert held.validation == plain.validation and len(held.train) == 24 and len(held.calibration) == 6
    assert set(held.calibration) <= set(plain.train)
    assert make_split(cal_cfg, task) == held  # stable under the seed
    with pytest.raises(ValueError, match="--num-calibration must be >= 0"):
        TrainConfig(num_calibration=-1)


# --- the method, end to end on a tiny saved model --------------------------------------------------------

def _args(model_dir, task, out, *extra):
    return ["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16",
            "--num-validation", "8", "--max-steps", "3", "--batch-size", "4", "--eval-samples", "2",
            "--eval-batch-size", "8", "--rank", "2", "--lr", "0.05", "--no-zero-shot", "--device", "cpu", *extra]


def test_temperature_scales_the_base_runs_logits_and_refuses_a_run_without_calibration(tmp_path, tiny_causal_lm_dir):
    from blob_pyro.rundir import load_predictions
    from blob_pyro.config import TrainConfig
    from blob_pyro.evaluate import main as evaluate_main
    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task

    task = write_bigbench_task(tmp_path / "task.json")
    base = tmp_path / "mle"
    base_metrics = main(_args(tiny_causal_lm_dir, task, base, "--guide", "mle", "--num-calibration", "4"))
    split = json.loads((base / "split.json").read_text())
    assert len(split["calibration"]) == 4 and len(split["train"]) == 12 and len(split["validation"]) == 8
    assert not set(split["calibration"]) & (set(split["train"]) | set(split["validation"]))
    assert json.loads((base / "run.json").read_text())["num_train"] == 12

    out = tmp_path / "temperature"
    metrics = main(_args(tiny_causal_lm_dir, task, out, "--method", "temperature", "--guide", "mle",
                         "--num-calibration", "4", "--base-run", str(base)))
    assert not (out / "base").exists()  # nothing trained
    info = json.loads((out / "run.json").read_text())
    t = info["temperature"]
    assert metrics["mean"]["temperature"] == t and info["num_calibration"] == 4
    assert info["calibration_nll_after"] <= info["calibration_nll_before"] + 1e-12
    assert metrics["mean"]["acc"] == base_metrics["mean"]["acc"]  # T never changes the arg max
    base_probs, labels = load_predictions(base)
    probs, same_labels = load_predictions(out)
    assert np.array_equal(labels, same_labels)
    expected = torch.softmax(torch.log(torch.tensor(base_probs["mean"], dtype=torch.float64)) / t, -1).numpy()
    assert np.allclose(probs["mean"], expected, atol=1e-5)  # softmax(logits / T) of the base's posterior mean

    evaluated = evaluate_main(["--run-dir", str(out), "--eval-samples", "2", "--eval-batch-size", "8", "--device", "cpu"])
    block = next(iter(evaluated["metrics"].values()))
    assert block["mean"]["nll"] == pytest.approx(metrics["mean"]["nll"], abs=1e-5)
    assert block["mean"]["ece"] == pytest.approx(metrics["mean"]["ece"], abs=1e-3)

    plain = tmp_path / "plain"
    main(_args(tiny_causal_lm_dir, task, plain, "--guide", "mle"))
    with pytest.raises(SystemExit, match=r"no calibration examples .* retrain the base run with --num-calibration K"):
        main(_args(tiny_causal_lm_dir, task, tmp_path / "bad", "--method", "temperature", "--guide", "mle",
                   "--num-calibration", "4", "--base-run", str(plain)))
    with pytest.raises(SystemExit, match="does not match this run \\(num_calibration: run has 4, this run needs 6"):
        main(_args(tiny_causal_lm_dir, task, tmp_path / "bad2", "--method", "temperature", "--guide", "mle",
                   "--num-calibration", "6", "--base-run", str(base)))
    with pytest.raises(ValueError, match="pass --num-calibration K"):
        TrainConfig(method="temperature", guide="mle")


# --- compare --------------------------------------------------------------------------------------------

def test_compare_wires_temperature_to_the_mle_run_of_the_same_seed(tmp_path, monkeypatch, capsys):
    from blob_pyro import compare

    assert compare.run_order(["temperature", "blob", "mle"]) == ["mle", "temperature", "blob"]
    calls = []
    monkeypatch.setattr(compare, "run_training", calls.append)  # the argv after python -m blob_pyro.train
    compare.run_one(tmp_path, "temperature", 3, ["--num-calibration", "8"], methods=["mle", "temperature"])
    assert calls[0][-2:] == ["--base-run", str(compare.run_dir(tmp_path, "mle", 3))]
    argv = calls[0]
    assert argv[argv.index("--method") + 1] == "temperature" and argv[argv.index("--guide") + 1] == "mle"
    assert argv[argv.index("--seed") + 1] == "3" and argv[argv.index("--num-calibration") + 1] == "8"
    compare.run_one(tmp_path, "temperature", 3, ["--num-calibration", "8"], methods=["temperature"])
    assert "--base-run" not in calls[1]  # no mle run listed: the method trains its own base
    monkeypatch.setattr(compare, "run_training", lambda *a, **k: pytest.fail("compare started a run"))
    with pytest.raises(SystemExit):  # no calibration split: refused before any run starts
        compare.main(["--methods", "mle,temperature", "--output-dir", str(tmp_path / "new")])
    assert "pass --num-calibration K" in capsys.readouterr().err
    assert not (tmp_path / "new" / "mle").exists()


def test_temperature_on_a_sequence_classifier_with_a_new_head_rebuilds_the_base_run(tmp_path, tiny_bpe_tokenizer):
    """A sequence classifier from an encoder checkpoint gets a new random head at load time that is frozen and
    not saved; the post-hoc method and blob_pyro.evaluate must rebuild the same one (seed 3, not the default)."""
    from transformers import BertConfig, BertModel

    from blob_pyro.rundir import load_predictions
    from blob_pyro.evaluate import main as evaluate_main
    from blob_pyro.train import main

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tiny_bpe_tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=256, initializer_range=1.0),  # logits far from 0
              ).save_pretrained(tmp_path / "encoder")
    tiny_bpe_tokenizer.save_pretrained(tmp_path / "encoder")
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} {i}", "label": ["negative", "positive"][i % 2]}
            for i in range(40)]
    task = tmp_path / "sentiment.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tmp_path / "encoder"), "--task-type", "sequence_classification", "--target-modules",
              "query,value,classifier", "--task", str(task), "--num-train", "20", "--num-validation", "12",
              "--num-calibration", "6", "--max-steps", "30", "--batch-size", "4", "--lr", "0.02", "--eval-batch-size", "8", "--seed", "3",
              "--guide", "mle", "--no-zero-shot", "--device", "cpu"]
    base_metrics = main([*common, "--output-dir", str(tmp_path / "mle")])
    torch.manual_seed(123)  # the global RNG state must not decide the rebuilt head
    metrics = main([*common, "--output-dir", str(tmp_path / "ts"), "--method", "temperature", "--base-run", str(tmp_path / "mle")])
    t = metrics["mean"]["temperature"]
    base_probs, _ = load_predictions(tmp_path / "mle")
    probs, _ = load_predictions(tmp_path / "ts")
    expected = torch.softmax(torch.log(torch.tensor(base_probs["mean"], dtype=torch.float64)) / t, -1).numpy()
    assert np.allclose(probs["mean"], expected, atol=1e-5)
    assert metrics["mean"]["acc"] == base_metrics["mean"]["acc"]
    assert base_metrics["mean"]["acc"] > 0.75 and 0.02 < t < 50  # a trained, not uniform, predictor
    evaluated = evaluate_main(["--run-dir", str(tmp_path / "ts"), "--eval-batch-size", "8", "--device", "cpu"])
    assert next(iter(evaluated["metrics"].values()))["mean"]["nll"] == pytest.approx(metrics["mean"]["nll"], abs=1e-5)


def test_sweep_counts_epochs_over_the_examples_left_after_calibration(tmp_path):
    from blob_pyro.config import TrainConfig
    from blob_pyro.sweep import training_set_size

    assert training_set_size(TrainConfig(num_train=640, num_calibration=64)) == 576
    recorded = tmp_path / "split.json"
    recorded.write_text(json.dumps({"train": list(range(576)), "validation": [1000], "calibration": list(range(600, 664))}))
    assert training_set_size(TrainConfig(split_file=str(recorded), num_calibration=64)) == 576  # already carved
    recorded.write_text(json.dumps({"train": list(range(640)), "validation": [1000]}))
    assert training_set_size(TrainConfig(split_file=str(recorded), num_calibration=64)) == 576  # carved at run time
