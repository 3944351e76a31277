"""--scale-lr-factor: which parameters are a guide's spread, and that they (only they) learn at lr * factor."""

import pyro
import pytest
import torch

from blob_pyro.config import TrainConfig
from blob_pyro.guides import BLoBGuide, make_guide
from blob_pyro.objectives import ELBOObjective, KLWeighting
from blob_pyro.optim import spread_parameter_test
from tests.helpers import synthetic_batch, tiny_bayesian_llama
from tests.test_guides_registry import AUTOGUIDE_PATHS, TESTED_GUIDES, model_for, tiny_batch, tiny_model

EXAMPLE_GUIDE = "examples.softplus_guide:SoftplusNormalGuide"


@pytest.mark.parametrize("name", TESTED_GUIDES + AUTOGUIDE_PATHS + ["pyro.infer.autoguide:AutoMultivariateNormal", EXAMPLE_GUIDE])
def test_spread_parameters_are_declared_by_every_guide(name):
    """Distributional families (Gaussian with a learned spread) declare spread parameters, point estimates
    (and the Laplace autoguide, a MAP point during SVI) none; no mean is ever one."""
    model = model_for(name)
    guide = make_guide(name, model)
    batch = tiny_batch()
    guide(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"], num_data=4, kl_weight=1.0)
    is_spread = spread_parameter_test(guide)
    names = list(pyro.get_param_store().keys())
    spread = [n for n in names if is_spread(n)]
    learns_a_spread = not guide.point_estimate and "Laplace" not in name
    if learns_a_spread:
        assert spread, f"{name}: no spread parameter among {names}"
        assert len(spread) < len(names), f"{name}: every parameter classified as a spread: {names}"
        assert not any("loc" in n.split(".")[-1] for n in spread), spread
    else:
        assert spread == [], f"{name} learns no spread by SVI, yet {spread} were classified as spreads"


def test_the_hierarchical_prior_scale_is_a_model_parameter_not_a_spread():
    from blob_pyro.models.priors import HierarchicalNormalPrior

    model = tiny_model()
    for layer in model.adapters.values():
        layer.prior = HierarchicalNormalPrior(0.2)
    guide = BLoBGuide(model)
    model.draw_lora_factors()  # creates prior.scale in the store
    guide()
    is_spread = spread_parameter_test(guide)
    assert "prior.scale" in pyro.get_param_store() and not is_spread("prior.scale")
    assert is_spread("BLoBGuide.std_roots.model.layers.0.self_attn.q_proj.lora_A")
    assert not is_spread("BLoBGuide.locs.model.layers.0.self_attn.q_proj.lora_A")


@pytest.mark.parametrize("factor", [1.0, 10.0])
def test_first_adam_step_moves_spreads_by_lr_times_factor_and_means_by_lr(factor):
    # Adam's first update is lr * g / (|g| + eps): every coordinate with a gradient moves by ~lr, whatever |g|.
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model)
    batch = synthetic_batch(8)
    lr = 1e-3
    objective = ELBOObjective(model, guide, num_data=8, total_steps=100, kl=KLWeighting("constant", 1), lr=lr,
                              warmup_ratio=0.0, max_grad_norm=None, scale_lr_factor=factor)
    guide()
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    objective.step(batch, 0)
    after = dict(guide.named_parameters())
    for n, p0 in before.items():
        step = (after[n].detach() - p0).abs()
        expected = lr * factor if n.startswith("std_roots.") else lr
        moved = step[step > 0]
        assert moved.numel() > 0.9 * step.numel(), n
        assert torch.allclose(moved, torch.full_like(moved, expected), rtol=0.02), (n, moved.min(), moved.max(), expected)
    b_steps = torch.cat([(layer.lora_B.detach()).abs().flatten() for layer in model.adapters.values()])
    assert b_steps.max() <= lr * 1.02  # B starts at 0: its first step is at most lr, untouched by the factor


def test_scale_lr_factor_is_validated_and_reaches_the_cli():
    assert TrainConfig.from_argv(["--scale-lr-factor", "10"]).scale_lr_factor == 10.0
    assert TrainConfig().scale_lr_factor == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="--scale-lr-factor must be a finite positive number"):
            TrainConfig(scale_lr_factor=bad)
    with pytest.raises(ValueError, match="parity rule steps G by SGD at --kllr"):
        TrainConfig(objective="parity", scale_lr_factor=5.0)
