"""Baselines: ensemble averages probabilities; TFB's search is monotone and its rotation exact; Laplace's
curvature, posterior and evidence match closed forms; MC dropout samples; compare's tables and reuse."""

import json
import math

import numpy as np
import pytest
import torch

from blob_pyro.baselines.common import primary_mode
from blob_pyro.guides.fixed import FixedGaussianGuide
from blob_pyro.rundir import save_predictions
from blob_pyro.baselines.ensemble import average_probabilities
from blob_pyro.baselines.laplace import (
    diagonal_curvature, log_marginal_likelihood, posterior_variance, probit_predictive, tune_prior_precision,
)
from blob_pyro.baselines.mc_dropout import mc_dropout_probs
from blob_pyro.baselines.tfb import largest_admissible_std, tfb_posterior
from blob_pyro.guides import make_guide

from test_guides_registry import tiny_batch, tiny_model


# --- ensemble -----------------------------------------------------------------------------------------

def test_ensemble_averages_probabilities_not_logits():
    logits = [torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.tensor([[-2.0, 0.0], [0.0, 3.0]])]
    probs = [torch.softmax(z, -1).numpy() for z in logits]
    ensemble = average_probabilities(probs)
    assert np.allclose(ensemble, (probs[0] + probs[1]) / 2)
    assert not np.allclose(ensemble, torch.softmax((logits[0] + logits[1]) / 2, -1).numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="not logits: apply softmax first"):
        average_probabilities([z.numpy() for z in logits])


# --- TFB ----------------------------------------------------------------------------------------------

def test_tfb_search_is_monotone_in_the_tolerance_and_finds_the_boundary():
    degradation = lambda s: s**2  # noqa: E731  (monotone toy: anchor NLL increase of noise s)
    tolerances = [1e-4, 1e-3, 1e-2, 3e-2]
    found = [largest_admissible_std(degradation, tolerance=t, upper=1.0, steps=20) for t in tolerances]
    assert all(a < b for a, b in zip(found, found[1:]))
    for t, s in zip(tolerances, found):  # 20 halvings of log(1 / 1e-5) = 11.5: relative error < 2e-5
        assert degradation(s) <= t and s == pytest.approx(math.sqrt(t), rel=2e-5)
    assert largest_admissible_std(degradation, tolerance=2.0, upper=1.0, steps=5) == 1.0
    # a tiny boundary (small singular values of B) is still found, not rounded to 0 as a linear search would
    assert largest_admissible_std(degradation, tolerance=1e-8, upper=0.1, steps=20) == pytest.approx(1e-4, rel=1e-4)
    # nothing admissible: the point estimate, and its "std" stays a valid Normal scale
    assert largest_admissible_std(lambda s: 1.0, tolerance=0.01, upper=0.1, steps=5) == 0.0
    from blob_pyro.baselines.tfb import scaled
    assert (scaled({"a": torch.ones(2, 3)}, 0.0)["a"] > 0).all()
    with pytest.raises(ValueError, match="tfb-min-std"):
        largest_admissible_std(degradation, tolerance=0.1, upper=0.1, lower=0.2, steps=3)


def test_tfb_rotation_keeps_the_update_and_makes_weight_noise_isotropic():
    model = tiny_model()
    guide = make_guide("mle", model)
    torch.manual_seed(3)
    before = {}
    for site, layer in model.adapters.items():
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn_like(layer.lora_B))
        before[site] = (layer.lora_B.detach().clone(), guide.posterior_mean()[site].clone())
    locs, scales = tfb_posterior(model, guide, sigma=0.01)
    for site, layer in model.adapters.items():
        B, A = before[site]
        assert torch.allclose(layer.lora_B @ locs[site], B @ A, atol=1e-5)  # same adapter update
        # noise B' E with E_ij ~ N(0, (sigma/d_i)^2): every column of the weight noise has covariance sigma^2 U U^T
        d = torch.linalg.svdvals(B)
        assert torch.allclose(scales[site][:, 0], 0.01 / d, rtol=1e-4)
        cov = (layer.lora_B * scales[site][:, :1].T) @ (layer.lora_B * scales[site][:, :1].T).T
        U = torch.linalg.svd(B, full_matrices=False)[0]
        assert torch.allclose(cov, 1e-4 * U @ U.T, atol=1e-7)


