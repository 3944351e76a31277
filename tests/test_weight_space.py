"""Weight-space spread of a LoRA layer's posterior: closed forms against direct and Monte Carlo answers."""

import math

import pytest
import torch

from blob_pyro.evaluation.weight_space import spread_by_layer, update_spread
from blob_pyro.guides import BLoBGuide, MeanFieldGuide
from tests.helpers import tiny_bayesian_llama


def test_mean_update_and_sampled_rms_match_direct_and_monte_carlo_answers():
    g = torch.Generator().manual_seed(0)
    B, loc = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g)
    std = torch.rand(3, 7, generator=g) * 0.5
    out = update_spread(B, loc, std, scaling=2.0)
    assert out["mean_update_norm"] == pytest.approx(float(2.0 * torch.linalg.matrix_norm(B @ loc)), rel=1e-6)
    eps = torch.randn(200_000, 3, 7, generator=g, dtype=torch.float64) * std.double()
    mc = float((2.0 * B.double() @ eps).pow(2).sum((-2, -1)).mean().sqrt())
    assert out["sampled_update_rms"] == pytest.approx(mc, rel=5e-3)
    assert out["ratio"] == pytest.approx(out["sampled_update_rms"] / out["mean_update_norm"])
    assert out["mean_abs_loc"] == pytest.approx(float(loc.abs().mean()))
    assert out["mean_std"] == pytest.approx(float(std.mean()))


def test_single_rank_case_by_hand_and_degenerate_inputs():
    # r = 1: delta W = b a^T, noise b eps^T: E||b eps^T||^2 = ||b||^2 * sum_i std_i^2
    b, a, std = torch.tensor([[3.0], [4.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.1, 0.2]])
    out = update_spread(b, a, std)
    assert out["mean_update_norm"] == pytest.approx(5.0)
    assert out["sampled_update_rms"] == pytest.approx(5.0 * math.sqrt(0.01 + 0.04))
    assert update_spread(torch.zeros(2, 1), a, std)["sampled_update_rms"] == 0.0  # B = 0: draws cannot matter
    assert update_spread(b, torch.zeros(1, 2), std)["ratio"] == math.inf
    with pytest.raises(ValueError, match="same r"):
        update_spread(torch.zeros(2, 2), a, std)
    with pytest.raises(ValueError, match="std must have loc's shape"):
        update_spread(b, a, torch.ones(2, 2))
    with pytest.raises(ValueError, match="non-negative"):
        update_spread(b, a, -std)


def test_spread_by_layer_covers_every_site_and_uses_the_layer_scaling():
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.normal_()
    guide = BLoBGuide(model)
    guide()
    spread = spread_by_layer(model, guide)
    assert set(spread) == set(guide.site_names)
    site = guide.site_names[0]
    layer = model.adapters[site]
    expected = update_spread(layer.lora_B.detach(), guide.loc(site).detach(), guide.scale(site).detach(), scaling=layer.scaling)
    assert spread[site] == pytest.approx(expected)
    with pytest.raises(ValueError, match="samples B too"):
        spread_by_layer(model, MeanFieldGuide(tiny_bayesian_llama(random_B=True)))


def test_posterior_trace_summarises_every_entry_of_A():
    from blob_pyro.evaluation.weight_space import posterior_trace
    from blob_pyro.guides import MLEGuide

    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model, eps=0.05)
    locs = torch.cat([guide.loc_and_scale(s)[0].detach().flatten() for s in guide.site_names])
    stds = torch.cat([guide.loc_and_scale(s)[1].detach().flatten() for s in guide.site_names])
    trace = posterior_trace(guide)
    assert trace["mean_abs_A"] == pytest.approx(float(locs.abs().mean()), rel=1e-6)
    assert (trace["std_A_min"], trace["std_A_max"]) == pytest.approx((float(stds.min()), float(stds.max())), rel=1e-6)
    # BLoB's init: std = G^2 with G ~ U(eps / sqrt(2), eps), so every std lies in [eps^2 / 2, eps^2]
    assert 0.05**2 / 2 <= trace["std_A_min"] <= trace["std_A_median"] <= trace["std_A_max"] <= 0.05**2
    mle = MLEGuide(model)
    point = posterior_trace(mle)
    assert set(point) == {"mean_abs_A"}  # a point estimate has no std
    values = torch.cat([mle.posterior_mean()[s].flatten() for s in mle.site_names])
    assert point["mean_abs_A"] == pytest.approx(float(values.abs().mean()), rel=1e-6)


def test_the_training_log_follows_the_std_of_A(tmp_path, tiny_causal_lm_dir):
    import json

    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task

    task = write_bigbench_task(tmp_path / "task.json", num_examples=24)
    out = tmp_path / "run"
    main(["--model", str(tiny_causal_lm_dir), "--task", str(task), "--num-train", "16", "--num-validation", "8",
          "--max-steps", "4", "--log-every", "1", "--batch-size", "4", "--eval-samples", "2", "--no-zero-shot",
          "--guide", "blob", "--lr", "1e-2", "--warmup-ratio", "0", "--output-dir", str(out)])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [0, 1, 2, 3]
    medians = [e["std_A_median"] for e in log]
    assert all(e["std_A_min"] <= e["std_A_median"] <= e["std_A_max"] for e in log)
    assert len(set(medians)) == len(medians) and medians[-1] > medians[0]  # read after every step; the KL widens q
