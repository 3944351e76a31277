"""Local tables (jsonl / json / csv / parquet) through ``datasets`` with a column mapping, the task-spec
resolver, and every malformed input."""

import json

import pandas as pd
import pytest

from blob_pyro.data import (
    ColumnMapping,
    answer_token_ids,
    encode_multiple_choice,
    load_tabular,
    load_task_spec,
    stratified_sample,
    task_spec_name,
)

from tests.conftest import BIGBENCH_DIR

ROWS = [
    {"question": "Where do fish live?", "choices": ["water", "trees", "sky"], "label": 0},
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "label": 1},
    {"question": "Which is a colour?", "choices": ["run", "seven", "red"], "label": 2},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_jsonl_default_columns(tmp_path):
    task = load_tabular(write_jsonl(tmp_path / "qa.jsonl", ROWS))
    assert task.name == "qa" and task.num_choices == 3 and len(task) == 3
    assert [e.label for e in task.examples] == [0, 1, 2]
    assert task.examples[1].choices == ("3", "4", "5")
    assert task.label_names is None and task.splits is None
    assert task.file_indices == (0, 1, 2)


def test_csv_choice_columns_and_letter_labels(tmp_path):
    path = tmp_path / "wg.csv"
    pd.DataFrame(
        {"sentence": ["The cup fell off _ .", "Sam gave _ a gift."], "option1": ["table", "Ann"],
         "option2": ["cat", "box"], "answer": ["A", "B"]}
    ).to_csv(path, index=False)
    task = load_tabular(path, mapping="question=sentence,choices=option1|option2,label=answer")
    assert [e.choices for e in task.examples] == [("table", "cat"), ("Ann", "box")]
    assert task.labels == [0, 1]


def test_parquet_text_labels_and_hub_style_choices(tmp_path):
    path = tmp_path / "arc.parquet"
    pd.DataFrame(
        {"q": ["One?", "Two?"], "opts": [{"text": ["a", "b", "c"], "label": ["A", "B", "C"]}, {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}],
         "gold": ["c", "y"]}
    ).to_parquet(path)
    task = load_tabular(path, mapping=ColumnMapping(question="q", choices=("opts",), label="gold"))
    assert task.labels == [2, 1]
    assert task.examples[0].choices == ("a", "b", "c")


def test_text_classification_classes_from_labels_and_from_label_names(tmp_path):
    rows = [{"text": "great film", "label": "positive"}, {"text": "dull", "label": "negative"}, {"text": "fine", "label": "positive"}]
    task = load_tabular(write_jsonl(tmp_path / "sst.jsonl", rows))
    assert task.label_names == ("negative", "positive")  # sorted distinct text labels
    assert task.labels == [1, 0, 1]
    ints = [{"text": "great film", "label": 1}, {"text": "dull", "label": 0}]
    task = load_tabular(write_jsonl(tmp_path / "ints.jsonl", ints), mapping="label_names=bad|good")
    assert task.label_names == ("bad", "good") and task.labels == [1, 0]


def test_json_list_of_rows_and_format_override(tmp_path):
    path = tmp_path / "rows.data"
    path.write_text(json.dumps(ROWS))
    task = load_tabular(path, task_format="json")
    assert task.labels == [0, 1, 2]
    with pytest.raises(ValueError, match=r"cannot tell the table format from the suffix '\.data'.*--task-format"):
        load_tabular(path)


def test_integral_float_labels_from_csv_gaps_are_indices(tmp_path):
    path = tmp_path / "f.csv"
    pd.DataFrame({"question": ["a?", "b?"], "c1": ["x", "y"], "c2": ["u", "v"], "label": [1.0, 0.0]}).to_csv(path, index=False)
    assert load_tabular(path, mapping="choices=c1|c2").labels == [1, 0]


# --- column mapping -----------------------------------------------------------------------------


def test_column_mapping_parse():
    mapping = ColumnMapping.parse("text=sentence, choices=option1|option2, label=answer")
    assert mapping == ColumnMapping(question="sentence", choices=("option1", "option2"), label="answer")
    assert ColumnMapping.parse(None) == ColumnMapping() == ColumnMapping.parse("  ")