# --- Laplace ------------------------------------------------------------------------------------------

def test_laplace_matches_the_exact_posterior_of_a_linear_gaussian_model():
    torch.manual_seed(0)
    n, p, noise, lam = 12, 3, 0.5, 2.0
    Q, _ = torch.linalg.qr(torch.randn(n, p, dtype=torch.float64))
    X = Q * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)  # orthogonal features: diagonal curvature is exact
    y = X @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + noise * torch.randn(n, dtype=torch.float64)
    precision = X.T @ X / noise**2 + lam * torch.eye(p, dtype=torch.float64)
    theta = torch.linalg.solve(precision, X.T @ y / noise**2)  # MAP = exact posterior mean
    h = torch.diagonal(X.T @ X) / noise**2  # GGN of a Gaussian likelihood
    assert torch.allclose(posterior_variance(h, lam), torch.diagonal(torch.linalg.inv(precision)))
    assert torch.allclose(torch.diag(posterior_variance(h, lam)), torch.linalg.inv(precision), atol=1e-12)
    log_lik = torch.distributions.Normal(X @ theta, noise).log_prob(y).sum()
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(n, dtype=torch.float64), noise**2 * torch.eye(n, dtype=torch.float64) + X @ X.T / lam
    ).log_prob(y)
    assert float(log_marginal_likelihood(float(log_lik), theta, h, lam)[0]) == pytest.approx(float(exact), rel=1e-10)


def test_diagonal_ggn_of_softmax_regression_matches_the_closed_form():
    torch.manual_seed(1)
    X = torch.randn(5, 3)
    W = torch.randn(4, 3, requires_grad=True)
    examples = [{"x": X[i : i + 1], "labels": torch.tensor([i % 4])} for i in range(5)]
    curvature = diagonal_curvature(lambda e: e["x"] @ W.T, [W], examples, kind="diag")[0]
    p = torch.softmax(X @ W.detach().T, -1).double()
    expected = (p * (1 - p)).T @ (X.double() ** 2)  # h_kj = sum_n p_nk (1 - p_nk) x_nj^2
    assert torch.allclose(curvature, expected, atol=1e-6)
    ef = diagonal_curvature(lambda e: e["x"] @ W.T, [W], examples, kind="diag_ef")[0]
    onehot = torch.nn.functional.one_hot(torch.arange(5) % 4, 4).double()
    assert torch.allclose(ef, ((onehot - p) ** 2).T @ (X.double() ** 2), atol=1e-6)


def test_prior_precision_maximises_the_evidence_and_probit_flattens():
    theta, h = torch.tensor([0.5, -0.2, 0.1]), torch.tensor([10.0, 1.0, 0.1])
    lam = tune_prior_precision(theta, h)
    values = log_marginal_likelihood(0.0, theta, h, torch.tensor([lam * 0.9, lam, lam * 1.1]))
    assert values[1] >= values[0] and values[1] >= values[2]
    mu = torch.tensor([[2.0, 0.0]])
    assert probit_predictive(mu, torch.zeros(1, 2))[0, 0] == pytest.approx(float(torch.softmax(mu, -1)[0, 0]))
    assert probit_predictive(mu, torch.full((1, 2), 10.0))[0, 0] < torch.softmax(mu, -1)[0, 0]


# --- MC dropout, fixed Gaussian guide -------------------------------------------------------------------

