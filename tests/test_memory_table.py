"""benchmarks/memory_table.py: its formulas against instantiated models and autograd's saved tensors."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from blob_pyro.guides import make_guide
from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_table.py"
_spec = importlib.util.spec_from_file_location("memory_table", _path)
memory_table = importlib.util.module_from_spec(_spec)
sys.modules["memory_table"] = memory_table  # dataclasses look their module up there
_spec.loader.exec_module(memory_table)

SMALL = memory_table.LlamaShape("small", hidden=64, intermediate=96, layers=3, heads=4, kv_heads=2, vocab=50)


def small_llama(shape=SMALL, attn="sdpa"):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, tie_word_embeddings=False, attn_implementation=attn,
    ))


def test_parameter_count_matches_an_instantiated_model():
    network = small_llama()
    count = memory_table.parameter_count(SMALL)
    assert count["linear"] + count["other"] == sum(p.numel() for p in network.parameters())
    linear = sum(m.weight.numel() for name, m in network.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in name)
    assert count["linear"] == linear
    assert memory_table.base_bytes(SMALL, "bf16") == 2 * sum(p.numel() for p in network.parameters())


def test_published_sizes():
    """Llama-2-7B has 6.74e9 parameters, Llama-3-8B 8.03e9 (their model cards)."""
    assert round(sum(memory_table.parameter_count(memory_table.LLAMA2_7B).values()) / 1e9, 2) == 6.74
    assert round(sum(memory_table.parameter_count(memory_table.LLAMA3_8B).values()) / 1e9, 2) == 8.03


@pytest.mark.parametrize("method", ["lora", "blob"])
def test_trainable_count_matches_bayesianize_and_the_guide(method):
    network = small_llama()
    bayesianize(network, list(memory_table.TARGETS), rank=4, alpha=8.0)
    model = BayesianLoRAModel(network, AnswerTokenHead([1, 2]))
    guide = make_guide("blob" if method == "blob" else "mle", model)
    b_numel = sum(layer.lora_B.numel() for layer in model.adapters.values())
    assert memory_table.trainable_count(SMALL, method, rank=4) == b_numel + sum(p.numel() for p in guide.parameters())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_nf4_bytes_per_weight_match_bitsandbytes():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compress_statistics=True, quant_type="nf4").to("cpu")
    state = layer.weight.quant_state
    stored = layer.weight.numel() * layer.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
    assert stored / (1024 * 1024) == pytest.approx(memory_table.NF4_BYTES_PER_WEIGHT, rel=1e-3)


def _saved_bytes_of_layer(network, layer_index, ids):
    """Bytes of the distinct non-parameter storages autograd saves inside one decoder layer."""
    params = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = max(storages.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    layer = network.model.layers[layer_index]
    layer.register_forward_pre_hook(lambda *a: hooks.__enter__())
    layer.register_forward_hook(lambda *a: hooks.__exit__(None, None, None))
    network(input_ids=ids, logits_to_keep=1)
    return sum(storages.values())


@pytest.mark.parametrize("method", ["lora", "blob_flipout"])
def test_layer_activation_formula_matches_autograds_saved_tensors(method):
    """fp32, SDPA, keys/values as wide as queries (heads == kv heads, so nothing depends on GQA expansion).
    The formula leaves out per-layer constants (rotary tables, the saved A), a few percent at 80 tokens."""
    shape = memory_table.LlamaShape("mha", hidden=64, intermediate=96, layers=3, heads=4, kv_heads=4, vocab=50)
    network = small_llama(shape)
    bayesianize(network, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    torch.manual_seed(1)
    for module in network.modules():
        if hasattr(module, "set_transient"):
            A = torch.randn(module.rank, module.in_features, requires_grad=True)
            M = torch.randn(module.rank, module.in_features, requires_grad=True)
            module.set_transient(active_A=A, active_B=module.lora_B, flipout="token" if method == "blob_flipout" else None,
                                 flipout_loc=M)
    ids = torch.randint(0, shape.vocab, (2, 40))
    measured = _saved_bytes_of_layer(network, 1, ids) / ids.numel()
    formula = memory_table.layer_activation_bytes_per_token(shape, method, rank=4, act_bytes=4, targets=("q_proj", "v_proj"))
    assert formula == pytest.approx(measured, rel=0.05)


def test_table_lists_every_combination():
    rows = memory_table.memory_rows()
    assert len(rows) == 2 * 2 * 2 * 2
    for r in rows:
        assert r["total_gib"] == pytest.approx(r["base_gib"] + r["adapter_gib"] + r["activation_gib"])
    bf16_lora = next(r for r in rows if r["model"] == "Llama-2-7B" and r["base"] == "bf16" and r["method"] == "LoRA"
                     and not r["checkpointing"])
    assert bf16_lora["base_gib"] == pytest.approx(2 * 6_738_415_616 / 1024 ** 3)
