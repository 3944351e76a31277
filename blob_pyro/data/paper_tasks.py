"""The BLoB paper's benchmarks (Wang et al., 2024, section 4) as named tasks.

Each :class:`PaperTask` fixes the Hugging Face hub id and config, the mapping of a hub row to a lettered
multiple-choice prompt (:class:`~blob_pyro.data.MultipleChoiceExample`), the answer-label tokens
(``" A"``, ``" B"``, ...: the causal-LM likelihood reads their logits after ``"Answer:"``) and which hub
split is trained on and which is evaluated:

==========================  ======================  ================  =======  ==========  ===
task (``paper:<name>``)     hub id                  config            train    evaluated   K
==========================  ======================  ================  =======  ==========  ===
winogrande_s                allenai/winogrande      winogrande_s      train    validation  2
winogrande_m                allenai/winogrande      winogrande_m      train    validation  2
arc_challenge               allenai/ai2_arc         ARC-Challenge     train    validation  4
arc_easy                    allenai/ai2_arc         ARC-Easy          train    validation  4
openbookqa                  allenai/openbookqa      main              train    validation  4
boolq                       google/boolq            (none)            train    validation  2
mmlu_college_chemistry      cais/mmlu               college_chemistry (none)   test        4
mmlu_college_physics        cais/mmlu               college_physics   (none)   test        4
==========================  ======================  ================  =======  ==========  ===

In-distribution runs train on ``train`` and evaluate on ``validation`` (the hub test splits of
WinoGrande, ARC, OBQA and BoolQ are unlabelled or held out, as in the paper). The OOD protocol trains
on OpenBookQA and evaluates, without training, on ARC-C, ARC-E (small shift) and the MMLU subjects
(large shift, their ``test`` split; MMLU is evaluation-only). ARC has a few 3- and 5-choice questions:
as in the BIG-bench loader, ``drop_mismatched_choices=True`` keeps the 4-choice ones, else it is an error.

Loading: without ``data_dir``, ``datasets.load_dataset(hub_id, config, split=...)`` (needs internet).
With ``data_dir``, local files in the hub's schema are read with ``datasets.load_dataset("parquet" |
"json" | "csv", data_files=...)`` from ``<data_dir>/<task name>/``, ``<data_dir>/<config>/`` or
``<data_dir>/``: ``<split>.jsonl``, ``<split>.json``, ``<split>.parquet``, ``<split>.csv`` or the
hub's own shard names ``<split>-00000-of-00001.parquet``. To make them on a machine with internet::

    datasets.load_dataset("allenai/ai2_arc", "ARC-Easy", split="validation").to_json("arc_easy/validation.jsonl")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from blob_pyro.data.examples import MultipleChoiceExample, MultipleChoiceTask, keep_common_choice_count, shared_choices
from blob_pyro.data.prompts import answer_label_strings
from blob_pyro.data.tabular import TABLE_FORMATS, label_index, read_table

__all__ = ["PAPER_TASKS", "PaperTask", "load_paper_task", "paper_task", "find_split_files"]

SELECT_PREFIX = "Select one of the choices that answers the following question.\n"
WINOGRANDE_PREFIX = "Choose the option that correctly fills the blank (_) in the sentence.\n"


def _require(row: Mapping[str, Any], fields: tuple[str, ...], *, where: str, task: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {missing} of the {task} schema (found {sorted(row)}); local files for "
            f"paper:{task} must keep the hub's column names {list(fields)}."
        )
    empty = [f for f in fields if row[f] is None]
    if empty:
        raise ValueError(f"{where}: field(s) {empty} are null; fill them or remove the row (test splits are unlabelled).")


def _str(row: Mapping[str, Any], field: str, *, where: str) -> str:
    value = row[field]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {field!r} must be a non-empty string, found {type(value).__name__} {value!r}.")
    return value


def _winogrande(row: Mapping[str, Any], where: str) -> MultipleChoiceExample:
    _require(row, ("sentence", "option1", "option2", "answer"), where=where, task="winogrande")
    choices = (_str(row, "option1", where=where), _str(row, "option2", where=where))
    answer = row["answer"]
    if isinstance(answer, bool) or str(answer).strip() not in ("1", "2"):
        raise ValueError(
            f"{where}: field 'answer' must be '1' (option1) or '2' (option2), found {answer!r}; the hub's test split "
            "is unlabelled: evaluate on validation."
        )
    return MultipleChoiceExample(_str(row, "sentence", where=where), choices, int(str(answer).strip()) - 1)


def _hub_choices(row: Mapping[str, Any], answer_field: str, *, where: str) -> tuple[tuple[str, ...], int]:
    """ARC/OBQA ``choices = {"text": [...], "label": [...]}`` with the answer key among the labels."""
    choices = row["choices"]
    if not (isinstance(choices, Mapping) and isinstance(choices.get("text"), list) and isinstance(choices.get("label"), list)):
        raise ValueError(
            f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}} (the hub schema), found {choices!r}."
        )
    texts = tuple(str(t) for t in choices["text"])
    keys = [str(k).strip() for k in choices["label"]]
    if len(keys) != len(texts):
        raise ValueError(f"{where}: choices has {len(texts)} texts but {len(keys)} labels; they must pair up.")
    answer = row[answer_field]
    if not isinstance(answer, str) or answer.strip() not in keys:
        raise ValueError(
            f"{where}: field {answer_field!r} = {answer!r} is not one of the choice labels {keys}; fix the answer key."
        )
    return texts, keys.index(answer.strip())


def _arc(row: Mapping[str, Any], where: str) -> MultipleChoiceExample:
    _require(row, ("question", "choices", "answerKey"), where=where, task="ai2_arc")
    choices, label = _hub_choices(row, "answerKey", where=where)
    return MultipleChoiceExample(_str(row, "question", where=where), choices, label)


def _openbookqa(row: Mapping[str, Any], where: str) -> MultipleChoiceExample:
    _require(row, ("question_stem", "choices", "answerKey"), where=where, task="openbookqa")
    choices, label = _hub_choices(row, "answerKey", where=where)
    return MultipleChoiceExample(_str(row, "question_stem", where=where), choices, label)


BOOLQ_CHOICES = ("True", "False")


def _boolq(row: Mapping[str, Any], where: str) -> MultipleChoiceExample:
    _require(row, ("question", "passage", "answer"), where=where, task="boolq")
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"{where}: field 'answer' must be a boolean (true/false), found {type(answer).__name__} {answer!r}.")
    # The passage comes first, so left truncation of long prompts cuts the passage, never the question.
    question = f"{_str(row, 'passage', where=where).strip()}\nQuestion: {_str(row, 'question', where=where).strip()}?"
    return MultipleChoiceExample(question, BOOLQ_CHOICES, 0 if answer else 1)


def _mmlu(row: Mapping[str, Any], where: str) -> MultipleChoiceExample:
    _require(row, ("question", "choices", "answer"), where=where, task="mmlu")
    choices = row["choices"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: field 'choices' must be a list of strings, found {choices!r}.")
    label = label_index(row["answer"], choices, where=where, column="answer")
    return MultipleChoiceExample(_str(row, "question", where=where), tuple(choices), label)


@dataclass(frozen=True)
class PaperTask:
    """One benchmark of the paper: where it lives, how a row becomes a prompt, which splits play which role.

    Attributes:
        name: Task name, ``paper:<name>`` on the command line.
        hub_id: Hugging Face dataset id.
        config: Dataset config name (``None``: the default config).
        train_split: Hub split trained on (``None``: evaluation-only, e.g. MMLU).
        eval_split: Hub split evaluated on.
        num_choices: Answer options K; the label tokens are ``answer_label_strings(K)``.
        to_example: ``(row, where) -> MultipleChoiceExample``; raises ``ValueError`` naming ``where``.
        fields: Hub columns the prompt reads; local files must have them.
        task_prefix: Instruction prepended to every prompt.
        role: ``"in-distribution"`` or ``"ood"`` (evaluation-only shift set).
    """

    name: str
    hub_id: str
    config: str | None
    train_split: str | None
    eval_split: str
    num_choices: int
    to_example: Callable[[Mapping[str, Any], str], MultipleChoiceExample]
    fields: tuple[str, ...] = ()
    task_prefix: str = SELECT_PREFIX
    role: str = "in-distribution"

    @property
    def label_tokens(self) -> list[str]:
        """Answer-label strings whose next-token logits are the class logits: ``[" A", " B", ...]``."""
        return answer_label_strings(self.num_choices)

    def split_name(self, role: str) -> str:
        """Hub split playing ``role`` (``"train"`` or ``"validation"``)."""
        if role == "validation":
            return self.eval_split
        if self.train_split is None:
            raise ValueError(
                f"paper:{self.name} is evaluation-only (no training split; the paper uses it for OOD evaluation); "
                "train on another task and pass it to --eval-tasks."
            )
        return self.train_split


WINOGRANDE_FIELDS = ("sentence", "option1", "option2", "answer")
ARC_FIELDS = ("question", "choices", "answerKey")
OBQA_FIELDS = ("question_stem", "choices", "answerKey")
BOOLQ_FIELDS = ("question", "passage", "answer")
MMLU_FIELDS = ("question", "choices", "answer")

PAPER_TASKS: dict[str, PaperTask] = {
    task.name: task
    for task in [
        PaperTask("winogrande_s", "allenai/winogrande", "winogrande_s", "train", "validation", 2, _winogrande,
                  WINOGRANDE_FIELDS, WINOGRANDE_PREFIX),
        PaperTask("winogrande_m", "allenai/winogrande", "winogrande_m", "train", "validation", 2, _winogrande,
                  WINOGRANDE_FIELDS, WINOGRANDE_PREFIX),
        PaperTask("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "train", "validation", 4, _arc, ARC_FIELDS),
        PaperTask("arc_easy", "allenai/ai2_arc", "ARC-Easy", "train", "validation", 4, _arc, ARC_FIELDS),
        PaperTask("openbookqa", "allenai/openbookqa", "main", "train", "validation", 4, _openbookqa, OBQA_FIELDS),
        PaperTask("boolq", "google/boolq", None, "train", "validation", 2, _boolq, BOOLQ_FIELDS,
                  "Answer the question about the passage with True or False.\n"),
        PaperTask("mmlu_college_chemistry", "cais/mmlu", "college_chemistry", None, "test", 4, _mmlu, MMLU_FIELDS, role="ood"),
        PaperTask("mmlu_college_physics", "cais/mmlu", "college_physics", None, "test", 4, _mmlu, MMLU_FIELDS, role="ood"),
    ]
}


def paper_task(name: str) -> PaperTask:
    """The :class:`PaperTask` called ``name``; the error lists the valid names."""
    if name not in PAPER_TASKS:
        raise ValueError(f"unknown paper task {name!r}; paper tasks are {sorted(PAPER_TASKS)} (use paper:<name>).")
    return PAPER_TASKS[name]


def find_split_files(spec: PaperTask, split: str, data_dir: str | os.PathLike[str]) -> tuple[list[Path], str]:
    """Local files of ``split`` for ``spec`` under ``data_dir`` and their ``datasets`` builder.

    Looks in ``<data_dir>/<name>``, ``<data_dir>/<config>`` and ``<data_dir>`` for ``<split>.<ext>`` or
    ``<split>-*.<ext>`` (ext in jsonl, json, parquet, csv); the first folder with a match wins.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--data-dir {root} is not a directory; pass the folder holding the task's split files.")
    folders = [root / spec.name] + ([root / spec.config] if spec.config else []) + [root]
    for folder in folders:
        for suffix, builder in TABLE_FORMATS.items():
            files = sorted(folder.glob(f"{split}{suffix}")) + sorted(folder.glob(f"{split}-*{suffix}"))
            if files:
                return files, builder
    raise FileNotFoundError(
        f"no local file for split {split!r} of paper:{spec.name} under {[str(f) for f in folders]}; expected "
        f"{split}.jsonl, {split}.json, {split}.parquet, {split}.csv or {split}-00000-of-00001.parquet in the hub's "
        f"schema. Make it where there is internet: datasets.load_dataset({spec.hub_id!r}"
        f"{', ' + repr(spec.config) if spec.config else ''}, split={split!r}).to_json('{spec.name}/{split}.jsonl')."
    )


