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
