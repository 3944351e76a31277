"""Extension by import path and by registration: autoguides end to end from the CLI and compare, the Laplace
autoguide against an independently computed Hessian, the README's "Extend" command, one-file registration."""

import math
import re
import shlex
import sys
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.config import TrainConfig, field_choices, field_help
from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, NormalPrior, bayesianize
from tests.conftest import write_bigbench_task
from tests.helpers import tiny_llama
from tests.test_train_cli import run_args

ROOT = Path(__file__).resolve().parents[1]
AUTO = "pyro.infer.autoguide:"


def _field(name: str):
    return TrainConfig.__dataclass_fields__[name]


def _train(tmp_path, model_dir, *extra):
    from blob_pyro.train import main

    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    return main(run_args(model_dir, task, out, "--no-zero-shot", *extra)), out


# --- any autoguide by import path, from the command line ---------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--guide", AUTO + "AutoNormal"],
    ["--guide", AUTO + "AutoDiagonalNormal"],
    ["--guide", AUTO + "AutoLowRankMultivariateNormal", "--guide-rank", "3"],
    ["--guide", AUTO + "AutoLowRankMultivariateNormal", "--guide-kwargs", '{"rank": 2, "init_scale": 0.01}'],
])
def test_autoguides_train_and_predict_from_the_cli(tmp_path, tiny_causal_lm_dir, extra):
    metrics, out = _train(tmp_path, tiny_causal_lm_dir, "--max-steps", "2", *extra)
    assert set(metrics) == {"mean", "samples_2"} and all(math.isfinite(m["nll"]) for m in metrics.values())
    state = load_file(str(out / "guide.safetensors"))
    if "AutoLowRank" in extra[1]:
        rank = 3 if "--guide-rank" in extra else 2
        assert state["inner.cov_factor"].shape[1] == rank  # the rank reached the autoguide
    if "--guide-kwargs" in extra:  # init_scale 0.01 from the JSON, not --init-scale's 0.0025 (Pyro: scale = sqrt(0.5) init_scale)
        scale = torch.nn.functional.softplus(state["inner.scale_unconstrained"])
        assert float(scale.mean()) == pytest.approx(0.5**0.5 * 0.01, rel=0.05)


def test_laplace_autoguide_sees_the_likelihood_from_the_cli(tmp_path, tiny_causal_lm_dir):
    from blob_pyro.baselines.common import load_run

    metrics, out = _train(tmp_path, tiny_causal_lm_dir, "--guide", AUTO + "AutoLaplaceApproximation", "--max-steps", "30",
                          "--lr", "0.03", "--target-modules", "lm_head", "--eval-samples", "4")
    assert set(metrics) == {"mean", "samples_4"}
    state = load_file(str(out / "guide.safetensors"))
    assert float(state["laplace_fitted"]) == 1.0
    guide = load_run(out).guide
    _, std = guide.loc_and_scale("lm_head.lora_A")
    # prior-only (what the adapter saw before): exactly 0.2 everywhere; 30 steps of data already move it
    assert float((std - 0.2).abs().max()) > 5e-3
    draws = torch.stack([guide()["lm_head.lora_A"] for _ in range(2)])
    assert not torch.equal(draws[0], draws[1])


def _lm_head_model(B_std: float, *, seed: int = 0) -> BayesianLoRAModel:
    network = tiny_llama(seed=seed).double()
    bayesianize(network, ["lm_head"], rank=2, alpha=4.0, prior=NormalPrior(0.2), adapter_dtype=torch.float64)
    model = BayesianLoRAModel(network, AnswerTokenHead([5, 6, 7]))
    with torch.no_grad():
        model.adapters["lm_head.lora_A"].lora_B.normal_(0.0, B_std).mul_(B_std > 0)
    return model


def _batches():
    from tests.helpers import synthetic_batch

    data = synthetic_batch(12, seed=4)
    return [{k: v[i:i + 6] for k, v in data.items()} for i in (0, 6)], data


