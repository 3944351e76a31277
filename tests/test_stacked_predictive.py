"""The predictive with posterior draws stacked along the batch axis gives the loop's probabilities."""

import pyro
import pytest
import torch

from blob_pyro.data import MultipleChoiceExample
from blob_pyro.data.choice_scoring import encode_choice_continuations, iterate_choice_batches
from blob_pyro.evaluation.predictive import predict_probs, sample_probs
from blob_pyro.guides import make_guide
from blob_pyro.models import BayesianLoRAModel, ChoiceLikelihoodHead, bayesianize
from tests.helpers import synthetic_batch, tiny_bayesian_llama


def _nonzero_B(model, seed=0):
    """B = 0 at initialisation would make every draw give the base model's probabilities."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype))


def _both_ways(model, guide, batches, *, num_samples, draws_per_pass):
    pyro.set_rng_seed(3)
    loop = sample_probs(model, guide, batches, num_samples=num_samples)
    pyro.set_rng_seed(3)  # the same seed draws the same A's from the guide
    stacked = sample_probs(model, guide, batches, num_samples=num_samples, draws_per_pass=draws_per_pass)
    return loop, stacked


@pytest.mark.parametrize("guide_name,sites", [("blob", None), ("meanfield", None), ("blob", "lm_head")])
@pytest.mark.parametrize("draws_per_pass", [5, 3])  # all draws in one pass; groups of 3 + 2
def test_stacked_draws_give_the_loop_probabilities(guide_name, sites, draws_per_pass):
    model = tiny_bayesian_llama(bayesian_sites=sites, random_B=guide_name == "meanfield").double()
    _nonzero_B(model)
    guide = make_guide(guide_name, model).double()
    data = synthetic_batch(n=7)
    batches = [{k: data[k][:4] for k in ("input_ids", "attention_mask")}, {k: data[k][4:] for k in ("input_ids", "attention_mask")}]
    loop, stacked = _both_ways(model, guide, batches, num_samples=5, draws_per_pass=draws_per_pass)
    assert stacked.shape == loop.shape == (5, 7, 3)
    # the draws differ from each other (else the test could not tell draw s from draw s')
    assert (loop[0] - loop[1]).abs().max() > 1e-3
    torch.testing.assert_close(stacked, loop, rtol=0, atol=1e-10)
    pyro.set_rng_seed(3)
    averaged = predict_probs(model, guide, batches, num_samples=5, draws_per_pass=draws_per_pass)
    torch.testing.assert_close(averaged, loop.mean(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_stacked_draws_with_choice_scoring_layouts(tiny_bpe_tokenizer, tiny_causal_lm_dir, layout):
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, dtype=torch.float64).eval()
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4.0)
    model = BayesianLoRAModel(network, ChoiceLikelihoodHead(3)).double()
    _nonzero_B(model, seed=1)
    guide = make_guide("blob", model).double()
    examples = [
        MultipleChoiceExample("A fairly long question about the colour of things?", ("red", "a blue thing here", "the green one"), 0),
        MultipleChoiceExample("Short?", ("x", "yy zz", "the B answer"), 2),
        MultipleChoiceExample("Mid length question here", ("one two three four", "five", "six seven"), 1),
    ]
    encoded = encode_choice_continuations(examples, tiny_bpe_tokenizer)
    batches = list(iterate_choice_batches(encoded, batch_size=2, pad_token_id=tiny_bpe_tokenizer.pad_token_id,
                                          shuffle=False, layout=layout))
    batches = [{k: v for k, v in b.items() if k not in ("labels", "indices")} for b in batches]
    loop, stacked = _both_ways(model, guide, batches, num_samples=4, draws_per_pass=4)
    assert stacked.shape == (4, 3, 3)
    torch.testing.assert_close(stacked, loop, rtol=0, atol=1e-10)


def test_stacked_layer_update_is_the_per_draw_update():
    """One adapter by hand: rows s*b..(s+1)*b of a stacked call equal a call with draw s alone."""
    model = tiny_bayesian_llama().double()
    _nonzero_B(model)
    layer = next(iter(model.adapters.values()))
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
    A = torch.randn(3, layer.rank, layer.in_features, dtype=torch.float64)
    expected = []
    for s in range(3):
        layer.set_transient(active_A=A[s], active_B=layer.lora_B, flipout=None)
        expected.append(layer(x))
        manual = layer.base_layer(x) + layer.scaling * x @ A[s].T @ layer.lora_B.T
        torch.testing.assert_close(expected[-1], manual)
    layer.set_transient(active_A=A)
    torch.testing.assert_close(layer(x.repeat(3, 1, 1)), torch.cat(expected))
    with pytest.raises(ValueError, match="multiple of 3"):
        layer(x[:1].repeat(2, 1, 1))
    layer.set_transient(flipout="token")
    with pytest.raises(ValueError, match="flipout is a training option"):
        layer(x.repeat(3, 1, 1))


def test_draws_per_pass_must_be_positive():
    model = tiny_bayesian_llama()
    guide = make_guide("blob", model)
    batch = {k: synthetic_batch(n=2)[k] for k in ("input_ids", "attention_mask")}
    with pytest.raises(ValueError, match="draws_per_pass must be a positive integer"):
        sample_probs(model, guide, [batch], num_samples=2, draws_per_pass=0)


def test_train_and_evaluate_take_draws_per_pass_from_the_command_line(tmp_path, tiny_causal_lm_dir, monkeypatch):
    """``--draws-per-pass 3`` in train and evaluate: the same metrics as one pass per draw (N = 4: 3 + 1), and a
    bad value is refused before anything is written."""
    import json

    from blob_pyro.evaluate import main as evaluate_main
    from blob_pyro.train import main as train_main
    from blob_pyro.evaluation import predictive
    from tests.conftest import write_bigbench_task

    seen, original = [], predictive.draw_predictive

    def spy(*args, **kwargs):  # records which per-pass setting reached the one sampler
        seen.append(kwargs.get("draws_per_pass", 1))
        return original(*args, **kwargs)

    monkeypatch.setattr(predictive, "draw_predictive", spy)
    task = write_bigbench_task(tmp_path / "task.json", num_examples=24)
    common = ["--model", str(tiny_causal_lm_dir), "--task", str(task), "--num-train", "16", "--num-validation", "8",
              "--max-steps", "3", "--batch-size", "4", "--lr", "0.05", "--eval-samples", "4", "--no-zero-shot", "--guide", "blob"]
    train_main([*common, "--output-dir", str(tmp_path / "loop")])
    assert seen and set(seen) == {1}
    seen.clear()
    train_main([*common, "--output-dir", str(tmp_path / "stacked"), "--draws-per-pass", "3"])
    assert seen and set(seen) == {3}
    seen.clear()
    loop, stacked = (json.loads((tmp_path / d / "metrics.json").read_text())["samples_4"] for d in ("loop", "stacked"))
    for key in ("acc", "ece", "nll", "brier"):
        assert stacked[key] == pytest.approx(loop[key], rel=1e-5, abs=1e-7)
    evaluate_main(["--run-dir", str(tmp_path / "loop"), "--output-dir", str(tmp_path / "ev"), "--eval-samples", "4",
                   "--draws-per-pass", "4", "--loo-examples", "4"])
    assert seen and set(seen) == {4}
    evaluated = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    block = next(v for v in evaluated.values() if isinstance(v, dict) and v.get("role") == "in_distribution")
    assert block["samples_4"]["nll"] == pytest.approx(loop["nll"], rel=1e-5)
    with pytest.raises(SystemExit, match="--draws-per-pass must be a positive integer"):
        train_main([*common, "--output-dir", str(tmp_path / "bad"), "--draws-per-pass", "0"])
    assert not (tmp_path / "bad").exists()
