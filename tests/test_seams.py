"""Seams: priors as objects and import paths, guides that only read the model, one parameter store per model.

Every check compares with an analytic answer or with an independent run, so a broken seam fails here.
"""

import math
import re
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from blob_pyro.config import TrainConfig, config_parser, field_choices, field_help
from blob_pyro.guides import GUIDES, make_guide
from blob_pyro.models import (
    PRIORS, BayesianLoRAModel, AnswerTokenHead, HierarchicalNormalPrior, IIDPrior, StudentTPrior, bayesianize,
)
from blob_pyro.objectives import ELBOObjective, KLWeighting, ParityObjective
from tests.helpers import synthetic_batch, tiny_bayesian_llama, tiny_llama
from tests.test_guides_registry import GAUSSIAN_GUIDES, TESTED_GUIDES, wide_start

ROOT = Path(__file__).resolve().parents[1]


def _model(prior=None, *, targets=("lm_head",), random_B=False, bayesian_sites=None, seed=0, rank=2):
    network = tiny_llama(seed=seed)
    bayesianize(network, list(targets), rank=rank, alpha=2.0 * rank, prior=prior, random_B=random_B,
                bayesian_sites=bayesian_sites)
    return BayesianLoRAModel(network, AnswerTokenHead([5, 6, 7]))


# --- priors -------------------------------------------------------------------------------------------------


def test_a_distribution_is_a_prior_and_follows_the_site_dtype():
    model = _model(dist.Laplace(0.0, 0.1))
    layer = model.adapters["lm_head.lora_A"]
    assert isinstance(layer.prior, IIDPrior)
    a = torch.randn(2, 16, dtype=torch.float64)
    expected = (-a.abs() / 0.1 - math.log(2 * 0.1)).sum()
    got = layer.prior.site_distribution(a).log_prob(a)
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(expected), rel=1e-6)
    exact = IIDPrior(dist.Normal, loc=0.0, scale=0.2).distribution(a)  # float64 parameters stay exact
    assert exact.scale.dtype == torch.float64 and float(exact.scale[0, 0]) == 0.2
    with pytest.raises(ValueError, match="needs a scalar distribution"):
        IIDPrior(dist.Normal(torch.zeros(3), 1.0))
    with pytest.raises(TypeError, match="prior must be a blob_pyro.models.Prior or a scalar"):
        bayesianize(tiny_llama(), ["lm_head"], prior="normal")


def my_prior(width: float):
    """An import-path prior for the CLI test: returns a scalar distribution."""
    return dist.Laplace(0.0, width)


def test_prior_import_path_from_the_command_line():
    cfg = TrainConfig.from_argv(["--prior", "pyro.distributions:StudentT", "--prior-kwargs", '{"df": 3, "loc": 0, "scale": 0.2}'])
    prior = cfg.build_prior()
    a = torch.randn(3, 4, dtype=torch.float64)
    expected = torch.distributions.StudentT(*torch.tensor([3.0, 0.0, 0.2], dtype=torch.float64)).log_prob(a).sum()
    assert float(prior.site_distribution(a).log_prob(a)) == pytest.approx(float(expected), rel=1e-9)
    cfg = TrainConfig.from_argv(["--prior", "tests.test_seams:my_prior", "--prior-kwargs", '{"width": 0.3}'])
    assert isinstance(cfg.build_prior(), IIDPrior) and cfg.build_prior().parameters == {"loc": 0.0, "scale": pytest.approx(0.3)}
    with pytest.raises(SystemExit, match="cannot import prior 'pyro.distributions:Nope'"):
        TrainConfig.from_argv(["--prior", "pyro.distributions:Nope"])
    with pytest.raises(SystemExit, match="--prior-kwargs must be a JSON object"):
        TrainConfig.from_argv(["--prior", "pyro.distributions:StudentT", "--prior-kwargs", "df=3"])
    with pytest.raises(SystemExit, match="does not accept --prior-kwargs"):
        TrainConfig.from_argv(["--prior", "tests.test_seams:my_prior", "--prior-kwargs", '{"df": 3}'])


def test_parity_states_its_priors_before_training():
    with pytest.raises(ValueError, match="parity cannot use --prior pyro.distributions:StudentT: .*no closed-form KL"):
        TrainConfig(objective="parity", prior="pyro.distributions:StudentT", prior_kwargs='{"df": 3, "loc": 0, "scale": 0.2}')
    with pytest.raises(ValueError, match="parity cannot use --prior student_t"):
        TrainConfig(objective="parity", prior="student_t")
    TrainConfig(objective="parity", prior="laplace")  # closed form: accepted
    model = _model(StudentTPrior(0.2))
    guide = make_guide("blob", model)
    with pytest.raises(ValueError, match="cannot use the prior of lm_head.lora_A: .*no closed-form KL"):
        ParityObjective(model, guide, total_steps=2, kl=KLWeighting("constant", 2), lr=1e-3)


