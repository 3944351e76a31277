"""Local tables (jsonl / json / csv / parquet) as multiple-choice tasks, read with ``datasets``.

A :class:`ColumnMapping` says which column holds what:

* ``question`` (alias ``text``): the input text. Default: the first of ``question``, ``text``,
  ``input``, ``sentence`` that the table has.
* ``choices``: one list column (``["x", "y"]``, or a hub-style ``{"text": [...], "label": [...]}``), or
  several string columns, one choice each (``option1|option2``). Default: a column named ``choices``.
  Without choices the task is text classification: the classes are ``label_names`` (or the sorted
  distinct text labels) and every example gets them as its choices.
* ``label``: the gold answer, as a 0-based integer index, a letter ``A``, ``B``, ... (``A`` = the first
  choice), or the text of the correct choice. Default: the first of ``label``, ``answer``, ``target``.
* ``label_names``: fixed class names for text classification (``negative|positive``); integer labels
  index them.

On the command line: ``--column-mapping "question=sentence,choices=option1|option2,label=answer"``.
Every malformed input (missing column, empty value, label of the wrong type or out of range, choice
counts that differ, no rows) raises ``ValueError`` naming the file, the row, the column and the fix.
Tables have no split: the run makes a seeded stratified one (:func:`blob_pyro.data.stratified_split`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from blob_pyro.data.examples import (
    MultipleChoiceExample,
    MultipleChoiceTask,
    keep_common_choice_count,
    shared_choices,
)
from blob_pyro.data.prompts import ANSWER_LETTERS

__all__ = ["ColumnMapping", "TABLE_FORMATS", "load_tabular", "read_table", "table_format", "label_index"]

TABLE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> ``datasets`` builder name."""

_QUESTION_DEFAULTS = ("question", "text", "input", "sentence")
_LABEL_DEFAULTS = ("label", "answer", "target")
_MAPPING_KEYS = ("question", "text", "choices", "label", "label_names")
_MAPPING_HELP = "e.g. --column-mapping 'question=sentence,choices=option1|option2,label=answer'"


@dataclass(frozen=True)
class ColumnMapping:
    """Which table columns hold the question, the choices and the label (``None``: the defaults)."""

    question: str | None = None
    choices: tuple[str, ...] | None = None
    label: str | None = None
    label_names: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, text: str | None) -> ColumnMapping:
        """Parse ``"question=q,choices=a|b,label=y,label_names=neg|pos"`` (``text=`` is ``question=``)."""
        if not text or not text.strip():
            return cls()
        values: dict[str, Any] = {}
        for item in text.split(","):
            key, sep, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"column mapping item {item!r} is not key=column; {_MAPPING_HELP}.")
            if key not in _MAPPING_KEYS:
                raise ValueError(f"column mapping key {key!r} is unknown; keys are {list(_MAPPING_KEYS)}; {_MAPPING_HELP}.")
            key = "question" if key == "text" else key
            if key in values:
                raise ValueError(f"column mapping names {key!r} twice in {text!r}; give it once.")
            parts = tuple(part.strip() for part in value.split("|"))
            values[key] = parts if key in ("choices", "label_names") else value
        return cls(**values)


def table_format(path: str | os.PathLike[str], task_format: str = "auto") -> str:
    """The ``datasets`` builder (``json``, ``csv``, ``parquet``) for ``path``."""
    if task_format != "auto":
        if task_format not in set(TABLE_FORMATS.values()):
            raise ValueError(f"table format {task_format!r} is unknown; use one of {sorted(set(TABLE_FORMATS.values()))}.")
        return task_format
    suffix = Path(path).suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(
            f"{path}: cannot tell the table format from the suffix {suffix!r}; expected one of "
            f"{sorted(TABLE_FORMATS)} or pass --task-format json|csv|parquet."
        )
    return TABLE_FORMATS[suffix]


