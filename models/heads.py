"""Likelihood heads: how a transformers network turns a batch into class logits ``(batch, K)``.

* :class:`AnswerTokenHead`: a causal LM answering multiple choice with a letter (the BLoB protocol,
  BLOB.md section 4): the logits of the K answer-label tokens (" A", " B", ...) at the last position
  of a left-padded prompt that ends with "Answer:". Only those K logits enter the likelihood.
* :class:`SequenceClassificationHead`: an ``AutoModelForSequenceClassification`` network's logits.
* :class:`ChoiceLikelihoodHead`: a causal LM scoring each choice's text as a continuation of the
  prompt (mean token log-probability), for models too small to answer with letters.

Every head is called as ``head(network, input_ids, attention_mask, **head_inputs)``; extra batch
entries (e.g. ``continuation_mask``) reach the head through the model's keyword arguments.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["AnswerTokenHead", "SequenceClassificationHead", "ChoiceLikelihoodHead"]


class AnswerTokenHead(nn.Module):
    """Class logits = next-token logits of the answer-label tokens at the last position.

    Requires left padding, so that position -1 is every sequence's last real token. Only the last
    position's vocabulary logits are computed (``logits_to_keep=1``).

    :param answer_token_ids: the K token ids, one per class, in class order.
    """

    def __init__(self, answer_token_ids: Sequence[int]):
        super().__init__()
        ids = list(answer_token_ids)
        if len(ids) < 2:
            raise ValueError(f"need at least 2 answer tokens, got {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"answer tokens must be distinct, got {ids}")
        self.register_buffer("answer_token_ids", torch.tensor(ids, dtype=torch.long), persistent=False)

    @property
    def num_classes(self) -> int:
        return int(self.answer_token_ids.numel())

    def forward(self, network: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> torch.Tensor:
        """``input_ids``, ``attention_mask``: ``(batch, seq)``, left-padded. Returns ``(batch, K)`` fp32."""
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError("AnswerTokenHead needs left padding: the last position holds padding in some rows")
        output = network(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
        return output.logits[:, -1, :].index_select(-1, self.answer_token_ids).float()


class SequenceClassificationHead(nn.Module):
    """Class logits straight from a sequence-classification network (``(batch, K)``)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self._num_classes = int(num_classes)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def forward(self, network: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, **unused) -> torch.Tensor:
        logits = network(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        if logits.shape[-1] != self._num_classes:
            raise ValueError(f"network returns {logits.shape[-1]} classes, the task has {self._num_classes}")
        return logits


class ChoiceLikelihoodHead(nn.Module):
    """Class logit of choice k = mean log-probability of choice k's tokens after the prompt.

    Input: ``batch * K`` left-padded rows (prompt + one choice each, example-major) and a
    ``continuation_mask`` marking the choice tokens, which end every row. Only the last
    ``L + 1`` positions' vocabulary logits are computed (L = the longest choice in the batch).
    Returns ``(batch, K)`` fp32.
    """

    def __init__(self, num_choices: int):
        super().__init__()
        if num_choices < 2:
            raise ValueError(f"need at least 2 choices, got {num_choices}")
        self._num_classes = int(num_choices)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def forward(self, network, input_ids, attention_mask, continuation_mask=None):
        if continuation_mask is None:
            raise ValueError("ChoiceLikelihoodHead needs batches with a continuation_mask (iterate_choice_batches)")
        rows, K = input_ids.shape[0], self._num_classes
        if rows % K:
            raise ValueError(f"{rows} rows are not a whole number of examples with {K} choices each")
        L = int(continuation_mask.sum(-1).max())
        logits = network(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=L + 1).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)          # predicts the last L tokens
        targets = input_ids[:, -L:]
        token_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (rows, L)
        mask = continuation_mask[:, -L:].to(token_log_probs.dtype)
        scores = (token_log_probs * mask).sum(-1) / mask.sum(-1)
        return scores.view(rows // K, K)