def test_every_registered_prior_is_a_cli_choice_and_builds():
    """Meta-test: the prior registry is what --prior accepts and documents (a new entry needs no other edit)."""
    help_text = field_help(TrainConfig.__dataclass_fields__["prior"])
    for name in PRIORS:
        assert re.search(rf"\b{name}\b", help_text), f"--prior help does not mention the registered prior {name!r}"
        prior = TrainConfig(prior=name).build_prior()
        assert prior.site_distribution(torch.zeros(2, 3)).event_shape == (2, 3)


def test_every_registered_guide_is_a_cli_choice_and_a_compare_method():
    """Meta-test: the guide registry is what --guide accepts and documents, what compare runs, and what the
    guide tests are parametrised over."""
    from blob_pyro.compare import method_flags

    help_text = config_parser(TrainConfig, prog="train").format_help()
    assert sorted(GUIDES) == sorted(TESTED_GUIDES)
    for name in GUIDES:
        assert re.search(rf"\b{name}\b", field_help(TrainConfig.__dataclass_fields__["guide"])), name
        assert re.search(rf"\b{name}:", help_text.replace("\n", " ")), f"--guide help does not describe {name!r}"
        TrainConfig(guide=name)
        assert method_flags(name) == ["--guide", name]
    with pytest.raises(ValueError, match="unknown guide 'bbb'"):
        TrainConfig(guide="bbb")


def test_every_registered_baseline_is_a_cli_choice_and_its_compare_methods_run():
    """Meta-test: the baseline registry is --method's choices and help, and compare's method table: each
    compare method's flags are a valid train config, and its base method is itself a compare method."""
    from blob_pyro.baselines import registered_methods
    from blob_pyro.compare import BASE_METHOD, METHOD_FLAGS, method_flags

    method_field = TrainConfig.__dataclass_fields__["method"]
    assert set(field_choices(method_field)) == {"svi", *registered_methods()}
    for name, method in registered_methods().items():
        assert f"{name}: {method.help}" in field_help(method_field)
        for alias, extra in method.compare.items():
            assert METHOD_FLAGS[alias] == ["--method", name, *extra] == method_flags(alias)
            cfg = TrainConfig.from_argv([*METHOD_FLAGS[alias], "--num-calibration", "8"])
            assert cfg.method == name
            assert BASE_METHOD.get(alias) == method.base_method
            if method.base_method is not None:
                method_flags(method.base_method)  # a registered guide or compare method
    assert set(METHOD_FLAGS) >= {alias for method in registered_methods().values() for alias in method.compare}


def test_hierarchical_prior_recovers_a_known_scale():
    """Empirical Bayes: factors whose means were drawn from N(0, 0.3^2) (512 elements) teach s ~ 0.3."""
    torch.manual_seed(3)
    true_scale = 0.3
    model = _model(HierarchicalNormalPrior(scale=0.05), rank=32)  # A: (32, 16)
    guide = make_guide("blob", model, eps=0.01)
    with torch.no_grad():
        guide.loc("lm_head.lora_A").copy_(true_scale * torch.randn(32, 16))
    # train only s: the guide is the "data" (its means), the ELBO is minus the closed-form KL
    optim = pyro.optim.Adam({"lr": 0.05})
    elbo = TraceMeanField_ELBO()
    svi = SVI(lambda: model.draw_lora_factors(1.0), poutine.block(guide, hide_types=["param"]), optim, elbo)
    for _ in range(400):
        svi.step()
    learned = float(pyro.param("prior.scale").detach())
    loc, std = guide.loc_and_scale("lm_head.lora_A")
    optimum = float(((loc**2 + std**2).mean()).sqrt())
    assert learned == pytest.approx(optimum, rel=2e-2)
    assert learned == pytest.approx(true_scale, rel=0.1)


@pytest.mark.parametrize("name", GAUSSIAN_GUIDES)
def test_guide_fitted_with_no_data_recovers_the_prior(name):
    """With no likelihood the ELBO optimum is q = p: mean 0, std = the prior scale (0.2) for every element."""
    pyro.set_rng_seed(0)
    random_B = GUIDES[name].random_B is True
    model = _model(IIDPrior(dist.Normal, loc=0.0, scale=0.2), random_B=random_B)
    options = wide_start(name)
    guide = make_guide(name, model, **options)
    elbo = TraceMeanField_ELBO(num_particles=8, vectorize_particles=False)
    svi = SVI(lambda: model.draw_lora_factors(1.0), guide, pyro.optim.Adam({"lr": 0.03}), elbo)
    for _ in range(500):
        svi.step()
    sites = list(model.latent_sites())
    assert sites == ["lm_head.lora_A"] + (["lm_head.lora_B"] if random_B else [])
    draws = torch.stack([torch.cat([v.reshape(-1) for v in guide().values()]) for _ in range(400)]).detach()
    assert draws.mean(0).abs().mean() < 0.03, f"{name}: posterior mean {draws.mean(0).abs().mean():.3f} not ~0"
    assert draws.std(0).mean() == pytest.approx(0.2, rel=0.1), f"{name}: posterior std {draws.std(0).mean():.3f}"


