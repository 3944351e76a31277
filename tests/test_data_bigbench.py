"""BIG-bench loader: the five shared task files, synthetic files and every malformed input."""

import json

import pytest

from blob_pyro.data import MultipleChoiceExample, MultipleChoiceTask, load_bigbench

from tests.conftest import BIGBENCH_DIR

needs_shared = pytest.mark.skipif(
    not BIGBENCH_DIR.is_dir(), reason=f"shared BIG-bench data not found at {BIGBENCH_DIR}"
)

# file stem -> (examples in the file, examples kept, num_choices, label_names)
SHARED_TASKS = {
    "social_iqa": (1954, 1950, 3, None),
    "strategyqa": (2290, 2290, 2, ("Yes", "No")),
    "winowhy": (2865, 2865, 2, ("correct", "incorrect")),
    "epistemic_reasoning": (2000, 2000, 2, ("entailment", "non-entailment")),
    "fact_checker__fever": (6612, 6612, 2, ("true", "false")),
}


def write_task(tmp_path, examples, **fields):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"name": "synthetic", **fields, "examples": examples}))
    return path


@needs_shared
@pytest.mark.parametrize("stem", sorted(SHARED_TASKS))
def test_shared_task_counts(stem):
    in_file, kept, num_choices, label_names = SHARED_TASKS[stem]
    path = BIGBENCH_DIR / f"{stem}.json"
    assert len(json.loads(path.read_text())["examples"]) == in_file
    task = load_bigbench(path, drop_mismatched_choices=True)
    assert len(task.examples) == kept
    assert task.num_choices == num_choices
    assert task.label_names == label_names
    assert all(len(example.choices) == num_choices for example in task.examples)
    assert task.source == str(path)


@needs_shared
def test_social_iqa_mismatch_is_an_error_by_default():
    with pytest.raises(ValueError, match=r"has 2 choices but most rows have 3 \(4 of 1954.*drop_mismatched_choices"):
        load_bigbench(BIGBENCH_DIR / "social_iqa.json")


@needs_shared
def test_social_iqa_first_example_and_file_indices():
    task = load_bigbench(BIGBENCH_DIR / "social_iqa.json", drop_mismatched_choices=True)
    first = task.examples[0]
    assert first.choices == ("Make a new plan", "Go home and see Riley", "Find somewhere to go")
    assert first.label == 2
    assert first.question.startswith("Tracy didn't go home")
    raw = json.loads((BIGBENCH_DIR / "social_iqa.json").read_text())["examples"]
    assert len(task.file_indices) == 1950
    assert [i for i, e in enumerate(raw) if len(e["target_scores"]) != 3] == sorted(
        set(range(1954)) - set(task.file_indices)
    )


@needs_shared
def test_task_prefix_is_kept():
    task = load_bigbench(BIGBENCH_DIR / "winowhy.json")
    assert task.task_prefix == "Please answer the following questions about which words certain pronouns refer to.\n"


@pytest.mark.parametrize("num_choices", range(2, 8))
def test_synthetic_task_with_k_choices(tmp_path, num_choices):
    examples = [
        {"input": f"question {i}", "target_scores": {f"q{i} choice {c}": int(c == i % num_choices) for c in range(num_choices)}}
        for i in range(3 * num_choices)
    ]
    task = load_bigbench(write_task(tmp_path, examples, task_prefix="Pick one.\n"))
    assert isinstance(task, MultipleChoiceTask)
    assert task.name == "synthetic" and task.num_choices == num_choices and task.task_prefix == "Pick one.\n"
    assert task.labels == [i % num_choices for i in range(3 * num_choices)]
    assert task.examples[1] == MultipleChoiceExample(
        question="question 1", choices=tuple(f"q1 choice {c}" for c in range(num_choices)), label=1 % num_choices
    )
    assert task.label_names is None  # choice texts differ between examples


def test_label_names_when_choices_are_fixed(tmp_path):
    examples = [{"input": "x", "target_scores": {"Yes": 1, "No": 0}}, {"input": "y", "target_scores": {"Yes": 0, "No": 1}}]
    task = load_bigbench(write_task(tmp_path, examples))
    assert task.label_names == ("Yes", "No") and task.labels == [0, 1]


def test_label_names_none_when_order_differs(tmp_path):
    examples = [{"input": "x", "target_scores": {"Yes": 1, "No": 0}}, {"input": "y", "target_scores": {"No": 1, "Yes": 0}}]
    assert load_bigbench(write_task(tmp_path, examples)).label_names is None


def test_drop_mismatched_choices(tmp_path):
    three = {"a": 1, "b": 0, "c": 0}
    examples = [{"input": "1", "target_scores": three}, {"input": "2", "target_scores": {"a": 0, "b": 1}},
                {"input": "3", "target_scores": three}]
    path = write_task(tmp_path, examples)
    with pytest.raises(ValueError, match=r"row 1 has 2 choices but most rows have 3.*--drop-mismatched-choices"):
        load_bigbench(path)
    task = load_bigbench(path, drop_mismatched_choices=True)
    assert [e.question for e in task.examples] == ["1", "3"] and task.file_indices == (0, 2)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json {", r"task\.json is not valid JSON"),
        (json.dumps([1, 2]), r"has no 'examples' list"),
        (json.dumps({"name": "prog", "description": "programmatic"}), r"has no 'examples' list.*programmatic"),
        (json.dumps({"examples": []}), r"'examples' is empty"),
        (json.dumps({"examples": [{"target_scores": {"a": 1, "b": 0}}]}), r"examples\[0\] has no 'input' field"),
        (json.dumps({"examples": [{"input": "q", "target": "a"}]}), r"examples\[0\] has no 'target_scores' field.*generative"),
        (json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0.5}}]}), r"values must be 0 or 1.*'b': 0\.5"),
        (json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1, "b": 1}}]}), r"exactly one choice correct.*found 2"),
        (json.dumps({"examples": [{"input": "q", "target_scores": {"a": 0, "b": 0}}]}), r"exactly one choice correct.*found 0"),
        (json.dumps({"examples": [{"input": "q", "target_scores": {"a": 1}}]}), r"has 1 choice\(s\).*at least 2"),
        (json.dumps({"examples": [{"input": "q", "target_scores": ["a", "b"]}]}), r"must be an object"),
    ],
)
def test_malformed_files(tmp_path, content, match):
    path = tmp_path / "task.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_bigbench(path)


def test_task_validates_num_choices():
    example = MultipleChoiceExample(question="q", choices=("a", "b", "c"), label=0)
    with pytest.raises(ValueError, match=r"example 0 has 3 choices, expected num_choices=2"):
        MultipleChoiceTask(name="t", examples=[example], num_choices=2, source="mem")