@pytest.mark.parametrize(
    "text, message",
    [
        ("question", r"item 'question' is not key=column"),
        ("query=q", r"key 'query' is unknown; keys are \['question', 'text', 'choices', 'label', 'label_names'\]"),
        ("question=a,text=b", r"names 'question' twice"),
        ("label=", r"item 'label=' is not key=column"),
    ],
)
def test_column_mapping_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        ColumnMapping.parse(text)


# --- bad input ----------------------------------------------------------------------------------


def test_misnamed_question_column(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x?", "choices": ["a", "b"], "label": 0}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: no question column: none of the default names .*'prompt'.*--column-mapping question=<column>"):
        load_tabular(path)


def test_mapped_column_missing(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"bad\.jsonl: no column 'answer' for 'label' \(column mapping\); the columns are \['question', 'choices', 'label'\]"):
        load_tabular(path, mapping="label=answer")
    with pytest.raises(ValueError, match=r"no column 'opt3' for 'choices'"):
        load_tabular(path, mapping="choices=choices|opt3")


@pytest.mark.parametrize(
    "label, message",
    [
        (3, r"row 0: label 3 in column 'label' is out of range for 3 choices; integer labels are 0-based indices 0\.\.2 \(subtract 1"),
        (-1, r"label -1 in column 'label' is out of range"),
        (True, r"row 0: label column 'label' holds bool True; expected a 0-based integer index \(0\.\.2\), an answer letter \(A\.\.C\)"),
        (1.5, r"holds float 1\.5"),
        ([0], r"holds list \[0\]"),
        ("D", r"label 'D' in column 'label' is neither one of the choices \['water', 'trees', 'sky'\] nor an answer letter A\.\.C"),
        (None, r"row 0: label column 'label' is empty \(null\)"),
    ],
)
def test_bad_labels(tmp_path, label, message):
    rows = [dict(ROWS[0], label=label), ROWS[1]]
    with pytest.raises(ValueError, match=message):
        load_tabular(write_jsonl(tmp_path / "bad.jsonl", rows))


def test_letter_and_text_labels_resolve(tmp_path):
    rows = [dict(ROWS[0], label="B"), dict(ROWS[1], label="5"), dict(ROWS[2], label=" red ")]
    assert load_tabular(write_jsonl(tmp_path / "ok.jsonl", rows)).labels == [1, 2, 2]


def test_bad_choices(tmp_path):
    with pytest.raises(ValueError, match=r"row 0: column 'choices' must hold a list of choice texts, found str"):
        load_tabular(write_jsonl(tmp_path / "a.jsonl", [dict(ROWS[0], choices="water|trees")]))
    with pytest.raises(ValueError, match=r"row 0: 1 choice\(s\) \['water'\]; a multiple-choice example needs at least 2"):
        load_tabular(write_jsonl(tmp_path / "b.jsonl", [dict(ROWS[0], choices=["water"])]))
    with pytest.raises(ValueError, match=r"row 1: column 'question' is empty \(null\)"):
        load_tabular(write_jsonl(tmp_path / "c.jsonl", [ROWS[0], dict(ROWS[1], question=None)]))


def test_differing_choice_counts_raise_or_drop(tmp_path):
    rows = [ROWS[0], ROWS[1], {"question": "Yes?", "choices": ["yes", "no"], "label": 0}]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(ValueError, match=r"mixed\.jsonl: row 2 has 2 choices but most rows have 3 \(1 of 3 differ.*--drop-mismatched-choices"):
        load_tabular(path)
    task = load_tabular(path, drop_mismatched_choices=True)
    assert len(task) == 2 and task.file_indices == (0, 1)


def test_empty_tables(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty \(0 bytes\)"):
        load_tabular(tmp_path / "empty.jsonl")
    (tmp_path / "header.csv").write_text("question,label\n")
    with pytest.raises(ValueError, match=r"header\.csv: the table has no rows"):
        load_tabular(tmp_path / "header.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.csv does not exist"):
        load_tabular(tmp_path / "nope.csv")


def test_text_classification_with_numeric_labels_needs_names(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match=r"no choices column.*label_names=<name0>\|<name1>"):
        load_tabular(path)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "pos"}])
    with pytest.raises(ValueError, match=r"needs at least 2 classes, found \['pos'\]"):
        load_tabular(one)


