"""Token ids for multiple-choice prompts and text classification, and padded mini-batches.

Prompts are tokenized once, up front; batches are padded dynamically to their longest sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blob_pyro.data.examples import MultipleChoiceExample
from blob_pyro.data.prompts import DEFAULT_FORMAT, PromptFormat, answer_label_strings, choices_block, classification_text


@dataclass
class EncodedSplit:
    """Tokenized examples of one split.

    Attributes:
        input_ids: Token ids of every example (ragged; special tokens included).
        labels: Gold class of every example, shape ``(n,)``, dtype long.
    """

    input_ids: list[list[int]]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if self.labels.shape != (len(self.input_ids),):
            raise ValueError(
                f"labels must have shape ({len(self.input_ids)},), one per sequence, found {tuple(self.labels.shape)}."
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    def first(self, size: int) -> "EncodedSplit":
        """The first ``size`` examples."""
        return EncodedSplit(self.input_ids[:size], self.labels[:size])

    def select(self, order) -> "EncodedSplit":
        """The examples at positions ``order``, in that order."""
        order = list(order)
        return EncodedSplit([self.input_ids[i] for i in order], self.labels[order])

    def widths(self) -> list[int]:
        """Padded width each example needs: its token count."""
        return [len(ids) for ids in self.input_ids]


def _ids(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _special_token_wrapping(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (e.g. BOS; EOS for T5)."""
    probe = "Answer"
    bare = _ids(tokenizer, probe, add_special_tokens=False)
    full = _ids(tokenizer, probe, add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    raise ValueError("Cannot locate the text inside the tokenizer's output with special tokens; cannot truncate safely.")


def _encode_prompt(
    example: MultipleChoiceExample, tokenizer: Any, *, task_prefix: str, max_length: int, index: int,
    prompt_format: PromptFormat = DEFAULT_FORMAT,
) -> list[int]:
    head = classification_text(example, task_prefix="", prompt_format=prompt_format)
    tail = "\n" + choices_block(example.choices)
    ids = _ids(tokenizer, task_prefix + head + tail, add_special_tokens=True)
    if len(ids) <= max_length:
        return ids
    # Too long: keep the special tokens, the task prefix, the choices and "Answer:"; cut the
    # question/context from the left, since its end (the question itself) matters most.
    lead, trail = _special_token_wrapping(tokenizer)
    prefix_ids = _ids(tokenizer, task_prefix, add_special_tokens=False) if task_prefix else []
    tail_ids = _ids(tokenizer, tail, add_special_tokens=False)
    room = max_length - len(lead) - len(trail) - len(prefix_ids) - len(tail_ids)
    if room < 0:
        raise ValueError(
            f"Example {index}: the task prefix and choices block alone take {max_length - room} tokens, more than "
            f"max_length={max_length}; increase max_length or shorten the task prefix/choices."
        )
    head_ids = _ids(tokenizer, head, add_special_tokens=False)
    kept = head_ids[len(head_ids) - room :] if room else []
    return lead + prefix_ids + kept + tail_ids + trail


def encode_multiple_choice(
    examples: Sequence[MultipleChoiceExample], tokenizer: Any, *, task_prefix: str = "", max_length: int = 512,
    prompt_format: PromptFormat | None = None,
) -> EncodedSplit:
    """Tokenize lettered prompts (:func:`blob_pyro.data.format_prompt`) for a causal LM. Of a task's
    ``prompt_format`` only ``input_prefix`` applies: the lettered protocol fixes the choices block and cue.

    A prompt longer than ``max_length`` tokens loses tokens from the LEFT of its question/context
    only; the task prefix, the choices block and the trailing ``"Answer:"`` are always kept.

    Args:
        examples: The examples, in split order.
        tokenizer: A Hugging Face tokenizer (callable, ``add_special_tokens`` keyword).
        task_prefix: Text prepended to every prompt.
        max_length: Maximum tokens per prompt, special tokens included.

    Returns:
        :class:`EncodedSplit` with ``labels`` of shape ``(len(examples),)``.

    Raises:
        ValueError: If even the task prefix and choices block do not fit in ``max_length``.
    """
    input_ids = [
        _encode_prompt(example, tokenizer, task_prefix=task_prefix, max_length=max_length, index=i,
                       prompt_format=prompt_format or DEFAULT_FORMAT)
        for i, example in enumerate(examples)
    ]
    return EncodedSplit(input_ids=input_ids, labels=torch.tensor([e.label for e in examples], dtype=torch.long))


def encode_text_classification(
    texts: Sequence[str], labels: Sequence[int], tokenizer: Any, *, max_length: int = 256
) -> EncodedSplit:
    """Tokenize texts for a sequence-classification model (BERT-style), truncating on the LEFT.

    A text longer than ``max_length`` tokens loses its beginning (the context), so the question at its
    end survives; special tokens ([CLS], [SEP]) are always kept.

    Args:
        texts: One text per example, e.g. :func:`blob_pyro.data.classification_text`.
        labels: Class of every example, shape ``(n,)``.
        tokenizer: A Hugging Face tokenizer.
        max_length: Maximum tokens per text, special tokens included.
    """
    if len(texts) != len(labels):
        raise ValueError(f"Got {len(texts)} texts but {len(labels)} labels; pass one label per text.")
    side = tokenizer.truncation_side
    try:
        tokenizer.truncation_side = "left"
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    finally:
        tokenizer.truncation_side = side
    return EncodedSplit(
        input_ids=[list(ids) for ids in encoded["input_ids"]], labels=torch.tensor(list(labels), dtype=torch.long)
    )


def answer_token_ids(tokenizer: Any, num_choices: int) -> list[int]:
    """Token id of each answer label ``" A"``, ``" B"``, ... (encoded without special tokens).

    Raises:
        ValueError: If a label is not exactly one token for this tokenizer.
    """
    ids = []
    for label in answer_label_strings(num_choices):
        tokens = _ids(tokenizer, label, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"Answer label {label!r} is {len(tokens)} tokens {tokens} "
                f"({tokenizer.convert_ids_to_tokens(tokens)}) for this tokenizer, expected exactly one; "
                "the answer-label likelihood needs single-token labels. Use a tokenizer with single-token "
                "' A', ' B', ... (GPT-2/Llama-style BPE) or a sequence-classification head instead."
            )
        ids.append(tokens[0])
    return ids


def iterate_batches(
    encoded: EncodedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    padding_side: str = "left",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded mini-batches of an :class:`EncodedSplit`.

    Each batch is padded to its own longest sequence, on the left by default (a causal LM then
    reads its next-token logits at position ``-1`` for every row) or on the right.

    Yields:
        ``{"input_ids": (b, T) long, "attention_mask": (b, T) long (1 = token, 0 = padding),
        "labels": (b,) long, "indices": (b,) long positions in ``encoded``}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', found {padding_side!r}.")
    n = len(encoded)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        indices = order[start : start + batch_size]
        rows = [encoded.input_ids[i] for i in indices.tolist()]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[r, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[r, span] = 1
        yield {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": encoded.labels[indices],
            "indices": indices.long(),
        }
