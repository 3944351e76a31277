"""A bf16 base with fp32 adapters and guide: every Bayesian quantity (A, its draws, M, G, B, the KL and
the flipout noise A - M) stays fp32, only the frozen base computes in bf16; training steps run."""

import json

import pyro
import pytest
import torch
from pyro import poutine

from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize
from blob_pyro.objectives import ELBOObjective, KLWeighting, ParityObjective, closed_form_kl
from blob_pyro.train import main
from tests.conftest import write_bigbench_task
from tests.helpers import ANSWER_TOKENS, synthetic_batch, tiny_llama

ARGS_KEYS = ("input_ids", "attention_mask", "labels", "indices")


def bf16_model():
    network = tiny_llama().to(torch.bfloat16)
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4.0)
    return BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS))


def test_bf16_base_keeps_adapters_draws_and_kl_in_fp32():
    model = bf16_model()
    guide = make_guide("blob", model)
    base_weights = {p.dtype for name, p in model.network.named_parameters() if "lora" not in name}
    assert base_weights == {torch.bfloat16}
    assert {layer.lora_B.dtype for layer in model.adapters.values()} == {torch.float32}
    assert {p.dtype for p in guide.parameters()} == {torch.float32}  # M and G

    batch = synthetic_batch(n=4)
    args = tuple(batch[k] for k in ARGS_KEYS)
    guide_trace = poutine.trace(guide).get_trace(*args, num_data=4, flipout="token")
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, num_data=4, flipout="token")
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    for site in model.adapters:
        assert guide_trace.nodes[site]["value"].dtype == torch.float32            # the draw of A
        assert model_trace.nodes[site]["log_prob"].dtype == torch.float32          # log p(A): the KL's prior side
        assert guide_trace.nodes[site]["log_prob"].dtype == torch.float32          # log q(A)
        layer = model.adapters[site]
        assert layer.active_A.dtype == layer.flipout_loc.dtype == torch.float32    # A - M is formed in fp32
    assert closed_form_kl(model, guide, dtype=torch.float32).dtype == torch.float32
    logits = model_trace.nodes["_RETURN"]["value"]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_bf16_adapter_update_is_computed_in_fp32():
    """The adapter's output is base(x) + scaling * B A x with the low-rank product in fp32, cast once."""
    model = bf16_model()
    layer = model.adapters["model.layers.0.self_attn.q_proj.lora_A"]
    torch.manual_seed(0)
    A = torch.randn(layer.rank, layer.in_features)
    B = torch.randn(layer.out_features, layer.rank)
    layer.set_transient(active_A=A, active_B=B, flipout=None)
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = layer.base_layer(x) + (layer.scaling * x.float() @ A.T @ B.T).to(torch.bfloat16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["elbo", "parity"])
def test_bf16_training_step_updates_fp32_parameters(objective):
    model = bf16_model()
    guide = make_guide("blob", model)
    batch = synthetic_batch(n=8)
    kl = KLWeighting("constant", cycle_length=2)
    if objective == "elbo":
        step = ELBOObjective(model, guide, num_data=8, total_steps=4, kl=kl, lr=1e-2, flipout="token", warmup_ratio=0.0)
    else:
        step = ParityObjective(model, guide, total_steps=4, kl=kl, lr=1e-2, warmup_ratio=0.0)
    before = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    before.update({name: p.detach().clone() for name, p in guide.named_parameters()})
    stats = [step.step(batch, i) for i in range(2)]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in stats)
    for layer in model.adapters.values():
        assert layer.lora_B.dtype == torch.float32 and torch.isfinite(layer.lora_B).all()
        assert layer.lora_B.abs().sum() > 0  # B left zero: no update reached the adapters
    for name, p in guide.named_parameters():
        assert p.dtype == torch.float32
    changed = [name for name, p in guide.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed, "no guide parameter changed in two bf16 steps"


def test_train_cli_with_bf16_base_on_cpu(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main([
        "--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(tmp_path / "run"),
        "--num-train", "16", "--num-validation", "8", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2",
        "--rank", "2", "--base-dtype", "bfloat16", "--device", "cpu", "--flipout", "token", "--no-zero-shot",
    ])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["base_dtype"] == "bfloat16"
    assert metrics["samples_2"]["n_examples"] == 8
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "run" / "guide.safetensors").values()} == {torch.float32}