def test_answer_labels_not_one_token(tmp_path, byte_tokenizer, tiny_bpe_tokenizer):
    task = load_tabular(write_jsonl(tmp_path / "qa.jsonl", ROWS))
    assert len(set(answer_token_ids(tiny_bpe_tokenizer, task.num_choices))) == 3
    with pytest.raises(ValueError, match=r"Answer label ' A' is 2 tokens.*expected exactly one"):
        answer_token_ids(byte_tokenizer, task.num_choices)


def test_table_prompts_encode(tmp_path, tiny_bpe_tokenizer):
    task = load_tabular(write_jsonl(tmp_path / "qa.jsonl", ROWS))
    encoded = encode_multiple_choice(task.examples, tiny_bpe_tokenizer)
    assert tiny_bpe_tokenizer.decode(encoded.input_ids[0], skip_special_tokens=True).endswith("C. sky\nAnswer:")


# --- resolver -----------------------------------------------------------------------------------


def test_load_task_spec_dispatch(tmp_path):
    bigbench = tmp_path / "bb.json"
    bigbench.write_text(json.dumps({"examples": [{"input": "q?", "target_scores": {"a": 1, "b": 0}}]}))
    assert load_task_spec(str(bigbench)).num_choices == 2
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps(ROWS))  # a JSON list of rows is a table, not BIG-bench
    assert load_task_spec(str(rows)).labels == [0, 1, 2]
    assert load_task_spec(str(write_jsonl(tmp_path / "qa.jsonl", ROWS))).num_choices == 3
    assert len(load_task_spec("bundled:social_iqa", drop_mismatched_choices=True)) == 1950
    assert [task_spec_name(s) for s in ("bundled:social_iqa", "paper:arc_easy", "/x/strategyqa.json")] == [
        "social_iqa", "arc_easy", "strategyqa"]


def test_load_task_spec_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task 'missing\.json' is not a file.*paper:<name> with name in \['arc_challenge'"):
        load_task_spec("missing.json")
    with pytest.raises(FileNotFoundError, match=r"no bundled task 'nope'; bundled tasks: \['bundled:social_iqa'\]"):
        load_task_spec("bundled:nope")
    other = tmp_path / "task.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match=r"unknown task file type '\.txt'"):
        load_task_spec(str(other))
    bigbench = tmp_path / "bb.json"
    bigbench.write_text(json.dumps({"examples": [{"input": "q?", "target_scores": {"a": 1, "b": 0}}]}))
    with pytest.raises(ValueError, match=r"is a BIG-bench task; --column-mapping applies to tables only"):
        load_task_spec(str(bigbench), column_mapping="label=x")
    generative = tmp_path / "gen.json"
    generative.write_text(json.dumps({"examples": [{"input": "q?", "target": "a"}]}))
    with pytest.raises(ValueError, match=r"gen\.json: examples\[0\] has no 'target_scores' field \(it has 'target' only"):
        load_task_spec(str(generative))


@pytest.mark.skipif(not BIGBENCH_DIR.is_dir(), reason="shared BIG-bench data not found")
def test_load_task_spec_reads_shared_bigbench():
    task = load_task_spec(str(BIGBENCH_DIR / "winowhy.json"))
    assert task.label_names == ("correct", "incorrect") and task.task_prefix.startswith("Please answer")


# --- stratified sample --------------------------------------------------------------------------


def test_stratified_sample_shares_and_seed():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    sample = stratified_sample(labels, size=10, seed=0)
    assert sorted(labels[i] for i in sample) == [0] * 6 + [1] * 3 + [2]
    assert sample == sorted(sample) == stratified_sample(labels, size=10, seed=0)
    assert sample != stratified_sample(labels, size=10, seed=1)
    assert stratified_sample(labels, size=500, seed=0) == list(range(100))
    with pytest.raises(ValueError, match="size must be >= 1"):
        stratified_sample(labels, size=0, seed=0)
