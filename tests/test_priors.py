"""Priors: a swap changes the loss by the analytic amount; the hierarchical (empirical-Bayes) scale is
learned and its optimum is the closed form; registry and CLI."""

import math

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from blob_pyro.config import TrainConfig
from blob_pyro.guides import make_guide
from blob_pyro.models import PRIORS, HierarchicalNormalPrior, LaplacePrior, NormalPrior, StudentTPrior, make_prior

from test_guides_registry import tiny_batch, tiny_model


def _loss(model, guide, batch):
    return Trace_ELBO().loss(model, guide, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=8)


def _set_prior(model, prior):
    for layer in model.adapters.values():
        layer.prior = prior


@pytest.mark.parametrize("new_prior, log_density", [
    (LaplacePrior(0.1), lambda a: -a.abs() / 0.1 - math.log(2 * 0.1)),
    (StudentTPrior(0.2, df=3.0), lambda a: torch.distributions.StudentT(3.0, 0.0, 0.2).log_prob(a)),
    (NormalPrior(0.5), lambda a: -0.5 * (a / 0.5) ** 2 - math.log(0.5 * math.sqrt(2 * math.pi))),
])
def test_prior_swap_changes_the_map_loss_by_the_log_density_difference(new_prior, log_density):
    model = tiny_model()
    guide = make_guide("map", model)  # a Delta at A: the loss is NLL - log p(A), deterministic
    batch = tiny_batch()
    before = _loss(model, guide, batch)
    _set_prior(model, new_prior)
    after = _loss(model, guide, batch)
    values = [v.double() for v in guide.posterior_mean().values()]
    old = sum((-0.5 * (a / 0.2) ** 2 - math.log(0.2 * math.sqrt(2 * math.pi))).sum() for a in values)
    new = sum(log_density(a).sum() for a in values)
    assert after - before == pytest.approx(float(old - new), rel=1e-4, abs=1e-3)


def test_prior_swap_changes_the_blob_kl_by_the_closed_form():
    model = tiny_model()
    guide = make_guide("blob", model)
    prior_only = lambda: model.draw_lora_factors(1.0)  # noqa: E731
    before = float(TraceMeanField_ELBO().loss(prior_only, guide))
    _set_prior(model, NormalPrior(0.05))
    after = float(TraceMeanField_ELBO().loss(prior_only, guide))
    expected = 0.0
    for site in guide.site_names:
        q = torch.distributions.Normal(guide.loc(site).double().detach(), guide.scale(site).double().detach())
        expected += float((torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 0.05))
                           - torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 0.2))).sum())
    assert after - before == pytest.approx(expected, rel=1e-5)


def test_hierarchical_scale_optimum_is_the_closed_form():
    model = tiny_model()
    prior = HierarchicalNormalPrior(scale=0.2)
    _set_prior(model, prior)
    guide = make_guide("blob", model, eps=0.2)
    locs = {s: guide.loc(s).detach() for s in guide.site_names}
    scales = {s: guide.scale(s).detach() for s in guide.site_names}
    second_moment = torch.cat([(locs[s] ** 2 + scales[s] ** 2).reshape(-1) for s in locs]).mean()
    optimum = float(second_moment.sqrt())
    prior_only = lambda: model.draw_lora_factors(1.0)  # noqa: E731

    def kl_at(s):
        pyro.get_param_store()["prior.scale"] = torch.tensor(s)
        return float(TraceMeanField_ELBO().loss(prior_only, guide))

    best = kl_at(optimum)
    assert best < kl_at(optimum * 0.9) and best < kl_at(optimum * 1.1)
    # and SVI learns it: optimise only the scale
    pyro.get_param_store()["prior.scale"] = torch.tensor(0.2)
    svi = SVI(prior_only, lambda: guide(), pyro.optim.Adam({"lr": 0.05}), TraceMeanField_ELBO())
    for _ in range(300):
        svi.step()
    learned = float(prior.learned_scale().detach())
    # the guide moves too (toward the prior), so compare with the optimum of the guide's CURRENT moments
    locs = {s: guide.loc(s).detach() for s in guide.site_names}
    scales = {s: guide.scale(s).detach() for s in guide.site_names}
    current = float(torch.cat([(locs[s] ** 2 + scales[s] ** 2).reshape(-1) for s in locs]).mean().sqrt())
    assert learned == pytest.approx(current, rel=0.05)
    assert learned != pytest.approx(0.2, rel=0.05)


def test_hierarchical_scale_is_trained_by_the_full_model():
    model = tiny_model()
    _set_prior(model, HierarchicalNormalPrior(scale=0.2))
    guide = make_guide("blob", model)
    batch = tiny_batch()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=4)
    assert "prior.scale" in pyro.get_param_store()
    assert float(pyro.param("prior.scale")) != pytest.approx(0.2, abs=1e-4)


def test_registry_and_cli():
    assert {"hierarchical", "laplace", "normal", "student_t"} <= set(PRIORS)  # the built-ins; more may register
    assert isinstance(make_prior("hierarchical", scale=0.1), HierarchicalNormalPrior)
    with pytest.raises(ValueError, match=r"unknown prior 'horseshoe'; valid names: \['hierarchical'"):
        make_prior("horseshoe")
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        HierarchicalNormalPrior(scale=0.0)
    cfg = TrainConfig.from_argv(["--prior", "hierarchical", "--guide", "meanfield", "--bayesian-sites", "lm_head"])
    assert (cfg.prior, cfg.guide, cfg.bayesian_sites) == ("hierarchical", "meanfield", "lm_head")
    with pytest.raises(ValueError, match="parity cannot use --prior hierarchical: .*learned parameter"):
        TrainConfig(objective="parity", prior="hierarchical")
