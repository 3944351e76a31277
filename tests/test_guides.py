"""The BLoB and MLE guides: initialisation, analytic KL, KL weights in model and guide, flipout moments."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from blob_pyro.guides import GUIDES, BLoBGuide, MLEGuide, make_guide
from blob_pyro.models import BayesianLoRALinear, NormalPrior
from blob_pyro.objectives import closed_form_kl
from tests.helpers import synthetic_batch, tiny_bayesian_llama


def prior_only(model):
    """The model with no data: only the A sites (what the ELBO reduces to without a likelihood)."""

    def fn(*args, kl_weight=1.0, **kwargs):
        model.draw_lora_factors(kl_weight)

    return fn


def hand_kl(guide, prior_scale):
    total = 0.0
    for site in guide.site_names:
        m, s = guide.loc(site).double(), guide.scale(site).double()
        # KL(N(m, s^2) || N(0, b^2)) = log(b/s) + (s^2 + m^2) / (2 b^2) - 1/2, element-wise
        total += (math.log(prior_scale) - s.log() + (s**2 + m**2) / (2 * prior_scale**2) - 0.5).sum().item()
    return total


def test_blob_guide_initialisation_statistics():
    torch.manual_seed(0)
    model = tiny_bayesian_llama(hidden=64, targets=("q_proj",), rank=8)
    guide = BLoBGuide(model, eps=0.05)
    for site in guide.site_names:
        loc, std = guide.loc(site), guide.scale(site)
        bound = 1 / math.sqrt(64)  # kaiming-uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        assert loc.abs().max() <= bound
        assert abs(loc.var().item() - bound**2 / 3) < 0.25 * bound**2 / 3
        assert std.min() >= 0.05**2 / 2 - 1e-9 and std.max() <= 0.05**2 + 1e-9
        root = std.sqrt()
        assert abs(root.mean().item() - (0.05 / math.sqrt(2) + 0.05) / 2) < 2e-3  # G ~ U(eps/sqrt2, eps)


def test_blob_guide_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps must be a finite positive"):
        BLoBGuide(tiny_bayesian_llama(), eps=0.0)


def test_mean_field_elbo_without_data_is_the_closed_form_kl():
    model = tiny_bayesian_llama(prior=NormalPrior(0.2))
    guide = BLoBGuide(model)
    loss = TraceMeanField_ELBO().loss(prior_only(model), guide)
    expected = hand_kl(guide, 0.2)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert closed_form_kl(model, guide).item() == pytest.approx(expected, rel=1e-9)


def test_trace_elbo_without_data_is_an_unbiased_kl_estimate():
    model = tiny_bayesian_llama(prior=NormalPrior(0.2), targets=("q_proj",))
    guide = BLoBGuide(model, eps=0.3)  # a wide guide so the MC estimate has visible variance
    estimates = torch.tensor([Trace_ELBO().loss(prior_only(model), guide) for _ in range(400)])
    expected = hand_kl(guide, 0.2)
    assert abs(estimates.mean().item() - expected) < 4 * estimates.std().item() / math.sqrt(400)


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_kl_weight_reaches_model_and_guide_sites(elbo):
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model)
    guide_trace = poutine.trace(guide).get_trace(kl_weight=0.25)
    model_trace = poutine.trace(poutine.replay(prior_only(model), trace=guide_trace)).get_trace(kl_weight=0.25)
    for site in guide.site_names:
        assert guide_trace.nodes[site]["scale"] == 0.25
        assert model_trace.nodes[site]["scale"] == 0.25
    pyro.set_rng_seed(0)
    weighted = elbo().loss(prior_only(model), guide, kl_weight=0.25)
    pyro.set_rng_seed(0)
    unweighted = elbo().loss(prior_only(model), guide, kl_weight=1.0)
    assert weighted == pytest.approx(0.25 * unweighted, rel=1e-5)


def test_zero_kl_weight_removes_the_prior_term_but_keeps_gradients():
    model = tiny_bayesian_llama()
    guide = MLEGuide(model)
    batch = synthetic_batch(8)
    loss = Trace_ELBO().differentiable_loss(model, guide, batch["input_ids"], batch["attention_mask"], batch["labels"], kl_weight=0.0)
    nll = torch.nn.functional.cross_entropy(model.class_logits(batch["input_ids"], batch["attention_mask"]), batch["labels"], reduction="sum")
    # with B = 0 the logits do not depend on A, so the loss is the NLL of the base model exactly
    assert loss.item() == pytest.approx(nll.item(), rel=1e-5)
    loss.backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0 for layer in model.adapters.values())


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_flipout_keeps_the_layer_output_mean_and_variance(mode):
    torch.manual_seed(0)
    layer = BayesianLoRALinear(torch.nn.Linear(6, 4), name="layer", rank=3, alpha=3.0, prior=NormalPrior())
    with torch.no_grad():
        layer.lora_B.normal_()
    loc, std = torch.randn(3, 6) * 0.5, torch.rand(3, 6) * 0.5 + 0.2
    x = torch.randn(1, 5, 6)
    draws = 20000
    outs = {"plain": [], "flipout": []}
    with torch.no_grad():
        for _ in range(draws):
            A = loc + std * torch.randn(3, 6)
            layer.set_transient(active_A=A, flipout=None, flipout_loc=None)
            outs["plain"].append(layer(x))
            layer.set_transient(flipout=mode, flipout_loc=loc)
            outs["flipout"].append(layer(x))
    plain, flip = torch.cat(outs["plain"]), torch.cat(outs["flipout"])
    # analytic moments of one token's output: mean = W x + B M x, var_j = sum_k B_jk^2 sum_i std_ki^2 x_i^2
    expected_mean = layer.base_layer(x[0]) + x[0] @ loc.T @ layer.lora_B.detach().T
    expected_var = (x[0] ** 2 @ (std**2).T) @ (layer.lora_B.detach() ** 2).T
    for out in (plain, flip):
        torch.testing.assert_close(out.mean(0), expected_mean, atol=0.05, rtol=0.0)
        torch.testing.assert_close(out.var(0), expected_var, rtol=0.08, atol=0.01)


def test_make_guide_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown guide 'bbb'; valid names: \["):
        make_guide("bbb", tiny_bayesian_llama())
    assert {"blob", "mle"} <= set(GUIDES)
