"""BIG-bench prompt fields (task_prefix, example_input_prefix, example_output_prefix, choice_prefix,
append_choices_to_input) reach the tokenized prompts of every scoring protocol."""

import json

import pytest

from blob_pyro.data import (
    DEFAULT_FORMAT,
    PromptFormat,
    choice_likelihood_prompt,
    classification_text,
    encode_multiple_choice,
    load_bigbench,
)
from blob_pyro.data.choice_scoring import encode_choice_continuations

from tests.conftest import BIGBENCH_DIR

EXAMPLES = [
    {"input": "Is snow cold?", "target_scores": {"yes": 1, "no": 0}},
    {"input": "Is fire cold?", "target_scores": {"yes": 0, "no": 1}},
]


def _write(tmp_path, **fields):
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": EXAMPLES, **fields}))
    return path


def test_every_prompt_field_is_honoured_in_choice_likelihood_prompts(tmp_path):
    task = load_bigbench(_write(
        tmp_path, task_prefix="Quiz.\n", example_input_prefix="Q: ", example_output_prefix="\nThe answer is ",
        choice_prefix="\n- ", append_choices_to_input=True,
    ))
    text = choice_likelihood_prompt(task.examples[0], task_prefix=task.task_prefix, prompt_format=task.prompt_format)
    # trailing space of the output prefix dropped: the continuation is " yes"
    assert text == "Quiz.\nQ: Is snow cold?\n- yes\n- no\nThe answer is"


def test_unset_fields_keep_the_package_layout(tmp_path):
    task = load_bigbench(_write(tmp_path))
    assert task.prompt_format == DEFAULT_FORMAT
    assert choice_likelihood_prompt(task.examples[0], prompt_format=task.prompt_format) == "Is snow cold?\nAnswer:"
    appended = load_bigbench(_write(tmp_path, append_choices_to_input=True))  # BIG-bench's default choice prefix
    assert choice_likelihood_prompt(appended.examples[1], prompt_format=appended.prompt_format) == (
        "Is fire cold?\n choice: yes\n choice: no\nAnswer:"
    )


def test_prompt_fields_reach_the_tokens_of_all_protocols(tmp_path, byte_tokenizer):
    task = load_bigbench(_write(tmp_path, example_input_prefix="Q: ", example_output_prefix="\nSo:"))
    decode = lambda ids: byte_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    cloze = encode_choice_continuations(task.examples, byte_tokenizer, prompt_format=task.prompt_format)
    assert decode(cloze.prompts[0]) == "Q: Is snow cold?\nSo:"
    assert [decode(c) for c in cloze.continuations[0]] == [" yes", " no"]
    letters = encode_multiple_choice(task.examples, byte_tokenizer, prompt_format=task.prompt_format)
    assert decode(letters.input_ids[0]) == "Q: Is snow cold?\nA. yes\nB. no\nAnswer:"  # letters fix cue and list
    assert classification_text(task.examples[0], prompt_format=task.prompt_format) == "Q: Is snow cold?"


@pytest.mark.skipif(not BIGBENCH_DIR.is_dir(), reason=f"shared BIG-bench data not found at {BIGBENCH_DIR}")
def test_winowhy_output_prefix_is_used():
    task = load_bigbench(BIGBENCH_DIR / "winowhy.json")
    prompt = choice_likelihood_prompt(task.examples[0], task_prefix=task.task_prefix, prompt_format=task.prompt_format)
    assert prompt.startswith("Please answer the following questions about which words certain pronouns refer to.\n\n")
    assert prompt.endswith("\nThe above reasoning is")


@pytest.mark.parametrize("field,value", [("example_output_prefix", 3), ("choice_prefix", ["x"]),
                                         ("task_prefix", None), ("append_choices_to_input", "yes")])
def test_malformed_prompt_fields_name_the_file_and_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=field) as error:
        load_bigbench(_write(tmp_path, **{field: value}))
    assert "task.json" in str(error.value)


def test_prompt_format_defaults():
    fmt = PromptFormat()
    assert fmt.answer_cue() == "\nAnswer:" and fmt.listed_choices(("a", "b")) == ""


def test_choices_are_listed_in_choice_likelihood_prompts_only_with_list_choices(tmp_path, byte_tokenizer):
    from blob_pyro.assembly import encode_examples
    from blob_pyro.config import TrainConfig

    task = load_bigbench(_write(tmp_path, append_choices_to_input=True, choice_prefix="\n* "))
    decode = lambda ids: byte_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    plain = encode_examples(TrainConfig(), task, byte_tokenizer, task.examples)
    listed = encode_examples(TrainConfig(list_choices=True), task, byte_tokenizer, task.examples)
    assert decode(plain.prompts[0]) == "Is snow cold?\nAnswer:"
    assert decode(listed.prompts[0]) == "Is snow cold?\n* yes\n* no\nAnswer:"
