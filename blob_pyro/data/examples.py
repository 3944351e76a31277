"""Task-independent containers for multiple-choice data.

Every loader (BIG-bench JSON files, Hugging Face datasets) returns a :class:`MultipleChoiceTask`,
so prompting, encoding and splitting never depend on where the data came from.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    name: str
    examples: list[MultipleChoiceExample]
    num_choices: int
    source: str
    task_prefix: str = ""
    label_names: tuple[str, ...] | None = None
    file_indices: tuple[int, ...] | None = None

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

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> list[int]:
        """Gold choice index of every example, shape ``(len(examples),)``."""
        return [example.label for example in self.examples]
