"""Laplace-LoRA with a KFAC curvature: the factors equal the brute-force GGN where the Kronecker form is exact
(one example, one token), posterior draws have the covariance (n kron(G, A) + lambda I)^-1, the evidence's
log-determinant is the Kronecker one, and the guide plugs into the predictive."""

import pytest
import torch
from torch import nn

from blob_pyro.baselines.kfac import (
    KroneckerCurvature, KroneckerFactor, KroneckerGaussianGuide, KroneckerPosterior, kfac_curvature,
)
from blob_pyro.baselines.laplace import log_marginal_likelihood
from blob_pyro.models.lora import BayesianLoRALinear
from blob_pyro.models.priors import NormalPrior

from test_guides_registry import tiny_batch, tiny_model

D_IN, D_OUT, RANK, ALPHA = 5, 4, 2, 4.0  # non-square everywhere: a transposed factor cannot pass


def _layer(seed: int = 0):
    """A float64 LoRA layer around a random Linear (K = D_OUT classes), A and B random, requiring grad."""
    torch.manual_seed(seed)
    layer = BayesianLoRALinear(nn.Linear(D_IN, D_OUT).double(), name="lin", rank=RANK, alpha=ALPHA,
                               prior=NormalPrior(1.0), adapter_dtype=torch.float64).eval()
    A = torch.randn(RANK, D_IN, dtype=torch.float64, requires_grad=True)
    B = torch.randn(D_OUT, RANK, dtype=torch.float64, requires_grad=True)
    layer.set_transient(active_A=A, active_B=B)
    return layer, A, B


def _logits(layer, A, B, x):
    """The layer's logits written out independently of the module: ``(..., D_OUT)``."""
    base = layer.base_layer
    return x @ base.weight.T + base.bias + (ALPHA / RANK) * (x @ A.T) @ B.T


def _exact_ggn(log_probs_of, W: torch.Tensor, kind: str = "ggn", label: int = 0) -> torch.Tensor:
    """Brute force: ``J^T (diag p - p p^T) J`` (GGN) or ``grad grad^T`` of ``log p_label`` (EF), ``W.reshape(-1)`` order."""
    J = torch.autograd.functional.jacobian(log_probs_of, W.detach()).reshape(D_OUT, -1)  # d log p / d W: (K, P)
    if kind == "ef":
        return torch.outer(J[label], J[label])
    p = log_probs_of(W.detach()).exp()
    # d log p_c = (I - 1 p^T) d logits, so sum_c p_c (d log p_c)(d log p_c)^T = J_logits^T (diag p - p p^T) J_logits
    return J.T @ torch.diag(p) @ J


def _example(x, label=0, mask=None):
    example = {"x": x, "labels": torch.tensor([label])}
    if mask is not None:
        example["attention_mask"] = mask
    return example


def test_kfac_equals_the_exact_ggn_of_one_example_for_A_and_B():
    layer, A, B = _layer()
    x = torch.randn(1, D_IN, dtype=torch.float64)
    curvature = kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x, label=2)])
    ggn_A = _exact_ggn(lambda W: torch.log_softmax(_logits(layer, W, B, x)[0], -1), A)
    ggn_B = _exact_ggn(lambda W: torch.log_softmax(_logits(layer, A, W, x)[0], -1), B)
    assert curvature["lin.lora_A"].shape == (RANK, D_IN) and curvature["lin.lora_B"].shape == (D_OUT, RANK)
    assert torch.allclose(curvature["lin.lora_A"].dense(), ggn_A, atol=1e-10)
    assert torch.allclose(curvature["lin.lora_B"].dense(), ggn_B, atol=1e-10)
    # the empirical Fisher uses the observed label only
    ef = kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x, label=2)], kind="kfac_ef")
    ef_A = _exact_ggn(lambda W: torch.log_softmax(_logits(layer, W, B, x)[0], -1), A, kind="ef", label=2)
    assert torch.allclose(ef["lin.lora_A"].dense(), ef_A, atol=1e-10)
    assert not torch.allclose(ef_A, ggn_A, atol=1e-3)


