"""4-bit and 8-bit bases through bitsandbytes: bayesianize wraps Linear4bit / Linear8bitLt like nn.Linear.

bitsandbytes >= 0.48 runs both layer kinds on CPU, so everything here runs without a GPU; the CUDA
kernels themselves are covered by ``benchmarks/gpu_check.py`` and the CUDA-only test at the end.
"""

import json

import pytest
import torch
from torch import nn

from blob_pyro.config import TrainConfig
from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize, find_adapters
from blob_pyro.models.adapt import linear_layer_names
from blob_pyro.objectives import ELBOObjective, KLWeighting
from blob_pyro.quantization import bitsandbytes_config, is_quantized
from tests.conftest import write_bigbench_task
from tests.helpers import ANSWER_TOKENS, synthetic_batch, tiny_llama

needs_bnb = pytest.mark.skipif(
    __import__("importlib").util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes is not installed (pip install 'blob-pyro[quant]')",
)


def quantize(linear: nn.Linear, kind: str) -> nn.Linear:
    """A bitsandbytes copy of ``linear`` (quantized when moved to the CPU)."""
    import bitsandbytes as bnb

    if kind == "4bit":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def quantized_tiny_llama(kind: str):
    network = tiny_llama(hidden=64)
    for layer in network.model.layers:
        for name in ("q_proj", "v_proj"):
            setattr(layer.self_attn, name, quantize(getattr(layer.self_attn, name), kind))
    return network


@needs_bnb
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bayesianize_wraps_quantized_linears(kind):
    network = quantized_tiny_llama(kind)
    assert "model.layers.0.self_attn.q_proj" in linear_layer_names(network)  # bnb layers are nn.Linear subclasses
    names = bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4.0)
    assert len(names) == 5
    layer = find_adapters(network)["model.layers.0.self_attn.q_proj"]
    assert type(layer.base_layer).__name__ == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[kind]
    assert layer.lora_B.dtype == torch.float32 and layer.lora_B.shape == (64, 2)  # not the packed weight's shape
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    A, B = torch.randn(2, 64), torch.randn(64, 2)
    layer.set_transient(active_A=A, active_B=torch.zeros_like(B), flipout=None)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # B = 0: exactly the quantized base
    layer.set_transient(active_A=A, active_B=B)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * x @ A.T @ B.T)


@needs_bnb
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_training_step_on_a_quantized_base(kind):
    network = quantized_tiny_llama(kind)
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4.0)
    model = BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS))
    guide = make_guide("blob", model)
    objective = ELBOObjective(model, guide, num_data=8, total_steps=3, kl=KLWeighting("constant", 2), lr=1e-2, warmup_ratio=0.0)
    loss = objective.step(synthetic_batch(n=8), 0)
    assert torch.isfinite(torch.tensor(loss["loss"]))
    for layer in model.adapters.values():
        assert layer.lora_B.abs().sum() > 0, f"{layer.site_name}: B did not move"
    assert not any(p.requires_grad for name, p in network.named_parameters() if "base_layer" in name)


def test_bitsandbytes_config_for_each_kind():
    assert bitsandbytes_config("none") is None
    with pytest.raises(ValueError, match=r"must be one of \['none', '8bit', '4bit'\], got '3bit'"):
        bitsandbytes_config("3bit")


@needs_bnb
def test_bitsandbytes_config_values():
    eight = bitsandbytes_config("8bit")
    assert eight.load_in_8bit and not eight.load_in_4bit
    four = bitsandbytes_config("4bit", compute_dtype=torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"--base-quantization 4bit .*pip install 'blob-pyro\[quant\]'"):
        bitsandbytes_config("4bit")


def test_config_rejects_unknown_quantization():
    with pytest.raises(ValueError, match=r"--base-quantization must be one of \['none', '8bit', '4bit'\], got '2bit'"):
        TrainConfig(base_quantization="2bit")


@pytest.fixture(scope="module")
def causal_lm_dir_64(tmp_path_factory, tiny_bpe_tokenizer):
    """A random 2-layer Llama of hidden size 64 with its tokenizer: bitsandbytes' CPU 4-bit matmul needs
    in_features >= its block size (64); the shared tiny model has 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama_64")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_bpe_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tiny_bpe_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tiny_bpe_tokenizer.save_pretrained(directory)
    return directory


@needs_bnb
@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_train_cli_loads_the_base_through_bitsandbytes(tmp_path, causal_lm_dir_64, kind):
    tiny_causal_lm_dir = causal_lm_dir_64
    from blob_pyro.assembly import load_network
    from blob_pyro.train import main

    cfg = TrainConfig(model=str(tiny_causal_lm_dir), base_quantization=kind, device="cpu")
    network, _ = load_network(cfg, 3, dtype=torch.float32)
    assert is_quantized(network)
    assert type(network.model.layers[0].self_attn.q_proj).__name__ in ("Linear4bit", "Linear8bitLt")
    assert type(network.lm_head) is nn.Linear  # transformers keeps the output layer unquantized

    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main([
        "--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(tmp_path / "run"),
        "--num-train", "16", "--num-validation", "8", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2",
        "--rank", "2", "--device", "cpu", "--base-quantization", kind, "--no-zero-shot",
    ])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["base_quantization"] == kind
    assert metrics["samples_2"]["n_examples"] == 8


@needs_bnb
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the bitsandbytes CUDA kernels with a bf16 base "
                    "(run benchmarks/gpu_check.py on a GPU machine)")
def test_4bit_bf16_base_on_cuda(tmp_path, tiny_causal_lm_dir):
    from blob_pyro.train import main

    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main([
        "--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(tmp_path / "run"),
        "--num-train", "16", "--num-validation", "8", "--max-steps", "2", "--batch-size", "4", "--eval-samples", "2",
        "--rank", "2", "--device", "cuda", "--base-dtype", "bfloat16", "--base-quantization", "4bit", "--flipout", "token",
    ])
    assert metrics["samples_2"]["n_examples"] == 8


@needs_bnb
@pytest.mark.parametrize("shape", [(3, 64), (1, 1, 64), (2, 5, 64)])  # (1, 1, 64): bitsandbytes' single-vector gemv path
def test_gradient_through_a_4bit_base_is_the_dequantized_layers(shape):
    """The adapters of later layers learn through the frozen 4-bit base: its input gradient must be exact."""
    import bitsandbytes.functional as bnbf

    layer = quantize(nn.Linear(64, 32, bias=False), "4bit")
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    x = torch.randn(*shape, requires_grad=True)
    layer(x).pow(2).sum().backward()
    quantized_grad, x.grad = x.grad, None
    torch.nn.functional.linear(x, weight).pow(2).sum().backward()
    torch.testing.assert_close(quantized_grad, x.grad)
