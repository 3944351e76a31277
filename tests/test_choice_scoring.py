"""Choice-likelihood ("cloze") scoring: encoding, batching and the head against a direct computation."""

import torch

from blob_pyro.data import MultipleChoiceExample
from blob_pyro.data.choice_scoring import encode_choice_continuations, iterate_choice_batches
from blob_pyro.models import ChoiceLikelihoodHead, bayesianize
from blob_pyro.train import main
from tests.conftest import write_bigbench_task


def test_head_scores_are_mean_token_log_probabilities(tiny_bpe_tokenizer, tiny_causal_lm_dir):
    from transformers import AutoModelForCausalLM

    network = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    examples = [
        MultipleChoiceExample("Which one is red?", ("the red one", "a blue thing here", "green"), 0),
        MultipleChoiceExample("Pick B", ("x", "the B answer"), 1),
    ]
    encoded = encode_choice_continuations(examples[:1], tiny_bpe_tokenizer)
    batch = next(iterate_choice_batches(encoded, batch_size=1, pad_token_id=tiny_bpe_tokenizer.pad_token_id, shuffle=False))
    assert batch["input_ids"].shape[0] == 3 and batch["labels"].tolist() == [0]
    with torch.no_grad():
        scores = ChoiceLikelihoodHead(3)(network, batch["input_ids"], batch["attention_mask"], batch["continuation_mask"])
        for k, choice in enumerate(examples[0].choices):  # direct: one unpadded sequence per choice
            prompt = encoded.prompts[0]
            cont = encoded.continuations[0][k]
            ids = torch.tensor([prompt + cont])
            log_probs = torch.log_softmax(network(input_ids=ids).logits[0, :-1], -1)
            expected = log_probs[len(prompt) - 1 :].gather(-1, torch.tensor(cont)[:, None]).mean()
            torch.testing.assert_close(scores[0, k], expected, rtol=1e-4, atol=1e-5)


def test_cli_with_choice_loglik_scoring(tmp_path, tiny_causal_lm_dir):
    task = write_bigbench_task(tmp_path / "task.json")
    metrics = main([
        "--model", str(tiny_causal_lm_dir), "--task", str(task), "--output-dir", str(tmp_path / "run"),
        "--answer-scoring", "choice_loglik", "--num-train", "24", "--num-validation", "12", "--max-steps", "3",
        "--batch-size", "4", "--eval-samples", "2", "--rank", "2",
    ])
    assert metrics["samples_2"]["n_examples"] == 12 and set(metrics) == {"zero_shot", "mean", "samples_2"}