def test_mc_dropout_samples_differ_and_needs_dropout():
    model = tiny_model()
    guide = make_guide("mle", model)
    batches = [{k: v for k, v in tiny_batch().items() if k in ("input_ids", "attention_mask")}]
    with pytest.raises(ValueError, match="train with --lora-dropout > 0"):
        mc_dropout_probs(model, guide, batches, num_samples=2)
    for layer in model.adapters.values():
        layer._modules["lora_dropout"] = torch.nn.Dropout(0.5)
        with torch.no_grad():
            layer.lora_B.normal_()
    model.eval()
    draws = mc_dropout_probs(model, guide, batches, num_samples=3)
    assert draws.shape == (3, 4, 3) and not torch.allclose(draws[0], draws[1])
    assert not any(layer._modules["lora_dropout"].training for layer in model.adapters.values())


def test_fixed_gaussian_guide_samples_A_and_B():
    model = tiny_model(random_B=True)  # B is a sample site only in a model built so
    locs, scales = {}, {}
    for site, layer in model.adapters.items():
        locs[site], scales[site] = torch.zeros(2, 16), torch.full((2, 16), 0.1)
        locs[layer.site_name_B], scales[layer.site_name_B] = torch.zeros_like(layer.lora_B), torch.full_like(layer.lora_B, 0.1)
    guide = FixedGaussianGuide(model, locs, scales)
    from blob_pyro.evaluation.predictive import sample_probs

    batches = [{k: v for k, v in tiny_batch().items() if k in ("input_ids", "attention_mask")}]
    draws = sample_probs(model, guide, batches, num_samples=2)
    assert not torch.allclose(draws[0], draws[1])


# --- compare ------------------------------------------------------------------------------------------

def _fake_run(path, acc_probs, mode):
    path.mkdir(parents=True)
    labels = np.array([0, 1, 0, 1])
    from blob_pyro.evaluation.metrics import classification_metrics

    metrics = {"zero_shot": classification_metrics(np.full((4, 2), 0.5), labels), mode: classification_metrics(acc_probs, labels)}
    if mode != "mean":
        metrics["mean"] = classification_metrics(acc_probs, labels)
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "run.json").write_text(json.dumps({"wall_seconds": 10.0}))
    save_predictions(path, {mode: acc_probs}, labels)


def test_compare_tables_diagrams_and_reuse(tmp_path):
    from blob_pyro import compare

    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    bad = np.array([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])
    for seed, probs in [(1, good), (2, bad)]:
        _fake_run(compare.run_dir(tmp_path, "blob", seed), probs, "samples_10")
        _fake_run(compare.run_dir(tmp_path, "mle", seed), probs, "mean")
    rows = compare.main(["--methods", "blob,mle", "--seeds", "1,2", "--output-dir", str(tmp_path), "--max-steps", "5"])
    names = [r["method"] for r in rows]
    assert names == ["zero-shot (B = 0)", "blob", "blob (N = 0)", "mle"]
    assert rows[0]["acc_mean"] == pytest.approx(50.0)  # from the blob runs' zero_shot block
    blob = rows[1]
    assert blob["mode"] == "samples_10" and blob["acc_mean"] == pytest.approx(75.0) and blob["acc_std"] == pytest.approx(math.sqrt(2) * 25.0)
    text = (tmp_path / "results.md").read_text()
    assert "| blob | samples_10 | 2 | 4 | 75.00 ± 35.36 |" in text
    assert (tmp_path / "results.csv").read_text().startswith("method,mode,seeds,n,")
    for method in ["blob", "mle"]:
        assert (tmp_path / f"reliability_{method}.png").stat().st_size > 1000
    for flag in ("--seed", "--guide"):  # set per run by compare; must fail before any run starts
        with pytest.raises(SystemExit):
            compare.main(["--methods", "blob", "--output-dir", str(tmp_path / "new"), flag, "3"])
    assert not (tmp_path / "new" / "blob").exists()
    with pytest.raises(ValueError, match="unknown method 'bbb'"):
        compare.main(["--methods", "bbb", "--output-dir", str(tmp_path)])


