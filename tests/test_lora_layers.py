"""Adapter layers and bayesianize: site names, exact base behaviour at B = 0, frozen base, errors."""

import pyro
import pytest
import torch
from pyro import poutine

from blob_pyro.models import (
    BayesianLoRALinear, BayesianLoRAModel, LaplacePrior, NormalPrior, SequenceClassificationHead, bayesianize,
    linear_layer_names,
)
from blob_pyro.assembly import enable_activation_checkpointing
from tests.helpers import synthetic_batch, tiny_bayesian_llama, tiny_bert, tiny_llama

TWO_BLOCK_SITES = [
    "model.layers.0.self_attn.q_proj.lora_A",
    "model.layers.0.self_attn.v_proj.lora_A",
    "model.layers.1.self_attn.q_proj.lora_A",
    "model.layers.1.self_attn.v_proj.lora_A",
    "lm_head.lora_A",
]


def test_site_names_on_two_block_model_are_full_module_paths():
    model = tiny_bayesian_llama()
    batch = synthetic_batch(4)
    trace = poutine.trace(model).get_trace(batch["input_ids"], batch["attention_mask"], batch["labels"])
    sample_sites = [n for n, s in trace.nodes.items() if s["type"] == "sample" and n.endswith("lora_A")]
    assert sample_sites == TWO_BLOCK_SITES
    assert list(model.adapters) == TWO_BLOCK_SITES


def test_zero_B_gives_exactly_the_base_logits():
    base = tiny_llama()
    adapted = tiny_llama()
    bayesianize(adapted, ["q_proj", "v_proj", "lm_head"], rank=4, alpha=8)
    ids = torch.randint(0, 40, (3, 7))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        got = adapted(input_ids=ids).logits  # A drawn from the prior, B = 0
    assert torch.equal(got, expected)


def test_update_is_scaling_times_B_A_x():
    linear = torch.nn.Linear(5, 3)
    layer = BayesianLoRALinear(linear, name="layer", rank=2, alpha=6.0, prior=NormalPrior())
    A, B, x = torch.randn(2, 5), torch.randn(3, 2), torch.randn(4, 5)
    with torch.no_grad():
        layer.lora_B.copy_(B)
    layer.set_transient(active_A=A)
    expected = linear(x) + 3.0 * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_base_weights_frozen_and_not_in_the_param_store():
    model = tiny_bayesian_llama()
    guide = pyro.infer.autoguide.AutoNormal(model)  # any guide: the model's params must be only lora_B
    batch = synthetic_batch(4)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
    frozen_before = {n: p.clone() for n, p in model.network.named_parameters() if "lora_B" not in n}
    svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"])
    svi.step(batch["input_ids"], batch["attention_mask"], batch["labels"])
    model_params = [n for n in pyro.get_param_store().keys() if not n.startswith("AutoNormal")]
    assert sorted(model_params) == sorted(s.replace("lora_A", "lora_B") for s in TWO_BLOCK_SITES)
    for name, p in model.network.named_parameters():
        if "lora_B" in name:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p, frozen_before[name]), name


def test_bert_style_query_value_classifier():
    network = tiny_bert(num_labels=3)
    names = bayesianize(network, ["query", "value", "classifier"], rank=2, alpha=4)
    assert names[-1] == "classifier" and sum("query" in n for n in names) == 2
    model = BayesianLoRAModel(network, SequenceClassificationHead(3))
    batch = synthetic_batch(4)
    trace = poutine.trace(model).get_trace(batch["input_ids"], batch["attention_mask"], batch["labels"] % 3)
    assert "bert.encoder.layer.0.attention.self.query.lora_A" in trace.nodes
    assert trace.nodes["probs"]["value"].shape == (4, 3)


def test_regex_target_modules_match_full_names():
    network = tiny_llama()
    names = bayesianize(network, r"model\.layers\.1\.self_attn\.(q|k)_proj", rank=2, alpha=4)
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]


def test_unknown_target_module_lists_available_layers():
    network = tiny_llama()
    with pytest.raises(ValueError, match=r"matched no nn.Linear layer.*'q_proj'.*'v_proj'"):
        bayesianize(network, ["query_proj"], rank=2, alpha=4)
    assert "model.layers.0.self_attn.q_proj" in linear_layer_names(network)


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        bayesianize(tiny_llama(), ["q_proj"], rank=0, alpha=4)
    with pytest.raises(ValueError, match="dropout must be in"):
        bayesianize(tiny_llama(), ["q_proj"], rank=2, alpha=4, dropout=1.5)
    with pytest.raises(ValueError, match="finite positive"):
        NormalPrior(scale=-1.0)


def test_prior_follows_device_and_dtype():
    network = tiny_llama()
    bayesianize(network, ["q_proj"], rank=2, alpha=4, prior=LaplacePrior(scale=0.3), adapter_dtype=torch.float64)
    layer = network.model.layers[0].self_attn.q_proj
    d = layer.prior.site_distribution(layer._zeros_like_A())
    assert d.base_dist.loc.dtype == torch.float64 and d.event_shape == (2, 16)
    assert torch.allclose(d.base_dist.scale, torch.full((2, 16), 0.3, dtype=torch.float64))


def test_gradients_equal_with_and_without_gradient_checkpointing():
    from blob_pyro.guides import BLoBGuide

    grads = []
    for checkpointing in (False, True):
        pyro.clear_param_store()
        model = tiny_bayesian_llama()
        guide = BLoBGuide(model)
        if checkpointing:
            enable_activation_checkpointing(model.network)  # what --gradient-checkpointing calls
        model.network.train()
        with torch.no_grad():
            for layer in model.adapters.values():
                layer.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        batch = synthetic_batch(4)
        pyro.set_rng_seed(3)
        loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        grads.append([p.grad.clone() for p in guide.parameters()] + [layer.lora_B.grad.clone() for layer in model.adapters.values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
