"""Choice-likelihood ("cloze") scoring: encoding, batching and the head against a direct computation."""

import json

import pytest
import torch

from blob_pyro.data import MultipleChoiceExample
from blob_pyro.data.choice_scoring import encode_choice_continuations, iterate_choice_batches
from blob_pyro.models.checks import check_shared_prompt_support
from blob_pyro.models import ChoiceLikelihoodHead, bayesianize
from blob_pyro.models.bayesian_model import extra_batch_inputs
from blob_pyro.models.heads import shared_prompt_attention_mask
from blob_pyro.train import main
from tests.conftest import write_bigbench_task


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_head_scores_are_mean_token_log_probabilities(tiny_bpe_tokenizer, tiny_causal_lm_dir, layout):
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    examples = [
        MultipleChoiceExample("Which one is red?", ("the red one", "a blue thing here", "green"), 0),
        MultipleChoiceExample("Pick B", ("x", "the B answer"), 1),
    ]
    encoded = encode_choice_continuations(examples[:1], tiny_bpe_tokenizer)
    batch = next(iterate_choice_batches(encoded, batch_size=1, pad_token_id=tiny_bpe_tokenizer.pad_token_id, shuffle=False,
                                        layout=layout))
    assert batch["input_ids"].shape[0] == (1 if layout == "shared_prompt" else 3) and batch["labels"].tolist() == [0]
    with torch.no_grad():
        scores = ChoiceLikelihoodHead(3)(network, batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch))
        for k, choice in enumerate(examples[0].choices):  # direct: one unpadded sequence per choice
            prompt = encoded.prompts[0]
            cont = encoded.continuations[0][k]
            ids = torch.tensor([prompt + cont])
            log_probs = torch.log_softmax(network(input_ids=ids).logits[0, :-1], -1)
            expected = log_probs[len(prompt) - 1 :].gather(-1, torch.tensor(cont)[:, None]).mean()
            torch.testing.assert_close(scores[0, k], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["shared_prompt", "separate"])
def test_cli_with_choice_loglik_scoring(tmp_path, tiny_causal_lm_dir, layout):
    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main([
        "--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(tmp_path / "run"),
        "--answer-scoring", "choice_loglik", "--num-train", "24", "--num-validation", "12", "--max-steps", "3",
        "--batch-size", "4", "--eval-samples", "2", "--rank", "2", "--choice-layout", layout,
    ])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["choice_layout"] == layout
    assert metrics["samples_2"]["n_examples"] == 12 and set(metrics) == {"zero_shot", "mean", "samples_2"}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_layouts_agree_on_padded_batches_of_an_adapted_model(tiny_bpe_tokenizer, tiny_causal_lm_dir, attn_implementation):
    """The shared-prompt row (block mask, restarted positions) scores every choice exactly as K separate
    rows do, with left padding, choices of different lengths, and a LoRA adapter with a non-zero update."""
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # sharpen the random init's near-uniform attention, so positions and masks matter
        for name, weight in network.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(20.0)
    bayesianize(network, ["q_proj", "v_proj", "lm_head"], rank=2, alpha=4.0)
    torch.manual_seed(0)
    for module in network.modules():
        if hasattr(module, "set_transient"):  # a fixed A (else every forward draws A from the prior)
            module.lora_B.data.normal_(0, 0.1)
            module.set_transient(active_A=0.1 * torch.randn(module.rank, module.in_features))
    examples = [
        MultipleChoiceExample("A fairly long question about the colour of things?", ("red", "a blue thing here", "the green one"), 0),
        MultipleChoiceExample("Short?", ("x", "yy zz", "the B answer"), 2),
        MultipleChoiceExample("Mid length question here", ("one two three four", "five", "six seven"), 1),
    ]
    encoded = encode_choice_continuations(examples, tiny_bpe_tokenizer)
    scores = {}
    for layout in ("shared_prompt", "separate"):
        batch = next(iterate_choice_batches(encoded, batch_size=3, pad_token_id=tiny_bpe_tokenizer.pad_token_id,
                                            shuffle=False, layout=layout))
        with torch.no_grad():
            scores[layout] = ChoiceLikelihoodHead(3)(network, batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch))
    assert scores["separate"].shape == (3, 3)
    torch.testing.assert_close(scores["shared_prompt"], scores["separate"], rtol=1e-4, atol=1e-5)