def read_table(files: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *, builder: str):
    """Rows of local ``files`` as a ``datasets.Dataset``, via ``datasets.load_dataset(builder, data_files=...)``."""
    import datasets

    paths = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist; pass an existing {builder} file.")
        if Path(path).stat().st_size == 0:
            raise ValueError(f"{path} is empty (0 bytes); a task needs at least one row.")
        if builder == "parquet":  # datasets cannot read a 0-row parquet file; say what is wrong instead
            import pyarrow.parquet

            if pyarrow.parquet.ParquetFile(path).metadata.num_rows == 0:
                raise ValueError(f"{path}: the table has no rows; a task needs at least one example.")
    try:
        return datasets.load_dataset(builder, data_files=paths, split="train")
    except ValueError as error:
        if "corresponds to no data" not in str(error):
            raise ValueError(f"{', '.join(paths)}: cannot be read as {builder} ({error}); check the file.") from error
        raise ValueError(f"{', '.join(paths)}: the table has no rows; a task needs at least one example.") from error
    except Exception as error:  # datasets raises many types (ArrowInvalid, DatasetGenerationError, ...)
        raise ValueError(
            f"{', '.join(paths)}: cannot be read as {builder} ({type(error).__name__}: {error}); check the file "
            "or pass the right --task-format."
        ) from error


def _pick_column(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], *, key: str, source: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"{source}: no column {wanted!r} for {key!r} (column mapping); the columns are {list(columns)}. "
                f"Fix the column mapping, {_MAPPING_HELP}."
            )
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise ValueError(
        f"{source}: no {key} column: none of the default names {list(defaults)} is present; the columns are "
        f"{list(columns)}. Name it with --column-mapping {key}=<column>."
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _text(value: Any, *, where: str, column: str) -> str:
    if _is_missing(value):
        raise ValueError(f"{where}: column {column!r} is empty (null); fill the value or remove the row.")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: column {column!r} must hold text, found {type(value).__name__} {value!r}.")
    text = str(value)
    if not text.strip():
        raise ValueError(f"{where}: column {column!r} is an empty string; fill the value or remove the row.")
    return text


def label_index(value: Any, choices: Sequence[str], *, where: str, column: str) -> int:
    """Index of the gold choice given as a 0-based int, a letter ``A``.., or the choice's text.

    Raises:
        ValueError: For a missing value, a bool or other type, an index out of range or a text that is
            neither a choice nor an answer letter of this example.
    """
    k = len(choices)
    if _is_missing(value):
        raise ValueError(f"{where}: label column {column!r} is empty (null); every row needs a label (remove unlabelled rows, e.g. a test split).")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # csv readers turn an int column with gaps into floats
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(
            f"{where}: label column {column!r} holds {type(value).__name__} {value!r}; expected a 0-based integer "
            f"index (0..{k - 1}), an answer letter ({ANSWER_LETTERS[0]}..{ANSWER_LETTERS[min(k, len(ANSWER_LETTERS)) - 1]}) "
            "or the text of the correct choice. Convert the column (e.g. booleans to class names with label_names)."
        )
    if isinstance(value, int):
        if not 0 <= value < k:
            raise ValueError(
                f"{where}: label {value} in column {column!r} is out of range for {k} choices; integer labels are "
                f"0-based indices 0..{k - 1} (subtract 1 if the file counts from 1)."
            )
        return value
    if value in choices:
        return list(choices).index(value)
    stripped = value.strip()
    if stripped in choices:
        return list(choices).index(stripped)
    if len(stripped) == 1 and stripped in ANSWER_LETTERS[:k]:
        return ANSWER_LETTERS.index(stripped)
    raise ValueError(
        f"{where}: label {value!r} in column {column!r} is neither one of the choices {list(choices)} nor an answer "
        f"letter {ANSWER_LETTERS[0]}..{ANSWER_LETTERS[min(k, len(ANSWER_LETTERS)) - 1]}; fix the label or the column mapping."
    )


def _choices_of(row: Mapping[str, Any], columns: tuple[str, ...], *, where: str) -> tuple[str, ...]:
    if len(columns) > 1:
        return tuple(_text(row[c], where=where, column=c) for c in columns)
    (column,) = columns
    value = row[column]
    if isinstance(value, Mapping) and "text" in value:  # hub layout {"text": [...], "label": [...]}
        value = value["text"]
    if _is_missing(value) or not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{where}: column {column!r} must hold a list of choice texts, found {type(value).__name__} {value!r}. "
            "For one choice per column, map them with choices=col1|col2|...; for text classification drop "
            "'choices' and give label_names."
        )
    return tuple(_text(v, where=f"{where}: {column}[{i}]", column=column) for i, v in enumerate(value))


