"""Task-independent containers for multiple-choice data.

Every loader (BIG-bench JSON files, Hugging Face datasets) returns a :class:`MultipleChoiceTask`,
so prompting, encoding and splitting never depend on where the data came from.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional


SPLIT_ROLES = ("train", "validation")
"""Roles of a task's own splits: what a run trains on and what it evaluates on."""


@dataclass(frozen=True)
class MultipleChoiceExample:
    """One multiple-choice question.

    Attributes:
        question: The input text (context and question) WITHOUT the choices.
        choices: The choice texts, in file order.
        label: Index into ``choices`` of the correct choice.
    """

    question: str
    choices: tuple[str, ...]
    label: int

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(
                f"A multiple-choice example needs at least 2 choices, found {len(self.choices)}: "
                f"{self.choices!r}."
            )
        if not 0 <= self.label < len(self.choices):
            raise ValueError(
                f"label must index one of the {len(self.choices)} choices (0..{len(self.choices) - 1}), "
                f"found {self.label}."
            )


@dataclass
class MultipleChoiceTask:
    """A named list of multiple-choice examples that all have the same number of choices.

    Attributes:
        name: Task name, e.g. ``"social_iqa"``.
        examples: The examples, in source order.
        num_choices: Number of choices of every example (validated on construction).
        source: File path or hub id the task was read from, for the record.
        task_prefix: BIG-bench ``task_prefix``, prepended to every prompt.
        label_names: The choice texts when they are fixed class labels shared by every example in the
            same order (e.g. ``("Yes", "No")``), else ``None``.
        file_indices: Position in the source file of each entry of ``examples``; differs from
            ``range(len(examples))`` only when a loader dropped examples (see
            :func:`blob_pyro.data.load_bigbench`). ``None`` means the identity.
        splits: The dataset's own splits, when it has them (the paper's hub tasks): role
            (``"train"``, ``"validation"``) -> positions in ``examples``. ``None`` (BIG-bench, local
            tables): the run makes a seeded stratified split.
        split_procedure: Where ``splits`` came from, for the run record (e.g. hub split names).
        prompt_format: The task's own prompt fields (:class:`blob_pyro.data.prompts.PromptFormat`,
            e.g. BIG-bench ``example_output_prefix``); ``None`` = the package's layout.
    """

    name: str
    examples: list[MultipleChoiceExample]
    num_choices: int
    source: str
    task_prefix: str = ""
    label_names: tuple[str, ...] | None = None
    file_indices: tuple[int, ...] | None = None
    splits: dict[str, tuple[int, ...]] | None = None
    split_procedure: str = ""
    prompt_format: Optional["PromptFormat"] = None  # noqa: F821 (blob_pyro.data.prompts imports this module)

    def __post_init__(self) -> None:
        for index, example in enumerate(self.examples):
            if len(example.choices) != self.num_choices:
                raise ValueError(
                    f"Task {self.name!r}: example {index} has {len(example.choices)} choices, expected "
                    f"num_choices={self.num_choices} for every example."
                )
        if self.label_names is not None and len(self.label_names) != self.num_choices:
            raise ValueError(
                f"Task {self.name!r}: label_names has {len(self.label_names)} entries, expected "
                f"num_choices={self.num_choices}."
            )
        if self.file_indices is not None and len(self.file_indices) != len(self.examples):
            raise ValueError(
                f"Task {self.name!r}: file_indices has {len(self.file_indices)} entries, expected one per "
                f"example ({len(self.examples)})."
            )
        for role, positions in (self.splits or {}).items():
            if role not in SPLIT_ROLES:
                raise ValueError(f"Task {self.name!r}: unknown split role {role!r}; expected one of {SPLIT_ROLES}.")
            if not positions:
                raise ValueError(
                    f"Task {self.name!r}: the {role} split is empty; every split needs at least one example "
                    "(check the source files or remove the split)."
                )
            if not all(0 <= i < len(self.examples) for i in positions):
                raise ValueError(f"Task {self.name!r}: the {role} split indexes outside 0..{len(self.examples) - 1}.")

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[int]:
        """Gold choice index of every example, shape ``(len(examples),)``."""
        return [example.label for example in self.examples]


def keep_common_choice_count(
    examples: list[MultipleChoiceExample], *, source: str, drop_mismatched_choices: bool, flag: str = "drop_mismatched_choices=True (CLI: --drop-mismatched-choices)"
) -> tuple[list[MultipleChoiceExample], tuple[int, ...], int]:
    """Keep the examples with the most common number of choices (ties go to the larger count).

    Returns:
        ``(kept examples, their positions in examples, num_choices)``.

    Raises:
        ValueError: If some examples differ and ``drop_mismatched_choices`` is False, naming the first
            such example and the fix.
    """
    if not examples:
        raise ValueError(f"{source}: no examples; a task needs at least one example.")
    counts = Counter(len(example.choices) for example in examples)
    num_choices = max(counts, key=lambda count: (counts[count], count))
    mismatched = [i for i, example in enumerate(examples) if len(example.choices) != num_choices]
    if mismatched and not drop_mismatched_choices:
        first = mismatched[0]
        raise ValueError(
            f"{source}: row {first} has {len(examples[first].choices)} choices but most rows have {num_choices} "
            f"({len(mismatched)} of {len(examples)} differ, rows {mismatched[:10]}"
            f"{' ...' if len(mismatched) > 10 else ''}); every example of a task needs the same number of "
            f"choices. Pass {flag} to keep the {len(examples) - len(mismatched)} rows with {num_choices} choices, "
            "or fix the data."
        )
    kept = tuple(i for i, example in enumerate(examples) if len(example.choices) == num_choices)
    return [examples[i] for i in kept], kept, num_choices


def shared_choices(examples: list[MultipleChoiceExample]) -> tuple[str, ...] | None:
    """The choice tuple when every example has the same choices in the same order, else ``None``."""
    choice_sets = {example.choices for example in examples}
    return next(iter(choice_sets)) if len(choice_sets) == 1 else None
