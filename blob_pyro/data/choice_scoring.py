"""Multiple choice scored by the likelihood of each choice's text ("cloze" scoring).

The letter protocol of the BLoB paper (lettered choices, the logits of " A", " B", ... after "Answer:")
needs a model that can bind letters to choices; a 135M model cannot learn that from a few hundred
examples (our measurements, README "Learning first"). Here each choice is a continuation of the
prompt ``"{task prefix}{question}\\nAnswer:"`` (or the task's own prompt fields) and its class logit is the mean log-probability of its
tokens (the lm-evaluation-harness "acc_norm"-style score, per token).

Two batch layouts give the same class logits (tests/test_choice_scoring.py checks it to float error):

* ``"shared_prompt"`` (default): one row per example, ``prompt + choice_1 + ... + choice_K``. A
  block attention mask lets every choice see the prompt and its own earlier tokens only, and each
  choice's position ids restart where the prompt ends, so choice k is scored exactly as if it followed
  the prompt alone. The prompt is run once instead of K times (about K-fold fewer tokens when the
  prompt dominates; ``benchmarks/bench_choice_layout.py``). What is per row changes with it: sequence
  flipout and MC-dropout masks are drawn once per example (not once per choice), and KFAC's input
  factor counts the prompt tokens once. A row holds the prompt and all choices, so it can be longer than
  ``--max-length`` (positions stay within it); a model with sliding-window attention gets no window under
  the custom mask. ``blob_pyro.assembly.build_model`` probes the network once and refuses one that scores
  the layouts differently (GPT-2 under transformers 5 does), naming ``--choice-layout separate``.
* ``"separate"``: ``K`` rows per example (prompt + one choice each); works with any causal LM,
  including architectures that do not accept a custom 4D attention mask and position ids.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blob_pyro.data.examples import MultipleChoiceExample
from blob_pyro.data.prompts import DEFAULT_FORMAT, PromptFormat, choice_likelihood_prompt

__all__ = ["EncodedChoices", "encode_choice_continuations", "iterate_choice_batches", "CHOICE_LAYOUTS"]

CHOICE_LAYOUTS = ("shared_prompt", "separate")


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
    generator: torch.Generator | None = None, drop_last: bool = False, layout: str = "shared_prompt",
) -> Iterator[dict[str, torch.Tensor]]:
    """Left-padded batches of the examples of ``encoded`` in one of :data:`CHOICE_LAYOUTS`.

    ``layout="shared_prompt"`` yields ``{"input_ids": (b, T), "attention_mask": (b, T) (1 = token),
    "segment_ids": (b, T) long (-1 padding, 0 prompt, k + 1 on choice k's tokens), "position_ids":
    (b, T) long (each choice restarts at the prompt's length), "labels": (b,), "indices": (b,)}``.

    ``layout="separate"`` yields ``batch * K`` rows (prompt + one choice each), example-major:
    ``{"input_ids": (b*K, T), "attention_mask": (b*K, T), "continuation_mask": (b*K, T) bool (True on
    the choice's tokens, which end every row), "labels": (b,), "indices": (b,)}``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, found {batch_size}.")
    if layout not in CHOICE_LAYOUTS:
        raise ValueError(f"unknown choice layout {layout!r}; use one of {', '.join(CHOICE_LAYOUTS)}")
    build = _shared_prompt_batch if layout == "shared_prompt" else _separate_batch
    n = len(encoded)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        indices = order[start : start + batch_size]
        batch = build(encoded, indices.tolist(), pad_token_id)
        batch.update(labels=encoded.labels[indices], indices=indices.long())
        yield batch


def _separate_batch(encoded: EncodedChoices, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    rows, spans = [], []
    for i in indices:
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
    return {"input_ids": input_ids, "attention_mask": attention_mask, "continuation_mask": continuation_mask}


def _shared_prompt_batch(encoded: EncodedChoices, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    rows = []
    for i in indices:
        prompt, conts = encoded.prompts[i], encoded.continuations[i]
        ids = list(prompt) + [t for c in conts for t in c]
        segments = [0] * len(prompt) + [k + 1 for k, c in enumerate(conts) for _ in c]
        positions = list(range(len(prompt))) + [len(prompt) + j for c in conts for j in range(len(c))]
        rows.append((ids, segments, positions))
    width = max(len(ids) for ids, _, _ in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    for r, (ids, segments, positions) in enumerate(rows):
        span = slice(width - len(ids), width)
        input_ids[r, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, span] = 1
        segment_ids[r, span] = torch.tensor(segments, dtype=torch.long)
        position_ids[r, span] = torch.tensor(positions, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "segment_ids": segment_ids, "position_ids": position_ids}