def test_laplace_covariance_is_the_inverse_hessian_of_the_log_joint():
    """Independent answer: torch.autograd.functional.hessian of log p(y | A) + log N(A; 0, 0.2^2) written out
    by hand (one forward over all 12 examples), against post_fit's sum over two batches through the Pyro model."""
    model = _lm_head_model(B_std=2.0)
    guide = make_guide(AUTO + "AutoLaplaceApproximation", model)
    with torch.no_grad():
        guide.inner.loc.normal_(0.0, 0.1)  # any point: the covariance is H^-1 there
    batches, data = _batches()
    guide.post_fit(batches)
    layer = model.adapters["lm_head.lora_A"]

    def log_joint(vector):
        A = vector.reshape(2, 16)
        model.set_lora_draws({"lm_head.lora_A": A})
        logits = model.head(model.network, data["input_ids"], data["attention_mask"])
        return torch.log_softmax(logits, -1).gather(-1, data["labels"][:, None]).sum() + dist.Normal(0.0, 0.2).log_prob(vector).sum()

    hessian = torch.autograd.functional.hessian(log_joint, guide.inner.loc.detach().clone())
    expected = torch.linalg.inv(-hessian)
    torch.testing.assert_close(guide.covariance().double(), expected, rtol=1e-5, atol=1e-7)  # entries ~4e-2
    loc, std = guide.loc_and_scale("lm_head.lora_A")
    torch.testing.assert_close(std, expected.diagonal().sqrt().reshape(2, 16))
    assert std.max() < 0.19  # the likelihood matters: the prior alone gives 0.2
    assert layer.lora_B.abs().sum() > 0


def test_laplace_with_an_uninformative_likelihood_recovers_the_prior():
    """With B = 0 the labels do not depend on A: H is the prior precision, so std = 0.2 and no correlation."""
    model = _lm_head_model(B_std=0.0)
    guide = make_guide(AUTO + "AutoLaplaceApproximation", model)
    guide.post_fit(_batches()[0])
    torch.testing.assert_close(guide.covariance().double(), 0.04 * torch.eye(32, dtype=torch.float64))


def test_autoguides_that_cannot_work_here_are_refused_with_the_reason():
    with pytest.raises(SystemExit, match="AutoGaussian derives its sparse precision structure from the dependency graph"):
        TrainConfig.from_argv(["--guide", AUTO + "AutoGaussian"])
    with pytest.raises(ValueError, match="AutoGuideList is a container that starts empty"):
        TrainConfig(guide=AUTO + "AutoGuideList")
    with pytest.raises(ValueError, match=r"dense 32 x 32 Hessian.*make fewer layers Bayesian \(--bayesian-sites"):
        make_guide(AUTO + "AutoLaplaceApproximation", _lm_head_model(0.0), max_latent_dim=16)
    with pytest.raises(ValueError, match="cannot import guide 'pyro.infer.autoguide:AutoNope'"):
        TrainConfig(guide=AUTO + "AutoNope")


def test_guide_kwargs_are_validated_and_reach_the_guide(tiny_causal_lm_dir):
    cfg = TrainConfig(guide=AUTO + "AutoLowRankMultivariateNormal", guide_kwargs='{"rank": 3}')
    assert cfg.guide_options() == {"init_scale": 0.0025, "rank": 3}
    assert TrainConfig(guide="blob", eps=0.1).guide_options() == {"eps": 0.1}
    assert TrainConfig(guide=AUTO + "AutoLaplaceApproximation").guide_options() == {}
    with pytest.raises(ValueError, match="--guide-kwargs must be a JSON object"):
        TrainConfig(guide_kwargs="rank=3")
    from blob_pyro.assembly import build_guide

    with pytest.raises(ValueError, match=r"--guide blob does not accept the options \['eps', 'rank'\]"):
        build_guide(TrainConfig(guide="blob", guide_kwargs='{"rank": 3}'), _lm_head_model(0.0))