def _class_names(values: list[Any], *, source: str, column: str) -> tuple[str, ...]:
    present = [v for v in values if not _is_missing(v)]
    if present and all(isinstance(v, str) for v in present):
        return tuple(sorted(set(present)))
    raise ValueError(
        f"{source}: the table has no choices column, so the classes come from the label column {column!r}, which "
        "holds non-text labels; name the classes with --column-mapping label_names=<name0>|<name1>|... (integer "
        "labels index them) or map a choices column."
    )


def load_tabular(
    path: str | os.PathLike[str],
    *,
    mapping: ColumnMapping | str | None = None,
    task_format: str = "auto",
    drop_mismatched_choices: bool = False,
    name: str | None = None,
) -> MultipleChoiceTask:
    """Read a local jsonl / json / csv / parquet table as a :class:`MultipleChoiceTask`.

    Args:
        path: The table file.
        mapping: Column mapping (a :class:`ColumnMapping` or its ``key=column,...`` text); ``None`` uses
            the default column names.
        task_format: ``"auto"`` (from the suffix), ``"json"`` (also jsonl), ``"csv"`` or ``"parquet"``.
        drop_mismatched_choices: Keep only the rows with the most common number of choices instead of
            raising; ``task.file_indices`` records the kept rows.
        name: Task name (default: the file stem).

    Returns:
        The task, without splits (the run makes a seeded stratified one).
    """
    path = Path(path)
    if isinstance(mapping, str) or mapping is None:
        mapping = ColumnMapping.parse(mapping)
    table = read_table(path, builder=table_format(path, task_format))
    source = str(path)
    if len(table) == 0:
        raise ValueError(f"{source}: the table has no rows; a task needs at least one example.")
    columns = table.column_names
    question_column = _pick_column(columns, mapping.question, _QUESTION_DEFAULTS, key="question", source=source)
    label_column = _pick_column(columns, mapping.label, _LABEL_DEFAULTS, key="label", source=source)
    if mapping.choices is not None:
        for column in mapping.choices:
            _pick_column(columns, column, (), key="choices", source=source)
        choice_columns: tuple[str, ...] | None = mapping.choices
    elif "choices" in columns and mapping.label_names is None:
        choice_columns = ("choices",)
    else:
        choice_columns = None
    rows = table.to_list()
    classes = None
    if choice_columns is None:
        classes = mapping.label_names or _class_names([r[label_column] for r in rows], source=source, column=label_column)
        if len(classes) < 2:
            raise ValueError(
                f"{source}: text classification needs at least 2 classes, found {list(classes)} in column "
                f"{label_column!r}; check the labels or give label_names."
            )
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}: row {i}"
        question = _text(row[question_column], where=where, column=question_column)
        choices = classes if classes is not None else _choices_of(row, choice_columns, where=where)
        if len(choices) < 2:
            raise ValueError(f"{where}: {len(choices)} choice(s) {list(choices)}; a multiple-choice example needs at least 2.")
        label = label_index(row[label_column], choices, where=where, column=label_column)
        examples.append(MultipleChoiceExample(question=question, choices=tuple(choices), label=label))
    kept_examples, kept, num_choices = keep_common_choice_count(
        examples, source=source, drop_mismatched_choices=drop_mismatched_choices
    )
    return MultipleChoiceTask(
        name=name or path.stem,
        examples=kept_examples,
        num_choices=num_choices,
        source=source,
        label_names=shared_choices(kept_examples),
        file_indices=kept,
    )
