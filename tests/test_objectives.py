"""Training objectives and schedules: the parity update against a hand computation, KL schedules,
the SVI ELBO path, and an end-to-end run that learns a synthetic task."""

import math

import pyro
import pytest
import torch
from pyro import poutine

from blob_pyro.guides import BLoBGuide, MLEGuide
from blob_pyro.objectives import ELBOObjective, KLWeighting, ParityObjective
from blob_pyro.schedules import kl_cycle_length, kl_reweighting_pi, linear_warmup_decay, rescaled_cycle_length
from tests.evaluation_helpers import accuracy_of
from tests.helpers import synthetic_batch, tiny_bayesian_llama


class FixedNoiseBLoBGuide(BLoBGuide):
    """BLoBGuide whose reparameterised draw uses a fixed standard-normal noise per site."""

    def __init__(self, model, noise, **kwargs):
        super().__init__(model, **kwargs)
        self.noise = noise

    def forward(self, *args, kl_weight=1.0, flipout=None, **kwargs):
        return {s: self.loc(s) + self.scale(s) * self.noise[s] for s in self.site_names}


def test_kl_reweighting_schedules():
    M = 4
    blob = [kl_reweighting_pi(t, M, "blob") for t in range(2 * M + 1)]
    # The official counter starts at 1 on the first optimiser step (self.i = 1, incremented after use):
    # i = 1, 2, 3, 4 (4 mod 4 = 0 -> M), 1, ...; pi_i = 2^i / (2^(M+1) - 1). Written out by hand:
    assert blob == pytest.approx([2 / 31, 4 / 31, 8 / 31, 16 / 31, 2 / 31, 4 / 31, 8 / 31, 16 / 31, 2 / 31])
    blundell = [kl_reweighting_pi(t, M, "blundell") for t in range(M)]
    assert blundell == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert sum(blundell) == pytest.approx(1.0)
    assert kl_reweighting_pi(7, M, "constant") == 0.25
    assert kl_reweighting_pi(2999, 3000, "blob") == pytest.approx(0.5)  # 2^M / (2^(M+1) - 1), no overflow
    assert kl_reweighting_pi(0, 3000, "blob") == 0.0  # 2 / (2^3001 - 1) underflows, as ~0 in the official code
    assert kl_reweighting_pi(0, 1, "blob") == pytest.approx(2 / 3)  # M = 1: i = M every step
    with pytest.raises(ValueError, match="unknown KL schedule"):
        kl_reweighting_pi(0, 4, "cosine")


def test_dataset_rescaling_and_cycle_length():
    # M = int(100 * N^(pi/gamma) / P / b)
    assert rescaled_cycle_length(640, 4, gamma=8) == int(100 * 640 ** (math.pi / 8) / 4)
    assert kl_cycle_length(640, 4, dataset_rescaling=False) == 160
    assert kl_cycle_length(641, 4, dataset_rescaling=False) == 161


def test_linear_warmup_then_decay():
    # The official schedule: s / w during warm-up (the first step runs at lr 0), then (T - s) / (T - w).
    f = linear_warmup_decay(100, 0.1)
    assert [f(s) for s in (0, 1, 9)] == pytest.approx([0.0, 0.1, 0.9])
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0
    # w = 0.06 * 160 = 9.6 is not rounded: steps 0..9 warm up (9 / 9.6), step 10 decays (150 / 150.4)
    g = linear_warmup_decay(160, 0.06)
    assert [g(s) for s in (0, 5, 9, 10, 159)] == pytest.approx([0.0, 5 / 9.6, 9 / 9.6, 150 / 150.4, 1 / 150.4])
    assert linear_warmup_decay(10, 0.0)(0) == 1.0  # no warm-up: the first step at the full rate


