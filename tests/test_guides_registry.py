"""Every registered guide: builds, trains a few SVI steps on a tiny model, predicts; Gaussian guides' KL
matches the closed form; sites= restriction; autoguide import paths; registry errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from transformers import LlamaConfig, LlamaForCausalLM

from blob_pyro.evaluation.predictive import posterior_mean_probs, sample_probs
from blob_pyro.guides import GUIDES, make_guide, registered_guides
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, NormalPrior, bayesianize

#: Every registered guide (a guide file that registers itself is tested here with no edit of this file).
TESTED_GUIDES = sorted(registered_guides())
#: The registered distributional families (all Gaussian: each has a closed-form KL, :func:`closed_form_kl`).
GAUSSIAN_GUIDES = [name for name in TESTED_GUIDES if not GUIDES[name].point_estimate]
PRIOR_SCALE = 0.2


def tiny_model(seed: int = 0, targets=("q_proj", "lm_head"), *, bayesian_sites=None, random_B=False) -> BayesianLoRAModel:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    network = LlamaForCausalLM(config)
    bayesianize(network, list(targets), rank=2, alpha=4.0, prior=NormalPrior(PRIOR_SCALE), bayesian_sites=bayesian_sites,
                random_B=random_B)
    return BayesianLoRAModel(network, AnswerTokenHead([3, 4, 5]))


def model_for(name: str, **kwargs) -> BayesianLoRAModel:
    """:func:`tiny_model` built as guide ``name`` needs it (B random for a family over B, e.g. meanfield)."""
    cls = GUIDES.get(name)
    return tiny_model(random_B=cls is not None and cls.random_B is True, **kwargs)


def tiny_batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 3, "indices": torch.arange(n)}


def wide_start(name: str) -> dict:
    """Options that start guide ``name`` with a wide posterior, from the fields it declares (``config_fields``):
    ``init_scale`` 0.05 or BLoB's ``eps`` 0.2 (std eps^2 = 0.04)."""
    fields = GUIDES[name].config_fields
    return {key: value for key, value in {"init_scale": 0.05, "eps": 0.2}.items() if key in fields}


def prior_only(model):
    """The model without data: just the LoRA sites (so the ELBO is minus the KL)."""
    return lambda *args, **kwargs: model.draw_lora_factors(1.0)


AUTOGUIDE_PATHS = ["pyro.infer.autoguide:" + name for name in
                   ("AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal", "AutoLaplaceApproximation")]


