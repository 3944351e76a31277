"""Prompt text for multiple-choice questions.

BLoB (Wang et al., 2024, "BLoB: Bayesian Low-Rank Adaptation by Backpropagation for Large Language
Models") follows Laplace-LoRA (Yang et al., 2024): the choices are listed with letters, the prompt
ends with ``"Answer:"``, and the model's next-token logits restricted to the answer-label tokens
``" A"``, ``" B"``, ... are the class logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from blob_pyro.data.examples import MultipleChoiceExample

ANSWER_LETTERS = "ABCDEFGHIJ"
"""Letters used to label choices; a task may have at most ``len(ANSWER_LETTERS)`` choices."""

ANSWER_CUE = "Answer:"


@dataclass(frozen=True)
class PromptFormat:
    """A task's own prompt fields (BIG-bench ``example_input_prefix``, ``example_output_prefix``,
    ``choice_prefix``, ``append_choices_to_input``). The defaults are this package's layout, used for
    every field a task file does not set (BIG-bench's implicit ``"\\nQ: "``/``"\\nA: "`` are not applied).

    Attributes:
        input_prefix: Text before each question (after the task prefix).
        output_prefix: Text between the question (and listed choices) and the answer; ``None`` =
            ``"\\nAnswer:"``. Trailing whitespace is dropped: the answer continuation carries its own
            leading space, as BPE tokenizers expect.
        choice_prefix: Text before each listed choice when ``append_choices``; ``None`` = BIG-bench's
            ``"\\n choice: "``.
        append_choices: List the choices in the prompt (choice-likelihood scoring; lettered prompts
            always list them, with letters).
    """

    input_prefix: str = ""
    output_prefix: Optional[str] = None
    choice_prefix: Optional[str] = None
    append_choices: bool = False

    def answer_cue(self) -> str:
        """The text that ends a choice-likelihood prompt, e.g. ``"\\nAnswer:"``."""
        return ("\n" + ANSWER_CUE) if self.output_prefix is None else self.output_prefix.rstrip()

    def listed_choices(self, choices) -> str:
        """``""``, or every choice after ``choice_prefix`` when ``append_choices``."""
        if not self.append_choices:
            return ""
        prefix = "\n choice: " if self.choice_prefix is None else self.choice_prefix
        return "".join(f"{prefix}{choice.strip()}" for choice in choices)


DEFAULT_FORMAT = PromptFormat()


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


def classification_text(
    example: MultipleChoiceExample, *, task_prefix: str = "", prompt_format: PromptFormat = DEFAULT_FORMAT
) -> str:
    """The question alone with the task and input prefixes, for sequence classification of tasks whose
    choices are fixed class labels (the choices are the classes, so they are not in the text)."""
    return f"{task_prefix}{prompt_format.input_prefix}{example.question.strip()}"


def choice_likelihood_prompt(
    example: MultipleChoiceExample, *, task_prefix: str = "", prompt_format: PromptFormat = DEFAULT_FORMAT
) -> str:
    """The prompt each choice continues under choice-likelihood scoring::

        {task_prefix}{input_prefix}{question}[{choice_prefix}{choice} ...]{output_prefix or "\\nAnswer:"}
    """
    return (
        classification_text(example, task_prefix=task_prefix, prompt_format=prompt_format)
        + prompt_format.listed_choices(example.choices)
        + prompt_format.answer_cue()
    )


def answer_label_strings(num_choices: int) -> list[str]:
    """The strings the model should produce after ``"Answer:"``: ``[" A", " B", ...]``."""
    _check_num_choices(num_choices)
    return [f" {letter}" for letter in ANSWER_LETTERS[:num_choices]]
