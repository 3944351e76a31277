"""Multiple choice scored by the likelihood of each choice's text ("cloze" scoring).

The letter protocol of the BLoB paper (lettered choices, the logits of " A", " B", ... after "Answer:")
needs a model that can bind letters to choices; a 135M model cannot learn that from a few hundred
examples (our measurements, README "Learning first"). Here each choice is a continuation of the
prompt ``"{task prefix}{question}\\nAnswer:"`` (or the task's own prompt fields) and its class logit is the mean log-probability of its
tokens (the lm-evaluation-harness "acc_norm"-style score, per token). One sequence per choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blob_pyro.data.examples import MultipleChoiceExample
from blob_pyro.data.prompts import DEFAULT_FORMAT, PromptFormat, choice_likelihood_prompt

__all__ = ["EncodedChoices", "encode_choice_continuations", "iterate_choice_batches"]


@dataclass
class EncodedChoices:
    """Tokenized prompts and per-choice continuations of one split.

    Attributes:
        prompts: prompt ids per example (special tokens included), ragged.
        continuations: per example, per choice, the continuation ids (``" " + choice``), ragged.
        labels: gold class per example, ``(n,)`` long.
    """

    prompts: list[list[int]]
    continuations: list[list[list[int]]]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if not (len(self.prompts) == len(self.continuations) == len(self.labels)):
            raise ValueError("prompts, continuations and labels must have one entry per example")

    def __len__(self) -> int:
        return len(self.prompts)

    def first(self, size: int) -> "EncodedChoices":
        """The first ``size`` examples."""
        return EncodedChoices(self.prompts[:size], self.continuations[:size], self.labels[:size])

    def select(self, order) -> "EncodedChoices":
        """The examples at positions ``order``, in that order."""
        order = list(order)
        return EncodedChoices([self.prompts[i] for i in order], [self.continuations[i] for i in order], self.labels[order])

    def widths(self) -> list[int]:
        """Padded width each example needs: prompt plus its longest choice."""
        return [len(p) + max(len(c) for c in conts) for p, conts in zip(self.prompts, self.continuations)]


def _ids(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_choice_continuations(
    examples: Sequence[MultipleChoiceExample], tokenizer: Any, *, task_prefix: str = "", max_length: int = 512,
    prompt_format: PromptFormat | None = None,
) -> EncodedChoices:
    """Tokenize every prompt once (:func:`blob_pyro.data.prompts.choice_likelihood_prompt`) and every
    choice as its continuation (``" " + choice``).

    A prompt longer than ``max_length`` minus the longest continuation loses tokens from its left
    (the start of the context); the question's end, "Answer:" and the choices are kept.
    """
    prompts, continuations = [], []
    for index, example in enumerate(examples):
        conts = [_ids(tokenizer, " " + choice.strip(), add_special_tokens=False) for choice in example.choices]
        if any(len(c) == 0 for c in conts):
            raise ValueError(f"example {index}: a choice tokenizes to nothing; every choice needs text")
        text = choice_likelihood_prompt(example, task_prefix=task_prefix, prompt_format=prompt_format or DEFAULT_FORMAT)
        prompt = _ids(tokenizer, text, add_special_tokens=True)
        budget = max_length - max(len(c) for c in conts)
        if budget < 8:
            raise ValueError(f"example {index}: its choices alone need {max_length - budget} of --max-length {max_length} tokens; raise --max-length")
        prompts.append(prompt[-budget:] if len(prompt) > budget else prompt)
        continuations.append(conts)
    return EncodedChoices(prompts, continuations, torch.tensor([e.label for e in examples], dtype=torch.long))


def iterate_choice_batches(
    encoded: EncodedChoices, *, batch_size: int, pad_token_id: int, shuffle: bool,
    generator: torch.Generator | None = None, drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded batches of ``batch * K`` sequences (prompt + one choice each), example-major.

    Yields ``{"input_ids": (b*K, T), "attention_mask": (b*K, T), "continuation_mask": (b*K, T) bool
    (True on the choice's tokens, which end every row), "labels": (b,), "indices": (b,)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
    n = len(encoded)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        indices = order[start : start + batch_size]
        rows, spans = [], []
        for i in indices.tolist():
            for cont in encoded.continuations[i]:
                rows.append(encoded.prompts[i] + cont)
                spans.append(len(cont))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        continuation_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (row, span) in enumerate(zip(rows, spans)):
            input_ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, width - len(row):] = 1
            continuation_mask[r, width - span:] = True
        yield {
            "input_ids": input_ids, "attention_mask": attention_mask, "continuation_mask": continuation_mask,
            "labels": encoded.labels[indices], "indices": indices.long(),
        }
