"""Loader for BIG-bench JSON multiple-choice tasks (``task.json`` of a BIG-bench task folder).

Format (https://github.com/google/BIG-bench, ``docs/doc.md``)::

    {"examples": [{"input": str, "target_scores": {choice_text: 0 or 1, ...}}, ...],
     "task_prefix"?, "example_input_prefix"?, "example_output_prefix"?, "choice_prefix"?,
     "append_choices_to_input"?}

Every prompt field the file sets is honoured (:class:`blob_pyro.data.prompts.PromptFormat`):
``task_prefix`` once before each prompt, ``example_input_prefix`` before the question,
``append_choices_to_input`` / ``choice_prefix`` list the choices (choice-likelihood scoring), and
``example_output_prefix`` replaces our ``"\nAnswer:"`` cue (e.g. winowhy's ``"\nThe above reasoning is"``
followed by `` correct`` / `` incorrect``). Fields the file does not set take this package's layout,
not BIG-bench's implicit ``"\nQ: "``/``"\nA: "``. The lettered protocol (``--answer-scoring letters``)
always lists the choices as ``A. ...`` and ends with ``"Answer:"``: its class tokens are the letters.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from blob_pyro.data.examples import MultipleChoiceExample, MultipleChoiceTask, keep_common_choice_count
from blob_pyro.data.prompts import PromptFormat

_STRING_FIELDS = ("task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix")


def _prompt_format(data: dict, path: Path) -> PromptFormat:
    for name in _STRING_FIELDS:
        if name in data and not isinstance(data[name], str):
            raise ValueError(f"{path}: {name!r} must be a string, found {type(data[name]).__name__}; fix or remove the field.")
    append = data.get("append_choices_to_input", False)
    if not isinstance(append, bool):
        raise ValueError(f"{path}: 'append_choices_to_input' must be true or false, found {append!r}.")
    return PromptFormat(
        input_prefix=data.get("example_input_prefix", ""),
        output_prefix=data.get("example_output_prefix"),
        choice_prefix=data.get("choice_prefix"),
        append_choices=append,
    )


def _parse_example(raw: Any, *, index: int, path: Path) -> MultipleChoiceExample:
    where = f"{path}: examples[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object with 'input' and 'target_scores', found {type(raw).__name__}.")
    for field in ("input", "target_scores"):
        if field not in raw:
            hint = (
                " (it has 'target' only: a generative task, not multiple choice; pick a task with target_scores)"
                if field == "target_scores" and "target" in raw
                else ""
            )
            raise ValueError(
                f"{where} has no {field!r} field{hint}; every example needs 'input' (str) and "
                f"'target_scores' ({{choice_text: 0 or 1}})."
            )
    question, scores = raw["input"], raw["target_scores"]
    if not isinstance(question, str):
        raise ValueError(f"{where}['input'] must be a string, found {type(question).__name__}.")
    if not isinstance(scores, dict):
        raise ValueError(
            f"{where}['target_scores'] must be an object {{choice_text: 0 or 1}}, found {type(scores).__name__}."
        )
    if len(scores) < 2:
        raise ValueError(
            f"{where}['target_scores'] has {len(scores)} choice(s); a multiple-choice example needs at least 2. "
            "Fix or remove the example."
        )
    bad = {choice: score for choice, score in scores.items() if isinstance(score, bool) or score not in (0, 1)}
    if bad:
        raise ValueError(
            f"{where}['target_scores'] values must be 0 or 1, found {bad!r}; graded (partial-credit) scores "
            "are not supported: mark exactly one choice 1 and the others 0."
        )
    correct = [i for i, score in enumerate(scores.values()) if score == 1]
    if len(correct) != 1:
        raise ValueError(
            f"{where}['target_scores'] must mark exactly one choice correct (score 1), found {len(correct)}: "
            f"{scores!r}. Fix the example or remove it from the file."
        )
    return MultipleChoiceExample(question=question, choices=tuple(scores), label=correct[0])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); expected a BIG-bench task.json with an 'examples' list."
        ) from error
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        found = sorted(data)[:10] if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path} has no 'examples' list (found {found}). Expected a BIG-bench JSON task "
            "{'examples': [{'input': ..., 'target_scores': {...}}]}; programmatic BIG-bench tasks "
            "(task.py) and other formats are not supported."
        )
    return data


def load_bigbench(path: str | os.PathLike[str], *, drop_mismatched_choices: bool = False) -> MultipleChoiceTask:
    """Read a BIG-bench JSON multiple-choice task.

    Choice order is the key order of ``target_scores``; the label is the choice with score 1.

    Args:
        path: The task's JSON file.
        drop_mismatched_choices: Keep only the examples whose number of choices equals the most common
            count (e.g. the 1,950 three-choice examples of social_iqa out of 1,954). Default ``False``
            raises instead, so that data never disappears silently. ``task.file_indices`` records
            where each kept example sits in the file.

    Returns:
        The task; ``label_names`` is the choice tuple when every example has the same choices in the
        same order (e.g. strategyqa's ``("Yes", "No")``), else ``None``.

    Raises:
        ValueError: On malformed files or examples, with the file, the field and the fix.
    """
    path = Path(path)
    data = _read_json(path)
    raw_examples = data["examples"]
    if not raw_examples:
        raise ValueError(f"{path}: 'examples' is empty; a task needs at least one example.")
    examples = [_parse_example(raw, index=i, path=path) for i, raw in enumerate(raw_examples)]

    examples, file_indices, num_choices = keep_common_choice_count(
        examples, source=str(path), drop_mismatched_choices=drop_mismatched_choices
    )

    choice_sets = {example.choices for example in examples}
    label_names = next(iter(choice_sets)) if len(choice_sets) == 1 else None
    prompt_format = _prompt_format(data, path)
    task_prefix = data.get("task_prefix", "")
    return MultipleChoiceTask(
        name=str(data.get("name") or path.stem),
        examples=examples,
        num_choices=num_choices,
        source=str(path),
        task_prefix=task_prefix,
        label_names=label_names,
        file_indices=file_indices,
        prompt_format=prompt_format,
    )