def _expected_loss(model, guide, batch, weight, seed=5):
    """The objective at the current parameters, averaged over 64 draws with a fixed seed (so that a fall
    is the parameters' doing, not the draws')."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        return Trace_ELBO(num_particles=64, vectorize_particles=False).loss(
            model, guide, batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=4,
            kl_weight=weight)


@pytest.mark.parametrize("name", TESTED_GUIDES + AUTOGUIDE_PATHS)
def test_guide_trains_and_predicts(name):
    model = model_for(name)
    guide = make_guide(name, model)
    batch = tiny_batch()
    weight = 1.0 if guide.scores_prior else 0.0
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=4, kl_weight=weight)
    start = _expected_loss(model, guide, batch, weight)  # after one step: every parameter exists in the store
    losses = [svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=4, kl_weight=weight)
              for _ in range(30)]
    assert all(math.isfinite(loss) for loss in losses)
    end = _expected_loss(model, guide, batch, weight)
    assert end < start - 0.05 * abs(start), f"{name}: the expected loss went from {start:.4g} to {end:.4g} in 30 steps"
    expected_sites = set(model.adapters)
    if name == "meanfield":
        expected_sites |= {layer.site_name_B for layer in model.adapters.values()}
    assert set(guide.posterior_mean()) == expected_sites
    batches = [{k: batch[k] for k in ("input_ids", "attention_mask")}]
    probs = sample_probs(model, guide, batches, num_samples=3)
    assert probs.shape == (3, 4, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4), atol=1e-5)
    assert posterior_mean_probs(model, guide, batches).shape == (4, 3)


def _normal_kl(loc, scale, prior_scale=PRIOR_SCALE):
    return torch.distributions.kl_divergence(
        torch.distributions.Normal(loc.double(), scale.double()), torch.distributions.Normal(0.0, prior_scale)
    ).sum()


def closed_form_kl(name, guide, model):
    """KL(q || N(0, 0.2^2)) summed over the guide's latent sites: per site from ``loc_and_scale`` for a
    mean-field family, from the joint ``get_posterior()`` for a correlated one (lowrank)."""
    if guide.has_loc_and_scale():
        sites = list(model.latent_sites())  # A sites, and B sites for a family over B
        return sum(_normal_kl(*guide.loc_and_scale(s)) for s in sites)
    if hasattr(guide, "get_posterior"):
        q = guide.get_posterior()
        cov = q.covariance_matrix.double()
        loc = q.loc.double()
        d = loc.numel()
        s2 = PRIOR_SCALE**2
        return 0.5 * (torch.trace(cov) / s2 + (loc**2).sum() / s2 - d + d * math.log(s2) - torch.logdet(cov))
    raise AssertionError(name)


def _perturb(guide):
    """Move every guide parameter off its initial value (so the KL is not at a special point)."""
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("name", GAUSSIAN_GUIDES)
def test_monte_carlo_kl_matches_closed_form(name):
    model = model_for(name)
    guide = make_guide(name, model, **wide_start(name))
    guide()  # materialise the params
    _perturb(guide)
    model_fn = prior_only(model)
    values = []
    with torch.no_grad():
        for _ in range(400):
            guide_trace = poutine.trace(guide).get_trace()
            model_trace = poutine.trace(poutine.replay(model_fn, trace=guide_trace)).get_trace()
            values.append(float(guide_trace.log_prob_sum() - model_trace.log_prob_sum()))
    values = torch.tensor(values, dtype=torch.float64)
    expected = float(closed_form_kl(name, guide, model).detach())
    stderr = float(values.std() / math.sqrt(len(values)))
    assert abs(float(values.mean()) - expected) < 4 * stderr + 1e-6, (name, float(values.mean()), expected, stderr)


@pytest.mark.parametrize("name", ["blob", "meanfield"])
@pytest.mark.parametrize("kl_weight", [1.0, 0.5])
def test_meanfield_elbo_uses_the_exact_kl_scaled_by_the_weight(name, kl_weight):
    model = model_for(name)
    guide = make_guide(name, model)
    _perturb(guide)
    loss = TraceMeanField_ELBO().differentiable_loss(lambda: model.draw_lora_factors(kl_weight), lambda: guide(kl_weight=kl_weight))
    expected = kl_weight * closed_form_kl(name, guide, model)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_map_loss_is_minus_log_prior_and_mle_has_none():
    model = tiny_model()
    guide = make_guide("map", model)
    loss = Trace_ELBO().loss(prior_only(model), guide)
    expected = -sum(
        dist.Normal(0.0, PRIOR_SCALE).log_prob(value.double()).sum() for value in guide.posterior_mean().values()
    )
    assert loss == pytest.approx(float(expected), rel=1e-5)
    mle = make_guide("mle", tiny_model())
    assert Trace_ELBO().loss(lambda: mle.model.draw_lora_factors(0.0), lambda: mle(kl_weight=0.0)) == 0.0


def test_meanfield_makes_B_random_and_uses_its_draws():
    model = tiny_model(random_B=True)
    guide = make_guide("meanfield", model)
    layer = model.adapters["lm_head.lora_A"]
    assert layer.bayesian_B and layer.site_name_B == "lm_head.lora_B"
    trace = poutine.trace(model).get_trace(**{k: v for k, v in tiny_batch().items() if k in ("input_ids", "attention_mask")})
    assert "lm_head.lora_B" in trace.nodes and trace.nodes["lm_head.lora_B"]["type"] == "sample"
    # the posterior-mean pass uses the guide's B mean, not the (unused, zero) lora_B parameter
    batches = [{k: v for k, v in tiny_batch().items() if k in ("input_ids", "attention_mask")}]
    base = posterior_mean_probs(model, guide, batches)
    with torch.no_grad():
        guide.loc("lm_head.lora_B").add_(torch.randn_like(guide.loc("lm_head.lora_B")))  # not constant: softmax is shift-invariant
    assert not torch.allclose(posterior_mean_probs(model, guide, batches), base)
    assert torch.count_nonzero(layer.lora_B) == 0


def test_guide_and_model_must_agree_on_B_and_the_guide_changes_nothing():
    with pytest.raises(ValueError, match=r"MeanFieldGuide covers B, but the model was built with deterministic B.*random_B=True"):
        make_guide("meanfield", tiny_model())
    with pytest.raises(ValueError, match=r"BLoBGuide does not cover B, but the model was built with random B.*'meanfield'"):
        make_guide("blob", tiny_model(random_B=True))
    model = tiny_model(bayesian_sites="lm_head")
    flags = [(layer.prior_scored, layer.bayesian_B) for layer in model.adapters.values()]
    for name in TESTED_GUIDES:
        if GUIDES[name].random_B is not True:
            make_guide(name, model)
    assert [(layer.prior_scored, layer.bayesian_B) for layer in model.adapters.values()] == flags


def test_sites_restricts_the_family_and_masks_the_rest():
    model = tiny_model(bayesian_sites="lm_head")
    guide = make_guide("blob", model, sites="lm_head")  # sites= only checks the model's choice
    assert guide.site_names == ["lm_head.lora_A"]
    assert len(guide.fixed_site_names) == 2
    assert not model.adapters["model.layers.0.self_attn.q_proj.lora_A"].prior_scored
    _perturb(guide)
    # only the Bayesian lm_head contributes a KL; the q_proj point estimates have no prior term
    loss = TraceMeanField_ELBO().differentiable_loss(prior_only(model), guide)
    expected = _normal_kl(guide.loc("lm_head.lora_A"), guide.scale("lm_head.lora_A"))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # the deterministic sites are the same in every draw
    a, b = guide(), guide()
    assert torch.equal(a["model.layers.0.self_attn.q_proj.lora_A"], b["model.layers.0.self_attn.q_proj.lora_A"])
    assert not torch.equal(a["lm_head.lora_A"], b["lm_head.lora_A"])


@pytest.mark.parametrize("name", ["normal", "lowrank", "pyro.infer.autoguide:AutoNormal"])
def test_sites_works_for_autoguides(name):
    model = tiny_model(bayesian_sites="q_proj")
    guide = make_guide(name, model)
    assert set(guide()) == set(model.adapters)
    assert set(guide.inner.prototype_trace.stochastic_nodes) == {s for s in model.adapters if "q_proj" in s}


def test_unknown_sites_and_guides_fail_with_the_fix():
    with pytest.raises(ValueError, match=r"matches no LoRA site.*lm_head"):
        tiny_model(bayesian_sites="k_proj")
    with pytest.raises(ValueError, match=r"sites='lm_head' selects \['lm_head.lora_A'\], but the model's Bayesian sites are .*"
                                         r"bayesianize\(\.\.\., bayesian_sites='lm_head'\)"):
        make_guide("blob", tiny_model(), sites="lm_head")
    with pytest.raises(ValueError, match=r"unknown guide 'bbb'; valid names: \['blob', 'lowrank', 'map', 'meanfield', 'mle', 'normal'\]"):
        make_guide("bbb", tiny_model())
    with pytest.raises(ValueError, match="cannot import guide 'pyro.infer.autoguide:AutoNope'"):
        make_guide("pyro.infer.autoguide:AutoNope", tiny_model())
    with pytest.raises(ValueError, match="not a pyro.infer.autoguide.AutoGuide subclass"):
        make_guide("torch.nn:Linear", tiny_model())


def test_guides_start_at_the_lora_init_not_at_zero():
    for name in ["normal", "lowrank"]:
        guide = make_guide(name, tiny_model())
        means = guide.posterior_mean()
        bound = 1 / math.sqrt(16)
        for value in means.values():
            assert value.abs().max() <= bound + 1e-6 and value.abs().max() > 0.1 * bound


def test_state_dict_round_trip_before_first_call():
    for name in TESTED_GUIDES:
        model = model_for(name)
        guide = make_guide(name, model)
        _perturb(guide)
        state = {k: v.detach().clone() for k, v in guide.state_dict().items()}
        pyro.clear_param_store()
        other = make_guide(name, model_for(name))
        other.load_state_dict(state)
        for site, value in guide.posterior_mean().items():
            assert torch.allclose(other.posterior_mean()[site], value), (name, site)
