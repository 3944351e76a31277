from pathlib import Path

import pyro
import pytest
import torch

SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"  # ../shared beside the repository
BIGBENCH_DIR = SHARED_DIR / "data" / "bigbench"  # the shared BIG-bench task files

# Unit tests use tiny models: one thread avoids oversubscribing the (shared, 2-core) CPU.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_pyro_state():
    """Every test starts with an empty Pyro param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


# --- Tokenizer fixtures for the data tests (no downloads, ~0.1 s) -------------------------------

TINY_BPE_CORPUS = [
    "Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do before this?",
    "Is it common to see frost during some college commencements? Yes No true false correct incorrect",
    "Question: which one?\nA. Make a new plan\nB. Go home and see Riley\nC. Find somewhere to go\nAnswer: C",
    " A B C D E F G H I J Answer: A. B. C. D. E. F. G.",
]


@pytest.fixture(scope="session")
def tiny_bpe_tokenizer():
    """GPT-2-style byte-level BPE trained in the test, with a BOS token and single-token " A".." J"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TINY_BPE_CORPUS * 20, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", pad_token="<pad>")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """ByT5's byte tokenizer: one token per byte, so " A" is two tokens; appends EOS."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


# --- A tiny saved causal LM and BIG-bench task for CLI tests (no downloads, < 1 s) -------------


def write_bigbench_task(path, *, num_examples: int = 40, num_choices: int = 3, seed: int = 0):
    """A synthetic BIG-bench multiple-choice file; the question names the colour of the right choice."""
    import json
    import random

    rng = random.Random(seed)
    colours = ["red", "blue", "green", "black", "white", "pink", "grey"][:num_choices]
    examples = []
    for _ in range(num_examples):
        answer = rng.randrange(num_choices)
        choices = {f"the {c} one": int(i == answer) for i, c in enumerate(colours)}
        examples.append({"input": f"Which one is {colours[answer]}?", "target_scores": choices})
    path.write_text(json.dumps({"name": "colours", "canary": "synthetic test data", "examples": examples}))
    return path


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_bpe_tokenizer):
    """A random 2-layer Llama saved with its tokenizer, usable as ``--model <dir>``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tiny_bpe_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tiny_bpe_tokenizer.save_pretrained(directory)
    return directory
