"""Every method through the same analysis: ``evaluate --run-dir`` and train's ``--eval-tasks`` for the
baselines (ensemble, MC dropout, Laplace mc / probit, TFB), through :mod:`blob_pyro.run_predictive`.

The numbers are checked against what the run itself computed by another code path (train's metrics,
the ensemble's average of its members' saved predictions, the probit predictive of the run), and the
uncertainty decomposition against its definition."""

import json
import warnings

import pytest

from blob_pyro.evaluate import main as evaluate_main
from blob_pyro.evaluation.inference_data import load_inference_data
from blob_pyro.train import main as train_main
from tests.conftest import write_bigbench_task

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz 0.23's refactor notice


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("every_method")
    ood = write_bigbench_task(root / "ood.json", num_examples=12, num_choices=2, seed=5)
    ood.write_text(ood.read_text().replace('"name": "colours"', '"name": "ood"'))
    return root, write_bigbench_task(root / "task.json"), ood


def _train(model_dir, root, task, ood, name, *extra):
    out = root / name
    if not (out / "metrics.json").exists():
        train_main(["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16",
                    "--num-validation", "8", "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--eval-samples", "3",
                    "--eval-batch-size", "8", "--rank", "2", "--no-zero-shot", "--device", "cpu", "--eval-tasks", str(ood),
                    "--eval-task-size", "6", *extra])
    return out


METHODS = {
    "ensemble": (["--method", "ensemble", "--guide", "mle", "--ensemble-size", "2"], "ensemble_2"),
    "mc_dropout": (["--method", "mc_dropout", "--guide", "mle", "--lora-dropout", "0.3"], "samples_3"),
    "tfb": (["--method", "tfb", "--guide", "mle", "--tfb-anchor-size", "8", "--tfb-search-steps", "2", "--tfb-min-std", "1e-3",
             "--tfb-nll-tolerance", "0.5"], "samples_3"),
    "laplace": (["--method", "laplace", "--guide", "map", "--laplace-examples", "4"], "samples_3"),
    "temperature": (["--method", "temperature", "--guide", "mle", "--num-calibration", "4"], "mean"),
    "laplace_probit": (["--method", "laplace", "--guide", "map", "--laplace-hessian", "kfac", "--laplace-examples", "4",
                        "--laplace-predictive", "probit"], "probit"),
}


def test_every_registered_baseline_has_a_row_here():
    """A baseline added with ``register_method`` must join the table above, or this module would skip it silently."""
    from blob_pyro.baselines import registered_methods

    covered = {flags[flags.index("--method") + 1] for flags, _ in METHODS.values()}
    missing = sorted(set(registered_methods()) - covered)
    assert not missing, f"baselines {missing} have no row in METHODS of {__name__}: add one (train flags, primary mode)"


@pytest.fixture(scope="module")
def model_dir(tiny_causal_lm_dir):
    return tiny_causal_lm_dir


