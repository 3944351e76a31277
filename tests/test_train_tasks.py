"""``python -m blob_pyro.train`` end to end on tiny random models: a table task, --eval-tasks (OOD blocks
in metrics.json, a different number of choices), and the sequence-classification path (LoRA on
query/value and on the classifier head)."""

import json

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from blob_pyro.train import main

QA = [("Where do fish live?", ["water", "trees", "sky"], 0), ("What is 2 + 2?", ["3", "4", "5"], 1),
      ("Which is a colour?", ["run", "seven", "red"], 2)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_bpe_tokenizer):
    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    vocab = len(tiny_bpe_tokenizer)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))
    bert = BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, max_position_embeddings=256, num_labels=2))
    for name, model in (("llama", llama), ("bert", bert)):
        model.save_pretrained(root / name)
        tiny_bpe_tokenizer.save_pretrained(root / name)
    return root


def common_flags(tmp_path, name):
    return ["--max-steps", "4", "--batch-size", "4", "--eval-samples", "2", "--eval-batch-size", "8", "--device", "cpu",
            "--log-every", "2", "--output-dir", str(tmp_path / name)]


def test_causal_lm_table_task_with_ood_eval_tasks(tmp_path, tiny_models, capsys):
    train_rows = [{"question": q, "choices": c, "label": y} for q, c, y in QA * 10]
    ood_rows = [{"text": f"claim {i}", "label": ["true", "false"][i % 2]} for i in range(12)]
    bigbench = tmp_path / "yesno.json"
    bigbench.write_text(json.dumps({"examples": [{"input": f"q{i}?", "target_scores": {"Yes": i % 2, "No": 1 - i % 2}} for i in range(10)]}))
    metrics = main([
        "--model", str(tiny_models / "llama"), "--task", write_rows(tmp_path / "qa.jsonl", train_rows),
        "--num-train", "12", "--num-validation", "9", "--target-modules", "q_proj,v_proj,lm_head",
        "--eval-tasks", f"{write_rows(tmp_path / 'claims.jsonl', ood_rows)},{bigbench}", "--eval-task-size", "6",
        *common_flags(tmp_path, "run"),
    ])
    assert set(metrics) == {"zero_shot", "mean", "samples_2", "ood", "ood_detection"}
    assert set(metrics["ood_detection"]) == {"claims", "yesno"} and 0 <= metrics["ood_detection"]["claims"]["entropy"]["auroc"] <= 1
    assert set(metrics["ood"]) == {"claims", "yesno"}
    for block in metrics["ood"].values():
        assert set(block) == {"mean", "samples_2"} and block["mean"]["n_examples"] == 6
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["ood"]["claims"]["samples_2"]["acc"] == pytest.approx(metrics["ood"]["claims"]["samples_2"]["acc"])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["ood_tasks"]["yesno"]["num_choices"] == 2 and len(run["ood_tasks"]["yesno"]["positions"]) == 6
    assert run["train_examples_per_second"] > 0 and run["eval_examples_per_second"] > 0
    printed = capsys.readouterr().out
    assert "| samples_2 |" in printed and "OOD claims (trained on qa, not on claims)" in printed


def test_bad_eval_task_fails_before_training(tmp_path, tiny_models):
    with pytest.raises(SystemExit, match="--eval-tasks 'missing.jsonl' cannot be loaded: task 'missing.jsonl' is not a file"):
        main(["--model", str(tiny_models / "llama"), "--task", write_rows(tmp_path / "qa.jsonl", [
            {"question": q, "choices": c, "label": y} for q, c, y in QA * 4]), "--num-train", "6", "--num-validation", "3",
            "--eval-tasks", "missing.jsonl", *common_flags(tmp_path, "bad")])
    assert not (tmp_path / "bad").exists()  # checked before the output directory is touched


def test_sequence_classification_adapts_query_value_and_classifier(tmp_path, tiny_models):
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} {i}", "label": ["negative", "positive"][i % 2]}
            for i in range(24)]
    ood = [{"text": f"other {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)]
    metrics = main([
        "--model", str(tiny_models / "bert"), "--task-type", "sequence_classification",
        "--task", write_rows(tmp_path / "sentiment.jsonl", rows), "--num-train", "16", "--num-validation", "8",
        "--target-modules", "query,value,classifier", "--eval-tasks", write_rows(tmp_path / "other.jsonl", ood),
        *common_flags(tmp_path, "seq"),
    ])
    assert metrics["mean"]["n_examples"] == 8 and metrics["ood"]["other"]["mean"]["n_examples"] == 8
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "seq" / "adapter.safetensors"))
    classifier_B = [k for k in adapter if k.startswith("classifier") and "lora_B" in k]
    assert classifier_B, f"no LoRA B on the classifier head in {sorted(adapter)[:6]}"
    assert adapter[classifier_B[0]].abs().sum() > 0  # the head's adapter was trained (B starts at 0)
    assert any(".query." in k for k in adapter) and any(".value." in k for k in adapter)


def test_sequence_classifier_rejects_ood_task_with_other_class_count(tmp_path, tiny_models):
    rows = [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(12)]
    three = [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(9)]
    with pytest.raises(SystemExit, match=r"expected 2 classes \(the classifier head of two\), found 3; .*same classes"):
        main(["--model", str(tiny_models / "bert"), "--task-type", "sequence_classification",
              "--task", write_rows(tmp_path / "two.jsonl", rows), "--num-train", "6", "--num-validation", "4",
              "--target-modules", "query,value,classifier", "--eval-tasks", write_rows(tmp_path / "three.jsonl", three),
              *common_flags(tmp_path, "bad")])


def test_sequence_classifier_head_must_be_adapted(tmp_path, tiny_models):
    rows = [{"text": f"t{i}", "label": ["a", "b"][i % 2]} for i in range(12)]
    with pytest.raises(ValueError, match=r"leaves the new classification head \['classifier'\] randomly initialised and frozen; "
                                         r"add it, e.g. --target-modules query,value,classifier"):
        main(["--model", str(tiny_models / "bert"), "--task-type", "sequence_classification",
              "--task", write_rows(tmp_path / "two.jsonl", rows), "--num-train", "6", "--num-validation", "4",
              "--target-modules", "query,value", *common_flags(tmp_path, "nohead")])