def test_compare_runs_a_registered_guide_and_an_autoguide_import_path(tmp_path, tiny_causal_lm_dir, monkeypatch):
    from blob_pyro import compare
    from blob_pyro.train import main as train_main

    monkeypatch.setattr(compare, "run_training", train_main)  # in process: the argv of python -m blob_pyro.train
    task = write_bigbench_task(tmp_path / "task.json")
    shared = run_args(tiny_causal_lm_dir, task, tmp_path / "unused", "--max-steps", "2")
    shared = shared[:shared.index("--output-dir")] + shared[shared.index("--output-dir") + 2:]
    rows = compare.main(["--methods", "blob," + AUTO + "AutoNormal", "--output-dir", str(tmp_path / "cmp"), *shared])
    assert [r["method"] for r in rows if not r["method"].startswith("zero-shot")][::2] == ["blob", AUTO + "AutoNormal"]
    assert (tmp_path / "cmp" / "pyro.infer.autoguide_AutoNormal" / "seed_1" / "metrics.json").is_file()
    with pytest.raises(ValueError, match="AutoGaussian derives"):  # before any run starts
        compare.main(["--methods", AUTO + "AutoGaussian", "--output-dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


# --- one file per extension ----------------------------------------------------------------------------------


def _readme_extend_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Extend"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [shlex.split(line.replace("\\\n", " ")) for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if line.startswith("python -m blob_pyro.train")]
    return [command[3:] for command in commands]  # the arguments after python -m blob_pyro.train


def test_readme_extend_command_trains_the_example_prior_and_guide(tmp_path, tiny_causal_lm_dir):
    """The README's command exactly, with the tiny test model, task and sizes appended (later flags win)."""
    from blob_pyro.train import main

    (command,) = _readme_extend_commands()
    assert "examples.spike_and_slab_prior:make_prior" in command and "examples.softplus_guide:SoftplusNormalGuide" in command
    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main(command + run_args(tiny_causal_lm_dir, task, tmp_path / "run", "--max-steps", "3", "--no-zero-shot"))
    assert all(math.isfinite(m["nll"]) for m in metrics.values()) and "samples_2" in metrics
    cfg = TrainConfig.load(tmp_path / "run" / "config.json")
    assert type(cfg.build_prior()).__name__ == "SpikeAndSlabPrior"
    assert set(load_file(str(tmp_path / "run" / "guide.safetensors"))) == {
        f"{kind}.{site}_unconstrained" for kind in ("locs", "rhos") for site in
        [f"model.layers.{i}.self_attn.{p}.lora_A" for i in range(2) for p in ("q_proj", "v_proj")] + ["lm_head.lora_A"]}


def test_example_guide_declares_its_spread_for_scale_lr_factor():
    from examples.softplus_guide import SoftplusNormalGuide

    guide = make_guide("examples.softplus_guide:SoftplusNormalGuide", _lm_head_model(0.0))
    assert isinstance(guide, SoftplusNormalGuide)
    assert [n for n, p in guide.named_parameters() if any(p is q for q in guide.spread_parameters())] == [
        "rhos.lm_head.lora_A_unconstrained"]


@pytest.fixture
def scratch_package_module(tmp_path, monkeypatch):
    """Write a module into a scratch folder that is part of a package's ``__path__`` (as a new file in that
    package would be) and rediscover the package's registry."""

    def add(package, registry_module, source: str, name: str):
        folder = tmp_path / package.__name__.replace(".", "_")
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(source)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
        monkeypatch.setattr(registry_module, "_discovered", False)
        monkeypatch.delitem(sys.modules, f"{package.__name__}.{name}", raising=False)

    return add


def test_a_new_guide_file_registers_itself(scratch_package_module, monkeypatch):
    import blob_pyro.guides as guides
    from blob_pyro import compare
    from blob_pyro.guides import registry

    monkeypatch.setattr(registry, "GUIDES", dict(registry.GUIDES))
    monkeypatch.setattr(registry, "GUIDE_HELP", dict(registry.GUIDE_HELP))
    scratch_package_module(guides, registry, (
        "from blob_pyro.guides.blob import BLoBGuide\n"
        "from blob_pyro.guides.registry import register_guide\n\n"
        "@register_guide('scratch', help='a BLoB copy defined in one new file')\n"
        "class ScratchGuide(BLoBGuide):\n    pass\n"), "scratch_guide")
    assert "scratch" in registry.registered_guides()
    cfg = TrainConfig(guide="scratch", eps=0.1)
    assert cfg.guide_options() == {"eps": 0.1}  # config_fields inherited from BLoBGuide
    assert "scratch: a BLoB copy defined in one new file" in field_help(_field("guide"))
    assert compare.method_flags("scratch") == ["--guide", "scratch"]
    assert type(make_guide("scratch", _lm_head_model(0.0))).__name__ == "ScratchGuide"


def test_a_new_baseline_file_registers_itself(scratch_package_module, monkeypatch):
    import blob_pyro.baselines as baselines
    from blob_pyro import compare

    monkeypatch.setattr(baselines, "METHODS", dict(baselines.METHODS))
    monkeypatch.setattr(baselines, "METHOD_HELP", dict(baselines.METHOD_HELP))
    scratch_package_module(baselines, baselines, (
        "from blob_pyro.baselines import register_method\n\n"
        "@register_method('scratch_method', help='returns fixed metrics', compare={'scratch_method': ['--guide', 'map']},"
        " base_method='map')\n"
        "def run(cfg):\n    return {'ran': cfg.method}\n"), "scratch_method")
    assert "scratch_method" in baselines.registered_methods()
    cfg = TrainConfig(method="scratch_method")
    assert baselines.run_method(cfg) == {"ran": "scratch_method"}
    flags, bases = compare._method_table()
    assert flags["scratch_method"] == ["--method", "scratch_method", "--guide", "map"] and bases["scratch_method"] == "map"
    assert "scratch_method: returns fixed metrics" in field_help(_field("method"))
    assert "scratch_method" in field_choices(_field("method"))