def test_kfac_leaves_out_padded_tokens_and_averages_over_examples():
    layer, A, B = _layer(1)
    x = torch.randn(1, 2, D_IN, dtype=torch.float64)  # token 1 is padding: it does not reach the logits
    fn = lambda e: layer(e["x"])[:, 0]  # noqa: E731
    masked = kfac_curvature(fn, {"lin.lora_A": layer}, [_example(x, mask=torch.tensor([[1, 0]]))])
    ggn_A = _exact_ggn(lambda W: torch.log_softmax(_logits(layer, W, B, x[:, 0])[0], -1), A)
    assert torch.allclose(masked["lin.lora_A"].dense(), ggn_A, atol=1e-10)
    unmasked = kfac_curvature(fn, {"lin.lora_A": layer}, [_example(x)])
    assert not torch.allclose(unmasked["lin.lora_A"].dense(), ggn_A, atol=1e-3)
    # two real tokens, logits = y_1 + y_2: the output factor sums over tokens, the input factor averages
    summed = kfac_curvature(lambda e: layer(e["x"]).sum(1), {"lin.lora_A": layer}, [_example(x)])["lin.lora_B"]
    p = torch.softmax(_logits(layer, A, B, x).sum(1)[0], -1).detach()
    low = (x[0] @ A.T).detach()  # (tokens, r): the input of B
    G = 2 * (ALPHA / RANK) ** 2 * (torch.diag(p) - torch.outer(p, p))  # d log p_c / d y_t = e_c - p for each t
    assert torch.allclose(summed.dense(), torch.kron(G, low.T @ low / 2), atol=1e-10)
    # N examples: N kron(mean_n G_n, mean_n A_n), built from the one-example factors (exact, above)
    xs = [torch.randn(1, D_IN, dtype=torch.float64) for _ in range(3)]
    singles = [kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x)])["lin.lora_B"] for x in xs]
    joint = kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x) for x in xs])["lin.lora_B"]
    G = sum(s.G.dense() for s in singles) / 3
    A_in = sum(s.A.dense() for s in singles) / 3
    assert joint.num_data == 3 and torch.allclose(joint.dense(), 3 * torch.kron(G, A_in), atol=1e-10)
    assert torch.allclose(joint.with_num_data(30).dense(), 30 * torch.kron(G, A_in), atol=1e-9)


def test_large_factors_keep_their_diagonal():
    layer, A, B = _layer(2)
    x = torch.randn(1, D_IN, dtype=torch.float64)
    full = kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x)])["lin.lora_B"]
    small = kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x)], max_dense_dim=3)["lin.lora_B"]
    assert small.G.vectors is None and small.A.vectors is not None  # G is D_OUT = 4 > 3, A is RANK = 2
    expected = torch.kron(torch.diag(torch.diagonal(full.G.dense())), full.A.dense())
    assert torch.allclose(small.dense(), expected, atol=1e-10)