def test_one_parity_step_equals_a_hand_computation():
    torch.manual_seed(0)
    model = tiny_bayesian_llama(targets=("q_proj", "lm_head"))
    with torch.no_grad():
        for layer in model.adapters.values():
            layer.lora_B.normal_(0, 0.3)
    noise = {s: torch.randn(layer.rank, layer.in_features) for s, layer in model.adapters.items()}
    guide = FixedNoiseBLoBGuide(model, noise, eps=0.3)
    beta, lr, kllr = 0.2, 1e-2, 5e-2
    kl = KLWeighting("blob", cycle_length=4)
    pi = 2 / 31  # step 0 of a 4-step 'blob' cycle: the official counter starts at i = 1
    batch = synthetic_batch(6)

    # Hand computation, from copies of the initial parameters.
    M0 = {s: guide.loc(s).detach().clone().requires_grad_() for s in guide.site_names}
    G0 = {s: deep_root(guide, s).detach().clone().requires_grad_() for s in guide.site_names}
    B0 = {s: layer.lora_B for s, layer in model.adapters.items()}  # autograd.grad leaves .grad untouched
    draws = {s: M0[s] + G0[s] ** 2 * noise[s] for s in guide.site_names}
    with poutine.block(), poutine.condition(data=draws):
        logits = model.class_logits(batch["input_ids"], batch["attention_mask"])
    nll = torch.nn.functional.cross_entropy(logits, batch["labels"])
    grads = torch.autograd.grad(nll, [*M0.values(), *G0.values(), *B0.values()], allow_unused=True)
    n = len(M0)
    gM, gG, gB = dict(zip(M0, grads[:n])), dict(zip(G0, grads[n:2 * n])), dict(zip(B0, grads[2 * n:]))
    adam = lambda p, g: p - lr * g / (g.abs() + 1e-6)  # AdamW's first step: m_hat = g, v_hat = g^2  # noqa: E731
    expected = {}
    for s in guide.site_names:
        M1 = adam(M0[s].detach(), gM[s])
        G, std = G0[s].detach(), G0[s].detach() ** 2
        dkl_dM = M1 / beta**2                      # d/dM of KL(N(M, s^2) || N(0, beta^2))
        dkl_dG = 2 * G * (-1 / std + std / beta**2)  # chain rule through s = G^2
        expected[s] = (M1 - kllr * pi * dkl_dM, G - kllr * (gG[s] + pi * dkl_dG), adam(B0[s].detach(), gB[s]))

    objective = ParityObjective(model, guide, total_steps=10, kl=kl, lr=lr, kllr=kllr, warmup_ratio=0.0, flipout=None)
    stats = objective.step(batch, 0)
    assert stats["kl_weight"] == pytest.approx(pi)
    for s in guide.site_names:
        M2, G2, B2 = expected[s]
        torch.testing.assert_close(guide.loc(s).detach(), M2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(deep_root(guide, s).detach(), G2, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(model.adapters[s].lora_B.detach(), B2, rtol=1e-4, atol=1e-6)


def deep_root(guide, site):
    from blob_pyro.guides.base import deep_getattr

    return deep_getattr(guide.std_roots, site)


@pytest.mark.parametrize("guide_cls,elbo,flipout", [
    (BLoBGuide, "trace", None), (BLoBGuide, "meanfield", "token"), (MLEGuide, "trace", None),
])
def test_svi_run_learns_a_synthetic_task(guide_cls, elbo, flipout):
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = guide_cls(model)
    train = synthetic_batch(48, seed=0)
    before = accuracy_of(model, guide, train)
    objective = ELBOObjective(
        model, guide, num_data=48, total_steps=150, kl=KLWeighting("constant", 12, 1e-3), lr=2e-2,
        elbo=elbo, flipout=flipout,
    )
    for step in range(150):
        objective.step(train, step)
    assert accuracy_of(model, guide, train) > max(0.8, before + 0.3)


def test_parity_run_learns_a_synthetic_task():
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model)
    train = synthetic_batch(48)
    objective = ParityObjective(model, guide, total_steps=150, kl=KLWeighting("blob", 12), lr=2e-2, kllr=1e-2)
    for step in range(150):
        objective.step(train, step)
    assert accuracy_of(model, guide, train) > 0.8


def test_flipout_requires_a_guide_that_provides_the_mean():
    model = tiny_bayesian_llama()
    with pytest.raises(ValueError, match="flipout needs a guide"):
        ELBOObjective(model, MLEGuide(model), num_data=4, total_steps=2, kl=KLWeighting("constant", 1), lr=1e-3, flipout="token")


def test_nan_loss_raises_a_clear_error():
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model)
    batch = synthetic_batch(4)
    objective = ELBOObjective(model, guide, num_data=4, total_steps=2, kl=KLWeighting("constant", 1), lr=1e-3)
    with torch.no_grad():
        next(iter(model.adapters.values())).lora_B.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="left unchanged; lower --lr"):
        objective.step(batch, 0)