def test_primary_mode():
    assert primary_mode({"zero_shot": {}, "mean": {}, "samples_10": {}}) == "samples_10"
    assert primary_mode({"zero_shot": {}, "mean": {}}) == "mean"
    assert primary_mode({"zero_shot": {}, "ensemble_3": {}, "member_0": {}}) == "ensemble_3"


# --- end to end through python -m blob_pyro.train on a tiny saved model ----------------------------------

def _args(model_dir, task, out, *extra):
    return ["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16",
            "--num-validation", "8", "--max-steps", "3", "--batch-size", "4", "--eval-samples", "2",
            "--eval-batch-size", "8", "--rank", "2", "--no-zero-shot", *extra]


@pytest.mark.parametrize("extra, mode", [
    (["--method", "ensemble", "--guide", "mle", "--ensemble-size", "2"], "ensemble_2"),
    (["--method", "mc_dropout", "--guide", "mle", "--lora-dropout", "0.1"], "samples_2"),
    (["--method", "tfb", "--guide", "mle", "--tfb-anchor-size", "8", "--tfb-search-steps", "2"], "samples_2"),
    (["--method", "laplace", "--guide", "map", "--laplace-examples", "4"], "samples_2"),
    (["--method", "laplace", "--guide", "map", "--laplace-hessian", "kfac", "--laplace-examples", "4"], "samples_2"),
    (["--method", "laplace", "--guide", "mle", "--laplace-predictive", "probit", "--laplace-hessian", "diag_ef"], "probit"),
    (["--guide", "meanfield", "--prior", "hierarchical"], "samples_2"),
    (["--guide", "lowrank", "--bayesian-sites", "lm_head"], "samples_2"),
    (["--guide", "map"], "mean"),
    (["--method", "temperature", "--guide", "mle", "--num-calibration", "4"], "mean"),
])
def test_every_method_runs_from_the_cli(tmp_path, tiny_causal_lm_dir, extra, mode):
    from blob_pyro.rundir import load_predictions
    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task

    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    metrics = main(_args(tiny_causal_lm_dir, task, out, *extra))
    assert primary_mode(metrics) == mode
    saved = json.loads((out / "metrics.json").read_text())
    assert saved[mode]["n_examples"] == 8
    probs, labels = load_predictions(out)
    assert probs[mode].shape == (8, 3) and labels.shape == (8,)  # the task has 3 choices
    with pytest.raises(SystemExit, match="already holds a finished run"):
        main(_args(tiny_causal_lm_dir, task, out, *extra))


def test_cli_rejects_inconsistent_baseline_options():
    from blob_pyro.config import TrainConfig

    with pytest.raises(ValueError, match="post-hoc on a point estimate: use --guide map or mle"):
        TrainConfig(method="tfb", guide="blob")
    with pytest.raises(ValueError, match="pass --lora-dropout 0.1"):
        TrainConfig(method="mc_dropout")


def test_post_hoc_baselines_reuse_a_matching_base_run_and_reject_a_mismatch(tmp_path, tiny_causal_lm_dir):
    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task

    task = write_bigbench_task(tmp_path / "task.json")
    base = tmp_path / "mle"
    base_metrics = main(_args(tiny_causal_lm_dir, task, base, "--guide", "mle"))
    out = tmp_path / "tfb"
    metrics = main(_args(tiny_causal_lm_dir, task, out, "--method", "tfb", "--guide", "mle", "--tfb-anchor-size", "8",
                         "--tfb-search-steps", "2", "--base-run", str(base)))
    assert not (out / "base").exists()  # nothing trained
    assert metrics["mean"] == base_metrics["mean"]  # TFB's N = 0 is the reused run's point estimate
    ens = main(_args(tiny_causal_lm_dir, task, tmp_path / "ens", "--method", "ensemble", "--guide", "mle",
                     "--ensemble-size", "2", "--base-run", str(base)))
    assert ens["member_0"] == base_metrics["mean"] and (tmp_path / "ens" / "member_1").exists()
    assert not (tmp_path / "ens" / "member_0").exists()
    with pytest.raises(SystemExit, match=r"does not match this run \(rank: run has 2, this run needs 4"):
        main(_args(tiny_causal_lm_dir, task, tmp_path / "bad", "--method", "tfb", "--guide", "mle", "--base-run", str(base), "--rank", "4"))
    with pytest.raises(SystemExit, match="no config.json"):
        main(_args(tiny_causal_lm_dir, task, tmp_path / "bad2", "--method", "tfb", "--guide", "mle", "--base-run", str(tmp_path)))