def _random_curvature(out=4, d_in=3, n=5.0, diagonal_G=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(out, out, generator=g, dtype=torch.float64)
    N = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    G = torch.rand(out, generator=g, dtype=torch.float64) + 0.1 if diagonal_G else M @ M.T / out
    A = N @ N.T / d_in
    curvature = KroneckerCurvature(KroneckerFactor.of(G), KroneckerFactor.of(A), num_data=n)
    dense_G = torch.diag(G) if diagonal_G else G
    return curvature, dense_G, A


@pytest.mark.parametrize("diagonal_G", [False, True])
def test_kfac_draws_have_the_posterior_covariance(diagonal_G):
    n, lam = 5.0, 0.7
    curvature, G, A = _random_curvature(n=n, diagonal_G=diagonal_G)
    loc = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 1.0], [3.0, 1.0, -1.0], [0.0, 0.0, 2.0]])
    posterior = KroneckerPosterior(loc, curvature, lam)
    expected = torch.linalg.inv(n * torch.kron(G, A) + lam * torch.eye(12, dtype=torch.float64))  # row-major vec
    assert torch.allclose(posterior.covariance(), expected, atol=1e-12)
    torch.manual_seed(0)
    draws = torch.stack([posterior.sample() for _ in range(20000)]).double().reshape(20000, -1)
    assert draws.dtype == torch.float64 and torch.allclose(draws.mean(0), loc.reshape(-1).double(), atol=0.03)
    empirical = torch.cov(draws.T)
    assert (empirical - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.allclose(posterior.marginal_std().reshape(-1) ** 2, torch.diagonal(expected), atol=1e-12)
    grad = torch.randn(4, 3, dtype=torch.float64)
    assert torch.allclose(posterior.quadratic_form(grad), grad.reshape(-1) @ expected @ grad.reshape(-1), atol=1e-12)


def test_kronecker_evidence_uses_the_log_determinant_of_the_kronecker_precision():
    n, lam = 4.0, 1.3
    curvature, G, A = _random_curvature(n=n, seed=3)
    theta = torch.randn(12, dtype=torch.float64)
    precision = n * torch.kron(G, A) + lam * torch.eye(12, dtype=torch.float64)
    direct = -0.5 * lam * theta @ theta + 6.0 * torch.log(torch.tensor(lam, dtype=torch.float64)) - 0.5 * torch.logdet(precision)
    via_eigenvalues = log_marginal_likelihood(0.0, theta, curvature.eigenvalues().reshape(-1), lam)[0]
    assert float(via_eigenvalues) == pytest.approx(float(direct), rel=1e-10)


def test_kronecker_guide_draws_correlated_A_and_B_for_the_predictive():
    from blob_pyro.evaluation.predictive import sample_probs

    from blob_pyro.models import with_random_B

    model = with_random_B(tiny_model())
    posteriors = {}
    for seed, (site, layer) in enumerate(model.adapters.items()):
        for name, loc in ((site, torch.zeros(2, 16)), (layer.site_name_B, torch.zeros_like(layer.lora_B))):
            out, d_in = loc.shape
            curvature = KroneckerCurvature(KroneckerFactor.of(torch.eye(out, dtype=torch.float64)),
                                           KroneckerFactor.of(torch.eye(d_in, dtype=torch.float64)), num_data=1.0)
            posteriors[name] = KroneckerPosterior(loc, curvature, 99.0)  # std 1 / sqrt(1 + 99) = 0.1
    guide = KroneckerGaussianGuide(model, posteriors)
    assert all(layer.bayesian_B for layer in model.adapters.values())
    assert all(torch.allclose(s, torch.full_like(s, 0.1)) for s in guide.scales.values())
    draw = guide()
    assert all(draw[k].shape == p.loc.shape and draw[k].dtype == torch.float32 for k, p in posteriors.items())
    batches = [{k: v for k, v in tiny_batch().items() if k in ("input_ids", "attention_mask")}]
    draws = sample_probs(model, guide, batches, num_samples=2)
    assert draws.shape == (2, 4, 3) and not torch.allclose(draws[0], draws[1])


def test_kfac_rejects_bad_inputs_clearly():
    layer, A, B = _layer()
    x = torch.randn(1, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be 'kfac' or 'kfac_ef'"):
        kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x)], kind="diag")
    with pytest.raises(ValueError, match="no examples"):
        kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [])
    layer._modules["lora_dropout"] = nn.Dropout(0.5).train()
    with pytest.raises(ValueError, match="call model.eval"):
        kfac_curvature(lambda e: layer(e["x"]), {"lin.lora_A": layer}, [_example(x)])
    with pytest.raises(ValueError, match="does not match Kronecker factors"):
        KroneckerPosterior(torch.zeros(3, 4), _random_curvature()[0], 1.0)
    from blob_pyro.config import TrainConfig

    assert TrainConfig(method="laplace", guide="map", laplace_hessian="kfac").laplace_hessian == "kfac"


def test_kfac_probit_runs_from_the_cli(tmp_path, tiny_causal_lm_dir):
    """``--laplace-predictive probit`` uses the Kronecker covariance (``J Sigma J^T`` in the eigenbasis)."""
    import json

    from blob_pyro.train import main
    from tests.conftest import write_bigbench_task
    from test_baselines import _args

    task = write_bigbench_task(tmp_path / "task.json")
    out = tmp_path / "run"
    metrics = main(_args(tiny_causal_lm_dir, task, out, "--method", "laplace", "--guide", "mle", "--laplace-hessian", "kfac",
                         "--laplace-predictive", "probit"))
    info = json.loads((out / "run.json").read_text())
    assert metrics["probit"]["n_examples"] == 8 and info["hessian"] == "kfac" and info["mean_posterior_std"] > 0
