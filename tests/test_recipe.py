"""``--recipe official``: one switch for the official BLoB update rule and hyper-parameters, overridable
flag by flag, recorded in config.json, and wired to the parity objective."""

import pytest

from blob_pyro.config import RECIPES, TrainConfig


def test_the_official_recipe_sets_every_value_of_the_official_rule():
    cfg = TrainConfig.from_argv(["--recipe", "official"])
    expected = {
        "guide": "blob", "objective": "parity", "kl_schedule": "blob", "dataset_rescaling": True, "flipout": "token",
        "max_grad_norm": 0.0, "lr": 1e-4, "kllr": 0.01, "eps": 0.05, "prior": "normal", "prior_scale": 0.2,
        "max_steps": 5000, "warmup_ratio": 0.06, "gamma": 8.0, "kl_weight": 1.0, "adam_eps": 1e-6, "weight_decay": 0.0,
    }
    assert {name: getattr(cfg, name) for name in expected} == expected
    assert set(RECIPES["official"]) == set(expected)
    assert cfg.recipe_overrides == ""


def test_flags_on_the_command_line_override_the_recipe_even_when_they_equal_the_default():
    # --lr 1e-3 is also TrainConfig's default: it must still win over the recipe's 1e-4
    cfg = TrainConfig.from_argv(["--recipe", "official", "--lr", "1e-3", "--max-steps", "640", "--kllr", "0.002"])
    assert (cfg.lr, cfg.max_steps, cfg.kllr) == (1e-3, 640, 0.002)
    assert cfg.objective == "parity" and cfg.flipout == "token"  # the rest of the recipe stays
    assert cfg.recipe_overrides == "kllr,lr,max_steps"


def test_a_recipe_config_round_trips_through_config_json(tmp_path):
    cfg = TrainConfig.from_argv(["--recipe", "official", "--lr", "1e-3", "--output-dir", str(tmp_path / "r")])
    cfg.save(tmp_path / "config.json")
    assert TrainConfig.load(tmp_path / "config.json") == cfg


def test_python_api_from_recipe_and_conflicts():
    assert TrainConfig.from_recipe("official", lr=3e-4).lr == 3e-4
    assert TrainConfig(recipe="official").lr == 1e-4
    with pytest.raises(ValueError, match=r"--lr 0.0003 conflicts with --recipe official \(0.0001\).*--recipe-overrides"):
        TrainConfig(recipe="official", lr=3e-4)
    with pytest.raises(ValueError, match=r"--recipe-overrides names unknown fields \['learning_rate'\]"):
        TrainConfig(recipe="official", recipe_overrides="learning_rate")
    with pytest.raises(SystemExit):
        TrainConfig.from_argv(["--recipe", "unofficial"])


def test_the_recipe_still_validates_what_it_sets():
    with pytest.raises(SystemExit, match="--objective parity reproduces BLoB's update rule and needs --guide blob"):
        TrainConfig.from_argv(["--recipe", "official", "--guide", "mle"])


def test_build_objective_follows_the_recipe():
    from blob_pyro.assembly import build_objective
    from blob_pyro.objectives import ParityObjective
    from tests.helpers import tiny_bayesian_llama
    from blob_pyro.guides import BLoBGuide

    cfg = TrainConfig.from_argv(["--recipe", "official", "--max-steps", "100", "--batch-size", "4"])
    model = tiny_bayesian_llama()
    objective = build_objective(cfg, model, BLoBGuide(model), num_data=640)
    assert isinstance(objective, ParityObjective)
    assert objective.flipout == "token" and objective.max_grad_norm is None
    assert objective.kl.schedule == "blob" and objective.kl.cycle_length == int(100 * 640 ** (3.141592653589793 / 8) / 4)
    assert [group["lr"] for group in objective.adamw.param_groups] == [0.0]  # the official warm-up starts at lr 0
