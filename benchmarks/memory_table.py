"""GPU memory of LoRA and BLoB fine-tuning of 7B/8B Llama models, computed from the model shapes.

    python benchmarks/memory_table.py            # the README table (Llama-2-7B, Llama-3-8B)

Nothing is measured here: every number is a formula of the config (hidden size h, intermediate size i,
layers L, heads, key/value heads, vocabulary V), the adapter (rank r on q_proj, v_proj, lm_head, the
BLoB paper's Llama setting) and the batch (4 x 300 tokens). ``tests/test_memory_table.py`` checks the
parameter counts against instantiated models and the per-layer activation formula against the bytes
autograd actually saves (``saved_tensors_hooks``) in a small Llama.

Assumptions (the script's, stated once):

* Base weights: bf16 (2 bytes), or 4-bit NF4 with double quantization on every decoder-layer linear
  (0.5 byte + one 8-bit absmax per 64 weights + one fp32 absmax per 256 blocks); embeddings, norms and
  lm_head stay bf16 (transformers keeps lm_head unquantized).
* Adapters, guide and optimiser in fp32. LoRA: A, B. BLoB: M, G (std G^2), B, plus the drawn A. Every
  trainable number costs 16 bytes (value, gradient, AdamW's two moments; BLoB's ELBO objective trains
  M, G and B with AdamW); BLoB's draw of A adds 8 bytes (value and gradient) per number.
* Activations: what autograd keeps for the backward pass of a transformers Llama decoder layer with
  frozen base weights (a frozen matmul keeps nothing), SDPA/flash attention (no T x T matrix; queries,
  keys, values, output and the log-sum-exp are kept), keys and values expanded to all heads (transformers
  repeats them when an attention mask is passed). Per token and layer: RMSNorm inputs upcast to fp32
  (2 x 4h) and their rsqrt, the adapters' fp32 input copy (4h) and rank-r outputs, q/k/v/attention output
  in bf16 (2 x 4h), SwiGLU's gate, SiLU and up outputs in bf16 (2 x 3i). BLoB with token flipout (the
  official recipe) keeps per adapter the fp32 input sign pattern and signed input (2 x 4 in) and a few
  rank-r tensors more. The head reads one position (answer-letter scoring): its logits (b x V) are
  counted in bf16 and fp32.
* Gradient checkpointing (per decoder layer, as ``gradient_checkpointing_enable``): the L layer inputs
  (bf16, h per token) are kept, plus one layer's activations while it is recomputed.
* Not counted: the CUDA context and the allocator's caching/fragmentation (add ~1-2 GB in practice),
  temporary buffers inside kernels, the per-layer constants (rotary cos/sin tables, the A draws' saved
  copies).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024 ** 3


@dataclass(frozen=True)
class LlamaShape:
    """The config fields that size a Llama model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def config(self, *, max_position_embeddings: int = 2048):
        """A ``transformers.LlamaConfig`` of this shape (for random models of it)."""
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           max_position_embeddings=max_position_embeddings, tie_word_embeddings=self.tied_embeddings)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{name: (in_features, out_features)}`` of one decoder layer's linears."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


