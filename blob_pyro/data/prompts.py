"""Prompt text for multiple-choice questions.

BLoB (Wang et al., 2024, "BLoB: Bayesian Low-Rank Adaptation by Backpropagation for Large Language
Models") follows Laplace-LoRA (Yang et al., 2024): the choices are listed with letters, the prompt
ends with ``"Answer:"``, and the model's next-token logits restricted to the answer-label tokens
``" A"``, ``" B"``, ... are the class logits.
"""

from __future__ import annotations

from blob_pyro.data.examples import MultipleChoiceExample

ANSWER_LETTERS = "ABCDEFGHIJ"
"""Letters used to label choices; a task may have at most ``len(ANSWER_LETTERS)`` choices."""

ANSWER_CUE = "Answer:"


def _check_num_choices(num_choices: int) -> None:
    if not 1 <= num_choices <= len(ANSWER_LETTERS):
        raise ValueError(
            f"Lettered prompts support 1 to {len(ANSWER_LETTERS)} choices ({ANSWER_LETTERS}), "
            f"found {num_choices}; extend ANSWER_LETTERS or use fewer choices."
        )


def choices_block(choices: tuple[str, ...] | list[str], *, letters: bool = True) -> str:
    """The lines listing the choices followed by the answer cue, e.g. ``"A. x\\nB. y\\nAnswer:"``.

    With ``letters=False`` each choice is listed on its own line without a letter.
    """
    if letters:
        _check_num_choices(len(choices))
        lines = [f"{ANSWER_LETTERS[i]}. {choice.strip()}" for i, choice in enumerate(choices)]
    else:
        lines = [choice.strip() for choice in choices]
    return "\n".join([*lines, ANSWER_CUE])


def format_prompt(example: MultipleChoiceExample, *, task_prefix: str = "", letters: bool = True) -> str:
    """The full prompt of one example::

        {task_prefix}{question stripped}
        A. {choice 0}
        B. {choice 1}
        Answer:

    Args:
        example: The question and its choices.
        task_prefix: Text prepended verbatim (BIG-bench ``task_prefix``; include its own newline).
        letters: Label the choices ``A.``, ``B.``, ...; ``False`` lists the bare choice texts.
    """
    return f"{classification_text(example, task_prefix=task_prefix)}\n{choices_block(example.choices, letters=letters)}"


def classification_text(example: MultipleChoiceExample, *, task_prefix: str = "") -> str:
    """The question alone with the task prefix, for sequence classification of tasks whose
    choices are fixed class labels (the choices are the classes, so they are not in the text)."""
    return f"{task_prefix}{example.question.strip()}"


def answer_label_strings(num_choices: int) -> list[str]:
    """The strings the model should produce after ``"Answer:"``: ``[" A", " B", ...]``."""
    _check_num_choices(num_choices)
    return [f" {letter}" for letter in ANSWER_LETTERS[:num_choices]]
