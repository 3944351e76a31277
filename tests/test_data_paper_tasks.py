"""The paper's named tasks: each loader on small local files written here in the hub's schema, the hub
path (``datasets.load_dataset(hub_id, config)``, faked), split roles, prompts and bad input."""

import json

import datasets
import pandas as pd
import pytest

from blob_pyro.assembly import evaluation_positions, make_split
from blob_pyro.config import TrainConfig
from blob_pyro.data import PAPER_TASKS, answer_token_ids, encode_multiple_choice, load_paper_task, load_task_spec

ARC_ROW = {"id": "a1", "question": "Which gas do plants take in?",
           "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"}
ARC_NUMERIC = {"id": "a2", "question": "Which is a metal?",
               "choices": {"text": ["wood", "glass", "iron", "salt"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}
ARC_FIVE = {"id": "a3", "question": "Pick the planet.",
            "choices": {"text": ["Moon", "Sun", "Mars", "Comet", "Star"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "C"}
WG_ROW = {"sentence": "The trophy didn't fit in the suitcase because _ was too big.", "option1": "the trophy",
          "option2": "the suitcase", "answer": "1"}
OBQA_ROW = {"id": "o1", "question_stem": "The sun is responsible for",
            "choices": {"text": ["puppies learning", "plants sprouting", "stars twinkling", "rocks"], "label": ["A", "B", "C", "D"]},
            "answerKey": "B"}
BOOLQ_ROW = {"question": "is the sky blue", "answer": False, "passage": "The sky appears blue on clear days."}
MMLU_ROW = {"question": "What is the charge of an electron?", "subject": "college_physics", "choices": ["+1", "-1", "0", "2"], "answer": 1}

# task -> (rows of the train split, rows of the evaluated split, expected first evaluated example (question
# start, choices, label)); each written in a different file layout of the hub schema
FIXTURES = {
    "winogrande_s": ([WG_ROW, dict(WG_ROW, answer="2")], [dict(WG_ROW, answer="2")], ("The trophy", ("the trophy", "the suitcase"), 1)),
    "winogrande_m": ([WG_ROW] * 3, [WG_ROW], ("The trophy", ("the trophy", "the suitcase"), 0)),
    "arc_challenge": ([ARC_ROW, ARC_NUMERIC], [ARC_NUMERIC, ARC_ROW], ("Which is a metal?", ("wood", "glass", "iron", "salt"), 2)),
    "arc_easy": ([ARC_ROW], [ARC_ROW], ("Which gas", ("oxygen", "carbon dioxide", "helium", "neon"), 1)),
    "openbookqa": ([OBQA_ROW, OBQA_ROW], [dict(OBQA_ROW, answerKey="D")], ("The sun", OBQA_ROW["choices"]["text"], 3)),
    "boolq": ([dict(BOOLQ_ROW, answer=True)], [BOOLQ_ROW], ("The sky appears blue on clear days.\nQuestion: is the sky blue?", ("True", "False"), 1)),
    "mmlu_college_chemistry": (None, [dict(MMLU_ROW, subject="college_chemistry", answer="C")], ("What is the charge", ("+1", "-1", "0", "2"), 2)),
    "mmlu_college_physics": (None, [MMLU_ROW, MMLU_ROW], ("What is the charge", ("+1", "-1", "0", "2"), 1)),
}
LAYOUTS = ["jsonl", "json", "parquet_shards", "config_dir"]


def write_split(folder, split, rows, layout):
    """Write ``rows`` as the hub split ``split`` in one of the local layouts the loader accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "jsonl":
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "json":
        (folder / f"{split}.json").write_text(json.dumps(rows))
    else:  # the hub's own parquet shard names
        pd.DataFrame(rows).to_parquet(folder / f"{split}-00000-of-00001.parquet")


def write_task(root, name, layout="jsonl"):
    spec = PAPER_TASKS[name]
    train, evaluated, _ = FIXTURES[name]
    folder = root / ((spec.config or "") if layout == "config_dir" else name)  # no config: data_dir itself
    if train is not None:
        write_split(folder, spec.train_split, train, layout)
    write_split(folder, spec.eval_split, evaluated, "parquet_shards" if layout == "config_dir" else layout)
    return root


def test_every_paper_task_has_a_fixture():
    assert set(FIXTURES) == set(PAPER_TASKS)
    assert {"winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "openbookqa", "boolq",
            "mmlu_college_chemistry", "mmlu_college_physics"} == set(PAPER_TASKS)


@pytest.mark.parametrize("name", sorted(PAPER_TASKS))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paper_task_loads_local_files(tmp_path, name, layout):
    spec = PAPER_TASKS[name]
    write_task(tmp_path, name, layout)
    roles = ("train", "validation") if spec.train_split else ("validation",)
    task = load_paper_task(name, data_dir=tmp_path, roles=roles)
    train, evaluated, (question, choices, label) = FIXTURES[name]
    n_train = 0 if train is None else len(train)
    assert len(task) == n_train + len(evaluated)
    assert task.splits["validation"] == tuple(range(n_train, n_train + len(evaluated)))
    if train is not None:
        assert task.splits["train"] == tuple(range(n_train))
    first = task.examples[task.splits["validation"][0]]
    assert first.question.startswith(question)
    assert first.choices == tuple(choices) and first.label == label
    assert task.num_choices == spec.num_choices == len(spec.label_tokens)
    assert spec.eval_split in task.split_procedure and spec.hub_id in task.split_procedure


def test_split_roles_and_label_tokens():
    assert {n: (t.train_split, t.eval_split) for n, t in PAPER_TASKS.items()} == {
        **{n: ("train", "validation") for n in ("winogrande_s", "winogrande_m", "arc_challenge", "arc_easy", "openbookqa", "boolq")},
        "mmlu_college_chemistry": (None, "test"), "mmlu_college_physics": (None, "test"),
    }
    assert PAPER_TASKS["arc_easy"].label_tokens == [" A", " B", " C", " D"]
    assert PAPER_TASKS["boolq"].label_tokens == [" A", " B"]
    assert (PAPER_TASKS["arc_challenge"].hub_id, PAPER_TASKS["arc_challenge"].config) == ("allenai/ai2_arc", "ARC-Challenge")
    assert (PAPER_TASKS["winogrande_m"].hub_id, PAPER_TASKS["winogrande_m"].config) == ("allenai/winogrande", "winogrande_m")


def test_prompts_encode_with_single_token_labels(tmp_path, tiny_bpe_tokenizer, byte_tokenizer):
    task = load_paper_task("arc_easy", data_dir=write_task(tmp_path, "arc_easy"))
    encoded = encode_multiple_choice(task.examples, tiny_bpe_tokenizer, task_prefix=task.task_prefix)
    text = tiny_bpe_tokenizer.decode(encoded.input_ids[0], skip_special_tokens=True)
    assert text.startswith("Select one of the choices") and text.endswith("D. neon\nAnswer:")
    assert len(answer_token_ids(tiny_bpe_tokenizer, task.num_choices)) == 4
    with pytest.raises(ValueError, match=r"Answer label ' A' is 2 tokens"):
        answer_token_ids(byte_tokenizer, task.num_choices)


def test_boolq_long_passage_is_cut_from_the_left_keeping_the_question(tmp_path, tiny_bpe_tokenizer):
    row = dict(BOOLQ_ROW, passage="words " * 300 + "The sky appears blue.")
    write_split(tmp_path / "boolq", "validation", [row], "jsonl")
    task = load_paper_task("boolq", data_dir=tmp_path, roles=("validation",))
    short = dict(BOOLQ_ROW, passage="The sky appears blue.")
    budget = len(tiny_bpe_tokenizer(task.task_prefix + short["passage"] + "\nQuestion: is the sky blue?\nA. True\nB. False\nAnswer:")["input_ids"]) + 10
    ids = encode_multiple_choice(task.examples, tiny_bpe_tokenizer, task_prefix=task.task_prefix, max_length=budget).input_ids[0]
    text = tiny_bpe_tokenizer.decode(ids, skip_special_tokens=True)
    assert len(ids) == budget and text.startswith("Answer the question about the passage with True or False.\n")
    assert "words words" not in text[:80]  # the passage lost its start
    assert "Question: is the sky blue?\nA. True\nB. False\nAnswer:" in text


def test_hub_path_calls_load_dataset_with_id_config_and_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([ARC_ROW, ARC_NUMERIC])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task_spec("paper:arc_challenge")
    assert calls == [("allenai/ai2_arc", "ARC-Challenge", "train"), ("allenai/ai2_arc", "ARC-Challenge", "validation")]
    assert task.splits == {"train": (0, 1), "validation": (2, 3)}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list([MMLU_ROW]))
    assert load_task_spec("paper:mmlu_college_physics", roles=("validation",)).labels == [1]


def test_hub_unreachable_points_to_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/openbookqa' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match=r"cannot load 'allenai/openbookqa' \(config 'main', split 'train'\).*pass --data-dir"):
        load_paper_task("openbookqa")


# --- splits in a run --------------------------------------------------------------------------------


def test_make_split_uses_the_task_splits_whole_or_subsampled(tmp_path):
    spec = PAPER_TASKS["arc_easy"]
    rows = [dict(ARC_ROW, answerKey=k) for k in "ABCD" * 5]
    write_split(tmp_path / "arc_easy", "train", rows, "jsonl")
    write_split(tmp_path / "arc_easy", "validation", rows[:8], "jsonl")
    cfg = TrainConfig(task="paper:arc_easy", data_dir=str(tmp_path), num_train=8, num_validation=4)
    task = load_task_spec(cfg.task, data_dir=cfg.data_dir)
    split = make_split(cfg, task)
    assert split.train == list(range(20)) and split.validation == list(range(20, 28))
    assert spec.hub_id in split.procedure
    sub = make_split(TrainConfig(task=cfg.task, num_train=8, num_validation=4, subsample_task_splits=True), task)
    assert len(sub.train) == 8 and sorted(task.labels[i] for i in sub.train) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(sub.validation) == 4 and all(i >= 20 for i in sub.validation)
    ood = TrainConfig(eval_task_size=4)
    assert evaluation_positions(ood, task) == sorted(evaluation_positions(ood, task))
    assert sorted(task.labels[i] for i in evaluation_positions(ood, task)) == [0, 1, 2, 3]
    assert evaluation_positions(TrainConfig(eval_task_size=0), task) == list(range(20, 28))


def test_eval_only_task_cannot_be_trained_on(tmp_path):
    write_task(tmp_path, "mmlu_college_physics")
    with pytest.raises(ValueError, match=r"paper:mmlu_college_physics is evaluation-only .*pass it to --eval-tasks"):
        load_paper_task("mmlu_college_physics", data_dir=tmp_path)


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_task_is_an_error_listing_the_tasks():
    with pytest.raises(ValueError, match=r"unknown paper task 'arc'; paper tasks are \['arc_challenge', 'arc_easy'"):
        load_task_spec("paper:arc")
    with pytest.raises(ValueError, match=r"unknown paper task 'piqa'"):
        TrainConfig(eval_tasks="paper:piqa")


def test_missing_split_file_says_where_and_how_to_make_it(tmp_path):
    write_split(tmp_path / "boolq", "train", [BOOLQ_ROW], "jsonl")
    with pytest.raises(FileNotFoundError, match=r"no local file for split 'validation' of paper:boolq.*load_dataset\('google/boolq', split='validation'\)"):
        load_paper_task("boolq", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--data-dir .* is not a directory"):
        load_paper_task("boolq", data_dir=tmp_path / "nowhere")


@pytest.mark.parametrize(
    "name, row, message",
    [
        ("winogrande_s", dict(WG_ROW, option2=None), r"field\(s\) \['option2'\] are null"),
        ("winogrande_s", dict(WG_ROW, answer=""), r"field 'answer' must be '1' \(option1\) or '2' \(option2\), found ''; the hub's test split is unlabelled"),
        ("arc_easy", dict(ARC_ROW, answerKey="E"), r"field 'answerKey' = 'E' is not one of the choice labels \['A', 'B', 'C', 'D'\]"),
        ("openbookqa", dict(OBQA_ROW, choices=["a", "b", "c", "d"]), r"field 'choices' must be \{'text': \[...\], 'label': \[...\]\}"),
        ("boolq", dict(BOOLQ_ROW, answer="yes"), r"field 'answer' must be a boolean \(true/false\), found str 'yes'"),
        ("mmlu_college_physics", dict(MMLU_ROW, answer=4), r"label 4 in column 'answer' is out of range for 4 choices"),
        ("mmlu_college_physics", dict(MMLU_ROW, answer=None), r"field\(s\) \['answer'\] are null"),
    ],
)
def test_bad_rows_name_file_row_field_and_fix(tmp_path, name, row, message):
    spec = PAPER_TASKS[name]
    write_split(tmp_path / name, spec.eval_split, [FIXTURES[name][1][0], row], "jsonl")
    with pytest.raises(ValueError, match=rf"{name}[/\\]{spec.eval_split}\.jsonl: row 1: .*{message}"):
        load_paper_task(name, data_dir=tmp_path, roles=("validation",))


@pytest.mark.parametrize(
    "name, renamed, message",
    [
        ("winogrande_s", {"option2": "option_2"}, r"missing column\(s\) \['option2'\] of the allenai/winogrande schema"),
        ("arc_easy", {"question": "query"}, r"missing column\(s\) \['question'\] of the allenai/ai2_arc schema \(columns: \['id', 'query', 'choices', 'answerKey'\]\)"),
        ("boolq", {"answer": "label"}, r"missing column\(s\) \['answer'\] of the google/boolq schema"),
    ],
)
def test_misnamed_columns_name_file_and_fix(tmp_path, name, renamed, message):
    spec = PAPER_TASKS[name]
    rows = [{renamed.get(k, k): v for k, v in row.items()} for row in FIXTURES[name][1]]
    write_split(tmp_path / name, spec.eval_split, rows, "jsonl")
    with pytest.raises(ValueError, match=rf"{spec.eval_split}\.jsonl: {message}.*keep the hub's column names"):
        load_paper_task(name, data_dir=tmp_path, roles=("validation",))


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "validation.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"validation\.jsonl is empty \(0 bytes\)"):
        load_paper_task("arc_easy", data_dir=tmp_path, roles=("validation",))
    pd.DataFrame({"question": pd.Series([], dtype=str)}).to_parquet(tmp_path / "arc_easy" / "validation-00000-of-00001.parquet")
    (tmp_path / "arc_easy" / "validation.jsonl").unlink()
    with pytest.raises(ValueError, match=r"validation-00000-of-00001\.parquet: the table has no rows"):
        load_paper_task("arc_easy", data_dir=tmp_path, roles=("validation",))


def test_arc_mixed_choice_counts_raise_or_keep_the_four_choice_questions(tmp_path):
    write_split(tmp_path / "arc_challenge", "train", [ARC_ROW, ARC_FIVE, ARC_NUMERIC], "jsonl")
    write_split(tmp_path / "arc_challenge", "validation", [ARC_FIVE, ARC_ROW], "jsonl")
    with pytest.raises(ValueError, match=r"row 1 has 5 choices but most rows have 4 \(2 of 5 differ.*--drop-mismatched-choices"):
        load_paper_task("arc_challenge", data_dir=tmp_path)
    task = load_paper_task("arc_challenge", data_dir=tmp_path, drop_mismatched_choices=True)
    assert task.splits == {"train": (0, 1), "validation": (2,)}
    assert task.file_indices == (0, 2, 4)  # rows of the train file, then of the validation file
    assert [e.label for e in task.examples] == [1, 2, 1]


def test_files_of_another_dataset_are_rejected(tmp_path):
    rows = [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}]
    write_split(tmp_path / "arc_easy", "validation", rows, "jsonl")
    with pytest.raises(ValueError, match=r"paper:arc_easy: most examples have 2 choices, expected 4"):
        load_paper_task("arc_easy", data_dir=tmp_path, roles=("validation",))