# --- guides read the model --------------------------------------------------------------------------------


def test_no_guide_or_baseline_sets_an_attribute_on_a_model_layer():
    pattern = re.compile(r"set_guide_options|set_transient|(layer|adapter|_adapter\([^)]*\))\.\w+\s*=[^=]")
    offenders = []
    for folder in (ROOT / "guides", ROOT / "blob_pyro" / "baselines"):
        for path in folder.glob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_flipout_on_a_partly_bayesian_model_with_the_blob_guide():
    """``--flipout token --bayesian-sites lm_head``: the fixed q_proj runs without flipout, lm_head with the
    guide's M, handed over through the guide's sample site."""
    pyro.set_rng_seed(0)
    model = tiny_bayesian_llama(targets=("q_proj", "lm_head"), bayesian_sites="lm_head")
    guide = make_guide("blob", model, eps=0.3)
    objective = ELBOObjective(model, guide, num_data=24, total_steps=3, kl=KLWeighting("constant", 3), lr=1e-2,
                              flipout="token")
    losses = [objective.step(synthetic_batch(8, seed=s), s)["loss"] for s in range(3)]
    assert all(math.isfinite(v) for v in losses)
    fixed, bayesian = model.adapters["model.layers.0.self_attn.q_proj.lora_A"], model.adapters["lm_head.lora_A"]
    assert fixed.flipout is None and bayesian.flipout == "token"
    assert bayesian.flipout_loc is guide.loc("lm_head.lora_A")


@pytest.mark.parametrize("extra", [
    ["--flipout", "token", "--bayesian-sites", "lm_head"],
    ["--prior", "pyro.distributions:StudentT", "--prior-kwargs", '{"df": 3, "loc": 0, "scale": 0.2}'],
    ["--guide", "meanfield", "--bayesian-sites", "lm_head"],
])
def test_cli_runs_with_the_new_seams(tmp_path, tiny_causal_lm_dir, extra):
    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task
    from tests.test_train_cli import run_args

    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main(run_args(tiny_causal_lm_dir, task, tmp_path / "run", "--max-steps", "2", "--no-zero-shot", *extra))
    assert all(math.isfinite(mode["nll"]) for mode in metrics.values())
    saved = TrainConfig.load(tmp_path / "run" / "config.json")
    assert saved.prior == TrainConfig.from_argv(extra).prior and saved.prior_kwargs == TrainConfig.from_argv(extra).prior_kwargs


# --- one parameter store per model -----------------------------------------------------------------------


def _train(model, guide, batch, steps, seed):
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for step in range(steps):
        pyro.set_rng_seed(seed + step)
        svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=24)
        yield


def _state(model, guide):
    return {**{k: v.detach().clone() for k, v in guide.state_dict().items()},
            **{site: layer.lora_B.detach().clone() for site, layer in model.adapters.items()}}


def test_two_models_with_their_guides_train_independently():
    batches = [synthetic_batch(8, seed=1), synthetic_batch(8, seed=2)]
    # reference: each pair built and trained alone (the store cleared in between, as a fresh process)
    alone = []
    for k in range(2):
        pyro.clear_param_store()
        model = tiny_bayesian_llama(targets=("q_proj", "lm_head"), seed=k)
        guide = make_guide("blob", model, eps=0.2)
        for _ in _train(model, guide, batches[k], 4, seed=10 * k):
            pass
        alone.append(_state(model, guide))
    # both pairs alive in one process, no clearing, steps interleaved (the README quick start run twice)
    pairs = []
    for k in range(2):
        model = tiny_bayesian_llama(targets=("q_proj", "lm_head"), seed=k)
        pairs.append((model, make_guide("blob", model, eps=0.2)))
    steppers = [_train(m, g, batches[k], 4, seed=10 * k) for k, (m, g) in enumerate(pairs)]
    for _ in range(4):
        for stepper in steppers:
            next(stepper)
    for k, (model, guide) in enumerate(pairs):
        together = _state(model, guide)
        assert together.keys() == alone[k].keys()
        for name, value in together.items():
            torch.testing.assert_close(value, alone[k][name], rtol=0, atol=0, msg=f"pair {k}, {name}")
        assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in model.adapters.values()), "B was never updated"