def _hub_rows(spec: PaperTask, split: str):
    import datasets

    try:
        return datasets.load_dataset(spec.hub_id, spec.config, split=split)
    except Exception as error:  # offline: ConnectionError, DatasetNotFoundError, ...
        raise OSError(
            f"cannot load {spec.hub_id!r} (config {spec.config!r}, split {split!r}) from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Offline, pass --data-dir with local files in the hub's schema "
            f"(see blob_pyro.data.paper_tasks)."
        ) from error


def load_paper_task(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    roles: tuple[str, ...] = ("train", "validation"),
    drop_mismatched_choices: bool = False,
) -> MultipleChoiceTask:
    """Load a paper task with its own splits.

    Args:
        name: A key of :data:`PAPER_TASKS`, e.g. ``"arc_easy"``.
        data_dir: Folder of local files in the hub schema; ``None`` loads from the hub.
        roles: Which splits to load: ``"train"`` (the hub's training split) and/or ``"validation"`` (the
            evaluated split). Evaluation-only tasks (MMLU) have no ``"train"``; asking for it raises.
        drop_mismatched_choices: Keep the examples with the task's K choices and drop the others (ARC's
            few 3- and 5-choice questions) instead of raising.

    Returns:
        A :class:`MultipleChoiceTask` whose ``examples`` are the requested splits concatenated in
        ``roles`` order; ``splits`` maps each role to its positions; ``file_indices`` are row numbers in
        the concatenation of the loaded splits' rows (roles order, file order), so a recorded split stays
        valid when examples with other choice counts are dropped.
    """
    spec = paper_task(name)
    examples: list[MultipleChoiceExample] = []
    rows_of: list[tuple[str, int]] = []
    sources = []
    for role in roles:
        split = spec.split_name(role)
        if data_dir is None:
            table, source = _hub_rows(spec, split), f"{spec.hub_id}[{spec.config or 'default'}]/{split}"
        else:
            files, builder = find_split_files(spec, split, data_dir)
            table, source = read_table(files, builder=builder), ", ".join(str(f) for f in files)
        if len(table) == 0:
            raise ValueError(f"{source}: split {split!r} of paper:{name} has no rows; a split needs at least one example.")
        missing = [f for f in spec.fields if f not in table.column_names]
        if missing:
            raise ValueError(
                f"{source}: missing column(s) {missing} of the {spec.hub_id} schema (columns: {table.column_names}); "
                f"local files for paper:{name} must keep the hub's column names {list(spec.fields)}."
            )
        sources.append(source)
        for i, row in enumerate(table):
            examples.append(spec.to_example(row, f"{source}: row {i}"))
            rows_of.append((role, i))
    kept_examples, kept, num_choices = keep_common_choice_count(
        examples, source=f"paper:{name} ({'; '.join(sources)})", drop_mismatched_choices=drop_mismatched_choices
    )
    if num_choices != spec.num_choices:
        raise ValueError(
            f"paper:{name}: most examples have {num_choices} choices, expected {spec.num_choices}; are the files "
            "from another dataset?"
        )
    splits = {role: tuple(p for p, k in enumerate(kept) if rows_of[k][0] == role) for role in roles}
    for role, positions in splits.items():
        if not positions:
            raise ValueError(f"paper:{name}: no {role} example has {num_choices} choices; check the {role} files.")
    described = ", ".join(f"{role} = hub split {spec.split_name(role)!r} ({sum(1 for r in rows_of if r[0] == role)} rows)" for role in roles)
    return MultipleChoiceTask(
        name=name,
        examples=kept_examples,
        num_choices=num_choices,
        source="; ".join(sources),
        task_prefix=spec.task_prefix,
        label_names=shared_choices(kept_examples),
        file_indices=kept,
        splits=splits,
        split_procedure=f"{spec.hub_id} ({spec.config or 'default'}): {described}, rows concatenated in that order",
    )