def test_compare_report_only_tables_finished_runs_and_names_the_missing(tmp_path, monkeypatch):
    from blob_pyro import compare

    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("--report-only started a run"))
    good = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    _fake_run(compare.run_dir(tmp_path, "blob", 1), good, "samples_10")
    _fake_run(compare.run_dir(tmp_path, "mle", 1), good, "mean")
    _fake_run(compare.run_dir(tmp_path, "mle", 2), good, "mean")
    compare.run_dir(tmp_path, "blob", 2).mkdir(parents=True)  # an interrupted run: no metrics.json
    rows = compare.main(["--methods", "blob,mle,tfb", "--seeds", "1,2", "--output-dir", str(tmp_path), "--report-only"])
    by_name = {r["method"]: r for r in rows}
    assert set(by_name) == {"zero-shot (B = 0)", "blob", "blob (N = 0)", "mle"}  # tfb has no finished run
    assert by_name["blob"]["seeds"] == 1 and by_name["mle"]["seeds"] == 2
    assert by_name["zero-shot (B = 0)"]["seeds"] == 2
    text = (tmp_path / "results.md").read_text()
    assert "Not finished, left out of the table: blob seed 2, tfb seed 1, tfb seed 2" in text
    assert (tmp_path / "reliability_blob.png").exists() and not (tmp_path / "reliability_tfb.png").exists()
    with pytest.raises(SystemExit, match="no finished run"):
        compare.main(["--methods", "tfb", "--seeds", "1", "--output-dir", str(tmp_path), "--report-only"])


def test_compare_runs_base_methods_first_and_points_baselines_at_them(tmp_path, monkeypatch):
    from blob_pyro import compare

    assert compare.run_order(["tfb", "blob", "laplace", "mle", "map"]) == ["mle", "map", "tfb", "blob", "laplace"]
    calls = []
    monkeypatch.setattr(compare, "run_training", calls.append)  # the argv after python -m blob_pyro.train
    compare.run_one(tmp_path, "tfb", 3, ["--max-steps", "5"], methods=["mle", "tfb"])
    compare.run_one(tmp_path, "laplace", 3, [], methods=["mle", "laplace"])  # no map run listed: trains its own
    assert calls[0][-2:] == ["--base-run", str(compare.run_dir(tmp_path, "mle", 3))]
    assert "--base-run" not in calls[1]
    compare.run_one(tmp_path, "laplace_kfac", 3, [], methods=["map", "laplace_kfac"])
    assert calls[2][-2:] == ["--base-run", str(compare.run_dir(tmp_path, "map", 3))]
    assert calls[2][calls[2].index("--laplace-hessian") + 1] == "kfac" and calls[2][calls[2].index("--laplace-predictive") + 1] == "probit"


def test_summarise_gives_recipe_methods_an_n0_row_and_baselines_none(tmp_path):
    """blob_official is an SVI run (its 'mean' is the posterior mean); a --method baseline's 'mean' is not."""
    from blob_pyro import compare

    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    _fake_run(compare.run_dir(tmp_path, "blob_official", 1), probs, "samples_10")
    _fake_run(compare.run_dir(tmp_path, "mc_dropout", 1), probs, "samples_10")
    names = [r["method"] for r in compare.summarise(tmp_path, ["blob_official", "mc_dropout"], [1])]
    assert names == ["zero-shot (B = 0)", "blob_official", "blob_official (N = 0)", "mc_dropout"]