LLAMA2_7B = LlamaShape("Llama-2-7B", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA3_8B = LlamaShape("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)

TARGETS = ("q_proj", "v_proj", "lm_head")


def layer_linear_params(shape: LlamaShape) -> int:
    """Weights of one decoder layer's linears (Llama linears have no bias)."""
    return sum(n_in * n_out for n_in, n_out in shape.linear_shapes().values())


def parameter_count(shape: LlamaShape) -> dict[str, int]:
    """``{"linear": decoder-layer linears, "other": embeddings, norms, lm_head}``; their sum is
    ``sum(p.numel() for p in LlamaForCausalLM(config).parameters())``."""
    linear = shape.layers * layer_linear_params(shape)
    norms = shape.layers * 2 * shape.hidden + shape.hidden
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)  # embed_tokens (+ lm_head)
    return {"linear": linear, "other": norms + embeddings}


NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 per 256 blocks


def base_bytes(shape: LlamaShape, quantization: str) -> float:
    """Bytes of the frozen base: ``"bf16"`` or ``"4bit"`` (NF4 + double quantization on the decoder linears)."""
    count = parameter_count(shape)
    if quantization == "bf16":
        return 2.0 * (count["linear"] + count["other"])
    if quantization == "4bit":
        return NF4_BYTES_PER_WEIGHT * count["linear"] + 2.0 * count["other"]
    raise ValueError(f"quantization must be 'bf16' or '4bit', got {quantization!r}")


def adapted_shapes(shape: LlamaShape, targets=TARGETS) -> list[tuple[int, int]]:
    """``(in, out)`` of every adapted linear in the model."""
    per_layer = [dims for name, dims in shape.linear_shapes().items() if name in targets]
    shapes = per_layer * shape.layers
    if "lm_head" in targets:
        shapes.append((shape.hidden, shape.vocab))
    return shapes


def trainable_count(shape: LlamaShape, method: str, *, rank: int = 8, targets=TARGETS) -> int:
    """Trainable numbers: LoRA ``r (in + out)`` per adapter; BLoB ``r (2 in + out)`` (M, G and B)."""
    factor = {"lora": 1, "blob": 2}[method]
    return sum(rank * (factor * n_in + n_out) for n_in, n_out in adapted_shapes(shape, targets))


def adapter_bytes(shape: LlamaShape, method: str, *, rank: int = 8, targets=TARGETS) -> float:
    """fp32 value + gradient + AdamW moments (16 bytes) per trainable number; BLoB's draw of A: 8 bytes."""
    total = 16.0 * trainable_count(shape, method, rank=rank, targets=targets)
    if method == "blob":
        total += 8.0 * sum(rank * n_in for n_in, _ in adapted_shapes(shape, targets))
    return total


def layer_activation_bytes_per_token(
    shape: LlamaShape, method: str, *, rank: int = 8, act_bytes: int = 2, targets=TARGETS
) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring).

    :param act_bytes: bytes per element of the base's activations (2 for bf16, 4 for fp32).
    """
    h, i = shape.hidden, shape.intermediate
    adapted = [dims for name, dims in shape.linear_shapes().items() if name in targets]
    norms = 2 * (4 * h + 4)                              # two RMSNorm inputs in fp32 + rsqrt
    adapter_inputs = 4 * h if adapted else 0             # q_proj and v_proj read the same normed input
    adapter_outputs = 4 * rank * len(adapted)            # x A^T, rank r, fp32
    attention = act_bytes * 4 * h + 4 * shape.heads      # q, k, v (expanded), output; log-sum-exp fp32
    mlp = act_bytes * 3 * i                              # gate, SiLU(gate), up
    total = norms + adapter_inputs + adapter_outputs + attention + mlp
    if method == "blob_flipout":                         # per adapter: sign_in, x * sign_in, sign_out and r-sized terms
        total += sum(4 * 2 * n_in + 4 * 4 * rank for n_in, _ in adapted)
    return float(total)


def activation_bytes(
    shape: LlamaShape, method: str, *, batch: int, seq: int, checkpointing: bool, rank: int = 8, act_bytes: int = 2,
) -> float:
    """Peak activation bytes of one training step (batch x seq tokens)."""
    tokens = batch * seq
    per_layer = tokens * layer_activation_bytes_per_token(shape, method, rank=rank, act_bytes=act_bytes)
    head = batch * shape.vocab * (act_bytes + 4 + 4)    # last-position logits, fp32 copy and log-softmax
    if checkpointing:
        return shape.layers * tokens * act_bytes * shape.hidden + per_layer + head
    return shape.layers * per_layer + head


def memory_rows(shapes=(LLAMA2_7B, LLAMA3_8B), *, batch: int = 4, seq: int = 300, rank: int = 8) -> list[dict]:
    rows = []
    for shape in shapes:
        for quantization in ("bf16", "4bit"):
            for method, label in (("lora", "LoRA"), ("blob_flipout", "BLoB")):
                params = "blob" if method == "blob_flipout" else "lora"
                for checkpointing in (False, True):
                    base = base_bytes(shape, quantization)
                    adapters = adapter_bytes(shape, params, rank=rank)
                    acts = activation_bytes(shape, method, batch=batch, seq=seq, checkpointing=checkpointing, rank=rank)
                    rows.append({"model": shape.name, "base": quantization, "method": label, "checkpointing": checkpointing,
                                 "base_gib": base / GiB, "adapter_gib": adapters / GiB, "activation_gib": acts / GiB,
                                 "total_gib": (base + adapters + acts) / GiB})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | base | method | grad. ckpt | base weights | adapters + optimiser | activations | total |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['base']} | {r['method']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['base_gib']:.2f} GiB | {r['adapter_gib']:.2f} GiB | {r['activation_gib']:.2f} GiB | "
                     f"**{r['total_gib']:.1f} GiB** |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    table = markdown_table(memory_rows(batch=args.batch_size, seq=args.seq_len, rank=args.rank))
    print(f"Batch {args.batch_size} x {args.seq_len} tokens, rank {args.rank} on {', '.join(TARGETS)}; "
          "BLoB = ELBO objective with token flipout\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