@pytest.mark.parametrize("method", list(METHODS))
def test_evaluate_and_eval_tasks_work_for_every_method(method, tasks, model_dir, tmp_path):
    from blob_pyro.baselines.common import primary_mode
    from blob_pyro.rundir import load_predictions

    root, task, ood = tasks
    flags, primary = METHODS[method]
    run = _train(model_dir, root, task, ood, method, *flags)
    trained = json.loads((run / "metrics.json").read_text())
    assert primary_mode(trained) == primary
    # train's --eval-tasks for a baseline: the method's own predictive on the OOD task, and OOD detection
    assert trained["ood"]["ood"][primary_mode(trained["ood"]["ood"])]["n_examples"] == 6
    detection = trained["ood_detection"]["ood"]
    assert set(detection) >= {"max_prob", "entropy", "mutual_information"}
    assert all(0.0 <= d["auroc"] <= 1.0 and 0.0 <= d["aupr"] <= 1.0 for d in detection.values())

    out = tmp_path / "eval"
    evaluate_main(["--run-dir", str(run), "--output-dir", str(out), "--device", "cpu", "--eval-tasks", f"run,{ood}",
                   "--eval-samples", "3", "--max-examples", "0", "--loo-examples", "4"])
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["colours"]
    assert block["n_examples"] == 8 and block["role"] == "in_distribution" and block["num_classes"] == 3
    assert metrics["ood"]["n_examples"] == 12 and metrics["ood"]["num_classes"] == 2 and metrics["ood"]["role"] == "ood"
    # The run's own predictive, recomputed by evaluate, agrees with what the run computed (other code paths)
    if method == "ensemble":  # mixture of the members' saved predictions (average_probabilities in the run)
        probs, labels = load_predictions(run)
        assert block["ensemble_2"]["nll"] == pytest.approx(trained["ensemble_2"]["nll"], abs=1e-5)
        assert block["ensemble_2"]["acc"] == trained["ensemble_2"]["acc"]
        rows = json.loads((out / "per_example_colours.json").read_text())  # same (length-sorted) order as the run's file
        assert [r["label"] for r in rows] == labels.tolist()
        assert [r["confidence"] for r in rows] == pytest.approx(probs["ensemble_2"].max(-1).tolist(), abs=1e-5)
    elif method == "laplace_probit":  # deterministic: the same linearised predictive
        assert block["probit"]["nll"] == pytest.approx(trained["probit"]["nll"], abs=1e-5)
        assert block["mean"]["nll"] == pytest.approx(trained["mean"]["nll"], abs=1e-5)
        assert "linearised_3" in block
    elif method == "temperature":  # the base run's point estimate with its logits divided by T
        assert block["mean"]["nll"] == pytest.approx(trained["mean"]["nll"], abs=1e-5) and "samples_3" not in block
    else:  # the point estimate (N = 0) is the base run's; the draws are the method's
        assert block["mean"]["nll"] == pytest.approx(trained["mean"]["nll"], abs=1e-5)
        assert "samples_3" in block
    summary = json.loads((out / "uncertainty.json").read_text())
    scores = summary["ood_detection"]["ood"]
    assert 0.0 <= scores["entropy"]["auroc"] <= 1.0 and 0.0 <= scores["mutual_information"]["aupr"] <= 1.0
    rows = json.loads((out / "per_example_colours.json").read_text())
    assert all(r["total"] == pytest.approx(r["aleatoric"] + r["epistemic"], abs=1e-9) for r in rows)
    if method in ("ensemble", "mc_dropout", "laplace_probit"):  # draws that differ: epistemic > 0
        assert max(r["epistemic"] for r in rows) > 0
    idata = load_inference_data(out / "inference_data_ood.nc")
    assert idata.posterior_predictive["probs"].shape[1] == {"ensemble": 2, "temperature": 1}.get(method, 3)  # draws
    assert idata.attrs["method"] == ("laplace" if method.startswith("laplace") else method)
    for name in ("reliability_colours.png", "reliability_ood.png", "uncertainty_histograms.png", "accuracy_coverage.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_compare_ood_columns_and_reuse_only_on_matching_config(tasks, model_dir, tmp_path, monkeypatch, capsys):
    from blob_pyro import compare

    root, task, ood = tasks
    monkeypatch.setattr(compare, "run_training", lambda argv: train_main(argv))  # in-process, same argv
    args = ["--model", str(model_dir), "--task", str(task), "--num-train", "16", "--num-validation", "8", "--max-steps", "2",
            "--batch-size", "4", "--eval-samples", "2", "--eval-batch-size", "8", "--rank", "2", "--no-zero-shot",
            "--device", "cpu", "--eval-tasks", str(ood), "--eval-task-size", "6", "--tfb-anchor-size", "8",
            "--tfb-search-steps", "2"]
    out = tmp_path / "cmp"
    compare.main(["--methods", "mle,tfb", "--seeds", "1", "--output-dir", str(out), "--ood-columns", *args])
    text = (out / "results_ood.md").read_text()
    assert "| mle | ood | mean | 1 |" in text and "| tfb | ood | samples_2 | 1 |" in text
    rows = list(__import__("csv").DictReader(open(out / "results_ood.csv")))
    tfb_run = json.loads((compare.run_dir(out, "tfb", 1) / "metrics.json").read_text())
    tfb_row = next(r for r in rows if r["method"] == "tfb")
    assert float(tfb_row["AUROC entropy_mean"]) == pytest.approx(tfb_run["ood_detection"]["ood"]["entropy"]["auroc"])
    assert float(tfb_row["acc_mean"]) == pytest.approx(100 * tfb_run["ood"]["ood"]["samples_2"]["acc"])
    capsys.readouterr()
    compare.main(["--methods", "mle,tfb", "--seeds", "1", "--output-dir", str(out), "--ood-columns", *args])
    assert "mle seed 1: reusing" in capsys.readouterr().out
    changed = [*args[:args.index("--max-steps") + 1], "3", *args[args.index("--max-steps") + 2:]]
    compare.main(["--methods", "mle", "--seeds", "1", "--output-dir", str(out), *changed])
    printed = capsys.readouterr().out
    assert "mle seed 1: " in printed and "another config (--max-steps: run has 2, now 3); running it again" in printed
    assert json.loads((compare.run_dir(out, "mle", 1) / "config.json").read_text())["max_steps"] == 3
    with pytest.raises(SystemExit):  # --ood-columns without --eval-tasks: refused before anything runs
        compare.main(["--methods", "mle", "--output-dir", str(tmp_path / "none"), "--ood-columns", "--max-steps", "2"])
    assert not (tmp_path / "none").exists()


def test_every_registered_method_has_a_predictive_and_is_tested_here():
    """A baseline added to the registry without ``load_predictive`` (or without a case above) fails here."""
    import importlib

    from blob_pyro.baselines import registered_methods

    REGISTERED = registered_methods()
    tested = {flags[flags.index("--method") + 1] for flags, _ in METHODS.values()}
    assert tested == set(REGISTERED), f"methods without an evaluate test: {sorted(set(REGISTERED) - tested)}"
    for name, method in REGISTERED.items():
        assert callable(getattr(importlib.import_module(method.module), "load_predictive", None)), f"{name} has no load_predictive"
