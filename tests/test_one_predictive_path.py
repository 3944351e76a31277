"""One predictive sampler for train, evaluate and the baselines: the same run and seed give the same
``samples_N`` from ``python -m blob_pyro.train`` (its metrics.json) and from ``python -m blob_pyro.evaluate
--run-dir`` (which rebuilds the run from its files and draws again), in-task and on an ``--eval-tasks`` task."""

import json
import warnings

import numpy as np
import pytest
import torch

from blob_pyro.evaluate import main as evaluate_main
from blob_pyro.train import main as train_main
from tests.conftest import write_bigbench_task

warnings.filterwarnings("ignore", category=FutureWarning)  # arviz 0.23's refactor notice

# float32 rounding: ECE is in percent, so its last float32 digits sit near 1e-6 (an ensemble's mixture averaged
# in another order differed by 2e-6 of 13.98 %); a different draw moves ACC, ECE and NLL by far more
TOLERANCE = 1e-6
RELATIVE = 1e-6
SAMPLES = 3


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path")
    ood = write_bigbench_task(root / "ood.json", num_examples=12, num_choices=2, seed=5)
    ood.write_text(ood.read_text().replace('"name": "colours"', '"name": "ood"'))
    return root, write_bigbench_task(root / "task.json"), ood


def _train(model_dir, root, task, ood, name, *extra):
    out = root / name
    train_main(["--model", str(model_dir), "--task", str(task), "--output-dir", str(out), "--num-train", "16",
                "--num-validation", "6", "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--eval-samples", str(SAMPLES),
                "--eval-batch-size", "8", "--rank", "2", "--no-zero-shot", "--device", "cpu", "--eval-tasks", str(ood),
                "--eval-task-size", "6", "--seed", "7", *extra])
    return out


def _evaluate(run, ood, out, *extra):
    evaluate_main(["--run-dir", str(run), "--output-dir", str(out), "--device", "cpu", "--eval-tasks", f"run,{ood}",
                   "--eval-samples", str(SAMPLES), "--max-examples", "6", "--eval-batch-size", "8", "--loo-examples", "2", *extra])
    return json.loads((out / "metrics.json").read_text())


def _assert_same(evaluated: dict, trained: dict, mode: str) -> None:
    assert evaluated[mode]["n_examples"] == trained[mode]["n_examples"]
    for key in ("acc", "ece", "nll"):
        assert evaluated[mode][key] == pytest.approx(trained[mode][key], rel=RELATIVE, abs=TOLERANCE), (mode, key)


# eval-samples draws per method; the guide of blob and of the MC-dropout base run samples A, so the draws
# differ from the posterior mean (the test can tell the sampler's seeding apart)
METHODS = {
    "blob": ([], f"samples_{SAMPLES}"),
    "mc_dropout": (["--method", "mc_dropout", "--guide", "blob", "--lora-dropout", "0.3"], f"samples_{SAMPLES}"),
    "ensemble": (["--method", "ensemble", "--guide", "blob", "--ensemble-size", "2"], "ensemble_2"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_train_and_evaluate_report_the_same_samples(method, tasks, tiny_causal_lm_dir, tmp_path):
    root, task, ood = tasks
    flags, mode = METHODS[method]
    run = _train(tiny_causal_lm_dir, root, task, ood, method, *flags)
    trained = json.loads((run / "metrics.json").read_text())
    evaluated = _evaluate(run, ood, tmp_path / "eval")  # no --seed: the run's seed
    assert json.loads((tmp_path / "eval" / "evaluate_config.json").read_text())["seed"] == 7
    _assert_same(evaluated["colours"], trained, mode)
    # the OOD task: the same examples (--max-examples = the run's --eval-task-size and its validation size), the same draws
    _assert_same(evaluated["ood"], trained["ood"]["ood"], mode)
    if method != "ensemble":  # the draws are not the posterior mean (else this test could not fail)
        assert abs(trained[mode]["nll"] - trained["mean"]["nll"]) > 1e-4
    other = _evaluate(run, ood, tmp_path / "other_seed", "--seed", "8")  # another seed, other draws
    assert abs(other["colours"][mode]["nll"] - trained[mode]["nll"]) > 1e-6


def test_stacked_draws_are_the_seeded_draws_of_the_loop():
    """``draws_per_pass`` changes how the draws are batched, not which: same seeds, same A, same probabilities."""
    from blob_pyro.evaluation.predictive import draw_predictive
    from blob_pyro.guides import make_guide
    from tests.helpers import synthetic_batch, tiny_bayesian_llama

    model = tiny_bayesian_llama().double().eval()
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.normal_()
    guide = make_guide("blob", model, eps=0.3).double()
    data = synthetic_batch(n=6)
    batches = [{k: data[k][i:i + 3] for k in ("input_ids", "attention_mask")} for i in (0, 3)]
    sites = guide.site_names[:1]
    loop = draw_predictive(model, guide, batches, num_samples=4, seed=11, posterior_sites=sites)
    stacked = draw_predictive(model, guide, batches, num_samples=4, seed=11, posterior_sites=sites, draws_per_pass=3)
    assert loop.seeds == stacked.seeds
    np.testing.assert_array_equal(loop.posterior[sites[0]], stacked.posterior[sites[0]])
    np.testing.assert_allclose(stacked.probs, loop.probs, rtol=0, atol=1e-6)
    assert not np.allclose(loop.probs[0], loop.probs[1])
    assert stacked.sampled_labels.shape == (4, 6) and 0 <= stacked.sampled_labels.min() and stacked.sampled_labels.max() < 3