def test_a_plain_torch_optimiser_drives_the_same_loss():
    """Researchers may skip SVI: the ELBO's differentiable loss + any torch optimiser trains the same params."""
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = BLoBGuide(model)
    batch = synthetic_batch(32)
    params = list(guide.parameters()) + [layer.lora_B for layer in model.adapters.values()]
    optimiser = torch.optim.Adam(params, lr=2e-2)
    elbo = pyro.infer.TraceMeanField_ELBO()
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"], batch["indices"])
    for _ in range(100):
        optimiser.zero_grad()
        loss = elbo.differentiable_loss(model, guide, *args, num_data=32, kl_weight=1e-3)
        loss.backward()
        optimiser.step()
    assert accuracy_of(model, guide, batch) > 0.8
    assert not any(p.requires_grad for n, p in model.network.named_parameters() if "lora_B" not in n)


def test_bf16_base_with_fp32_adapters():
    from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
    from tests.helpers import ANSWER_TOKENS, tiny_llama

    network = tiny_llama().to(torch.bfloat16)
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4, adapter_dtype=torch.float32)
    model = BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS))
    guide = BLoBGuide(model)
    batch = synthetic_batch(8)
    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    layer = next(iter(model.adapters.values()))
    assert layer.lora_B.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in guide.parameters())


@pytest.mark.parametrize("guide_cls,elbo", [(BLoBGuide, "meanfield"), (BLoBGuide, "trace"), (MLEGuide, "trace")])
def test_elbo_step_logs_the_nll_and_the_kl_apart(guide_cls, elbo):
    """loss = N * nll + w * kl exactly; with the closed-form ELBO the logged KL is the closed-form KL of the
    parameters the step started from, and the logged NLL is the cross-entropy of the drawn network."""
    from blob_pyro.objectives import closed_form_kl

    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = guide_cls(model)
    batch = synthetic_batch(6)
    num_data, weight = 60, 0.3
    objective = ELBOObjective(model, guide, num_data=num_data, total_steps=5, kl=KLWeighting("constant", 1, weight),
                              lr=1e-3, elbo=elbo, max_grad_norm=None)
    kl_before = float(closed_form_kl(model, guide)) if guide_cls is BLoBGuide else None
    stats = objective.step(batch, 0)
    if guide_cls is MLEGuide:  # plain LoRA: no prior term
        assert stats["kl_weight"] == 0.0 and stats["kl"] is None
        assert stats["loss"] == pytest.approx(num_data * stats["nll"], rel=1e-5)
        return
    assert stats["loss"] == pytest.approx(num_data * stats["nll"] + weight * stats["kl"], rel=1e-5)
    if elbo == "meanfield":
        assert stats["kl"] == pytest.approx(kl_before, rel=1e-4)
    else:  # one-draw Monte Carlo estimate: same sign of magnitude, not equal
        assert stats["kl"] != pytest.approx(kl_before, rel=1e-4)
    assert 0.5 < stats["nll"] < 5.0  # a per-example NLL, not the plate-scaled sum


def test_elbo_logged_nll_is_the_cross_entropy_of_the_drawn_network():
    torch.manual_seed(0)
    model = tiny_bayesian_llama()
    guide = MLEGuide(model)
    batch = synthetic_batch(6)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(
            model.class_logits(batch["input_ids"], batch["attention_mask"]), batch["labels"]))
    objective = ELBOObjective(model, guide, num_data=6, total_steps=5, kl=KLWeighting("constant", 1), lr=1e-3)
    assert objective.step(batch, 0)["nll"] == pytest.approx(expected, rel=1e-5)
