"""Why a prior on A under Adam can stall LoRA (measured in results/regime: MAP's and the textbook ELBO's mean |A|
shrinks by about the summed learning rate while the model stays a constant predictor).

LoRA starts at B = 0, where the likelihood gradient on A is exactly zero (dL/dA = s B^T dL/dh x^T). Adam divides
each entry's gradient by its own running RMS, so the prior's gradient alone (M / sigma_p^2 for N(0, sigma_p^2),
closed form under TraceMeanField_ELBO; Trace_ELBO's one-draw estimate is A / sigma_p^2) moves every entry of M by
the full learning rate towards 0 in the first step taken at a non-zero learning rate (with the default warm-up,
step 0 runs at lr 0), whatever the KL weight; and at A = 0 the likelihood gradient on B vanishes too
(dL/dB = s dL/dh (A x)^T), so A = B = 0 is a stationary point that training cannot leave. These tests pin that
arithmetic on the real objective, so a change of optimiser or initialisation that removes the trap shows up here.
"""

import pytest
import torch

from blob_pyro.guides import BLoBGuide, MAPGuide, MLEGuide
from blob_pyro.guides.base import init_to_lora
from blob_pyro.objectives import ELBOObjective, KLWeighting
from tests.helpers import synthetic_batch, tiny_bayesian_llama

LR, ADAM_EPS, PRIOR_SCALE, NUM_DATA = 1e-3, 1e-6, 0.2, 8


def one_step(guide_cls, kl_weight, elbo="meanfield"):
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = guide_cls(model)
    batch = synthetic_batch(NUM_DATA)
    objective = ELBOObjective(model, guide, num_data=NUM_DATA, total_steps=10, kl=KLWeighting("constant", 1, kl_weight),
                              lr=LR, adam_eps=ADAM_EPS, warmup_ratio=0.0, max_grad_norm=None, elbo=elbo)
    before = {s: v.clone() for s, v in guide.posterior_mean().items()}
    assert all(float(layer.lora_B.detach().abs().max()) == 0.0 for layer in model.adapters.values())  # LoRA's B = 0
    objective.step(batch, 0)
    after = guide.posterior_mean()
    return before, after, model


@pytest.mark.parametrize("guide_cls", [BLoBGuide, MAPGuide])
@pytest.mark.parametrize("kl_weight", [1.0, 1e-2])
def test_first_adam_step_moves_every_entry_of_A_by_the_learning_rate_towards_zero(guide_cls, kl_weight):
    before, after, model = one_step(guide_cls, kl_weight)
    for site, m in before.items():
        # the only gradient on M: the prior term's w * M / sigma_p^2 (closed-form KL or -log p; the ELBO is per dataset)
        g = kl_weight * m / PRIOR_SCALE**2
        # Adam's first step is lr * g / (|g| + eps) = -lr * sign(M) up to eps, for any weight
        torch.testing.assert_close(after[site] - m, -LR * g / (g.abs() + ADAM_EPS), rtol=1e-4, atol=1e-9)
        assert float((after[site] - m + LR * torch.sign(m)).abs().median()) < 1e-3 * LR
    assert any(float(layer.lora_B.detach().abs().max()) > 0 for layer in model.adapters.values())  # B does get a gradient


def test_without_a_prior_A_does_not_move_in_the_first_step():
    before, after, _ = one_step(MLEGuide, 1.0, elbo="trace")
    for site, m in before.items():
        assert torch.equal(after[site], m)  # zero likelihood gradient at B = 0, no prior: A stays


def test_at_A_equal_zero_and_B_equal_zero_training_cannot_move_the_adapter():
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = MLEGuide(model, init_loc_fn=lambda adapter: torch.zeros_like(init_to_lora(adapter)))
    batch = synthetic_batch(NUM_DATA)
    objective = ELBOObjective(model, guide, num_data=NUM_DATA, total_steps=10, kl=KLWeighting("constant", 1), lr=LR,
                              warmup_ratio=0.0, max_grad_norm=None)
    objective.step(batch, 0)
    assert all(float(layer.lora_B.detach().abs().max()) == 0.0 for layer in model.adapters.values())  # the saddle: B stays 0
    assert all(float(v.abs().max()) == 0.0 for v in guide.posterior_mean().values())