def test_shared_prompt_mask_by_hand():
    # one row: pad, prompt(2), choice 1 (2 tokens), choice 2 (1 token)
    segments = torch.tensor([[-1, 0, 0, 1, 1, 2]])
    allowed = shared_prompt_attention_mask(segments, torch.float32)[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],   # padding sees itself only
        [0, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 0, 0],   # choice 1: prompt + itself
        [0, 1, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 1],   # choice 2: prompt + itself, not choice 1
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    assert shared_prompt_attention_mask(segments, torch.bfloat16).dtype == torch.bfloat16


def test_shared_prompt_batch_layout_and_errors(tiny_bpe_tokenizer, tiny_causal_lm_dir):
    examples = [MultipleChoiceExample("Q one?", ("a b", "c"), 0), MultipleChoiceExample("Q two is longer?", ("d", "e f g"), 1)]
    encoded = encode_choice_continuations(examples, tiny_bpe_tokenizer)
    batch = next(iterate_choice_batches(encoded, batch_size=2, pad_token_id=tiny_bpe_tokenizer.pad_token_id, shuffle=False))
    for r in range(2):
        prompt, conts = encoded.prompts[r], encoded.continuations[r]
        real = batch["attention_mask"][r].bool()
        assert batch["input_ids"][r, real].tolist() == prompt + conts[0] + conts[1]
        assert batch["segment_ids"][r, real].tolist() == [0] * len(prompt) + [1] * len(conts[0]) + [2] * len(conts[1])
        assert batch["segment_ids"][r, ~real].eq(-1).all()
        P = len(prompt)
        assert batch["position_ids"][r, real].tolist() == list(range(P)) + list(range(P, P + len(conts[0]))) + list(range(P, P + len(conts[1])))
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    with pytest.raises(ValueError, match="2 choices per example, the head expects 3"):
        ChoiceLikelihoodHead(3)(network, batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch))
    with pytest.raises(ValueError, match="unknown choice layout"):
        next(iterate_choice_batches(encoded, batch_size=2, pad_token_id=0, shuffle=False, layout="packed"))


def test_models_that_ignore_the_shared_prompt_mask_are_refused(tmp_path, tiny_bpe_tokenizer, tiny_causal_lm_dir):
    """GPT-2 (transformers 5) scores a shared-prompt row differently from separate rows: the probe in
    build_model refuses it with the flag to use, before anything is trained; Llama passes."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    check_shared_prompt_support(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval())
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_bpe_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      pad_token_id=tiny_bpe_tokenizer.pad_token_id, bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # sharpen the random init, as real weights are
        for weight in gpt2.parameters():
            if weight.dim() == 2:
                weight.mul_(10.0)
    with pytest.raises(ValueError, match="Use --choice-layout separate"):
        check_shared_prompt_support(gpt2)
    gpt2.save_pretrained(tmp_path / "gpt2")
    tiny_bpe_tokenizer.save_pretrained(tmp_path / "gpt2")
    task = write_bigbench_task(tmp_path / "task.json")
    args = ["--model", str(tmp_path / "gpt2"), "--task", str(task), "--num-train", "8", "--num-validation", "4",
            "--max-steps", "1", "--batch-size", "4", "--eval-samples", "0", "--rank", "2", "--target-modules", "lm_head"]  # GPT-2 attention is Conv1D
    with pytest.raises(ValueError, match="--model .*gpt2 scores choices differently"):
        main([*args, "--output-dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused" / "metrics.json").exists()
    metrics = main([*args, "--output-dir", str(tmp_path / "separate"), "--choice-layout", "separate"])
    assert metrics["mean"]["n_examples"] == 4
