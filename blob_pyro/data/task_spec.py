"""One resolver for every way of naming a task on the command line (``--task``, ``--eval-tasks``).

==============================  ===================================================================
spec                            loaded with
==============================  ===================================================================
``bundled:social_iqa``          a BIG-bench task shipped in ``blob_pyro/data/bundled`` (offline default)
``paper:<name>``                :func:`blob_pyro.data.load_paper_task` (hub, or ``data_dir`` files)
``path/to/task.json``           :func:`blob_pyro.data.load_bigbench` (a JSON object with ``examples``)
``path/to/table.jsonl|.csv|.parquet`` (or a JSON list of rows)
                                :func:`blob_pyro.data.load_tabular` with the column mapping
==============================  ===================================================================
"""

from __future__ import annotations

import importlib.resources
import json
import os
from pathlib import Path

from blob_pyro.data.bigbench import load_bigbench
from blob_pyro.data.examples import MultipleChoiceTask
from blob_pyro.data.paper_tasks import PAPER_TASKS, load_paper_task
from blob_pyro.data.tabular import TABLE_FORMATS, ColumnMapping, load_tabular

__all__ = ["BUNDLED_PREFIX", "PAPER_PREFIX", "TASK_FORMATS", "bundled_task_path", "load_task_spec", "task_spec_name"]

BUNDLED_PREFIX = "bundled:"
PAPER_PREFIX = "paper:"
TASK_FORMATS = ("auto", "bigbench", "json", "csv", "parquet")


def bundled_task_path(name: str) -> Path:
    """Path of the task ``bundled:<name>`` shipped inside the package."""
    folder = Path(str(importlib.resources.files("blob_pyro.data") / "bundled"))
    path = folder / f"{name}.json"
    if not path.is_file():
        available = sorted(f"{BUNDLED_PREFIX}{p.stem}" for p in folder.glob("*.json"))
        raise FileNotFoundError(f"no bundled task {name!r}; bundled tasks: {available}")
    return path


def task_spec_name(spec: str) -> str:
    """A short name for a spec, used as its key in metrics.json (``paper:arc_easy`` -> ``arc_easy``)."""
    for prefix in (BUNDLED_PREFIX, PAPER_PREFIX):
        if spec.startswith(prefix):
            return spec[len(prefix):]
    return Path(spec).stem


def _is_bigbench_json(path: Path) -> bool:
    """A ``.json`` file whose top level is an object (BIG-bench) rather than a list of rows or JSON lines."""
    with path.open(encoding="utf-8") as handle:
        head = handle.read(1 << 16).lstrip()
    if not head.startswith("{"):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False  # JSON lines: several objects
    return isinstance(data, dict)


def load_task_spec(
    spec: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    column_mapping: ColumnMapping | str | None = None,
    task_format: str = "auto",
    drop_mismatched_choices: bool = False,
    roles: tuple[str, ...] = ("train", "validation"),
) -> MultipleChoiceTask:
    """Load the task named by ``spec`` (see the module table).

    Args:
        spec: ``bundled:<name>``, ``paper:<name>`` or a file path.
        data_dir: Local folder with the hub-schema files of ``paper:`` tasks (``None``: the hub).
        column_mapping: Column mapping for tables (:class:`blob_pyro.data.ColumnMapping` or its text).
        task_format: ``auto`` (from the spec and the file), ``bigbench``, ``json`` (rows; also jsonl),
            ``csv`` or ``parquet``.
        drop_mismatched_choices: Keep only the examples with the most common number of choices.
        roles: For ``paper:`` tasks, which of their splits to load (``("validation",)`` for OOD evaluation).
    """
    if task_format not in TASK_FORMATS:
        raise ValueError(f"task format {task_format!r} is unknown; use one of {list(TASK_FORMATS)}.")
    if spec.startswith(PAPER_PREFIX):
        name = spec[len(PAPER_PREFIX):]
        return load_paper_task(name, data_dir=data_dir, roles=roles, drop_mismatched_choices=drop_mismatched_choices)
    if spec.startswith(BUNDLED_PREFIX):
        return load_bigbench(bundled_task_path(spec[len(BUNDLED_PREFIX):]), drop_mismatched_choices=drop_mismatched_choices)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"task {spec!r} is not a file; pass a BIG-bench JSON file, a .jsonl/.json/.csv/.parquet table, "
            f"'bundled:social_iqa' or paper:<name> with name in {sorted(PAPER_TASKS)}."
        )
    suffix = path.suffix.lower()
    if task_format == "bigbench" or (task_format == "auto" and suffix == ".json" and _is_bigbench_json(path)):
        if column_mapping:
            raise ValueError(f"{spec} is a BIG-bench task; --column-mapping applies to tables only, drop it.")
        return load_bigbench(path, drop_mismatched_choices=drop_mismatched_choices)
    if task_format == "auto" and suffix not in TABLE_FORMATS:
        raise ValueError(
            f"{spec}: unknown task file type {suffix!r}; expected a BIG-bench .json or a table ({sorted(TABLE_FORMATS)}), "
            "or pass --task-format."
        )
    return load_tabular(
        path, mapping=column_mapping, task_format=task_format, drop_mismatched_choices=drop_mismatched_choices
    )
