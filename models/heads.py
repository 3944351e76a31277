"""Likelihood heads: how a transformers network turns a batch into class logits ``(batch, K)``.

* :class:`AnswerTokenHead`: a causal LM answering multiple choice with a letter (the BLoB protocol,
  Wang et al. 2024, section 4): the logits of the K answer-label tokens (" A", " B", ...) at the last position
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

__all__ = ["AnswerTokenHead", "SequenceClassificationHead", "ChoiceLikelihoodHead", "shared_prompt_attention_mask"]


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

    Accepts either batch layout of :func:`blob_pyro.data.iterate_choice_batches`:

    * shared prompt (the batch has ``segment_ids`` and ``position_ids``, ``(batch, T)``): one row per
      example, the prompt followed by all K choices. The head turns ``segment_ids`` into a 4D additive
      attention mask (a choice token sees the prompt and its own choice's earlier tokens) so every
      choice is scored as if it alone followed the prompt.
    * separate (the batch has ``continuation_mask``, ``(batch * K, T)``): K left-padded rows per
      example (prompt + one choice each), example-major; the choice tokens end every row.

    Only the last positions' vocabulary logits are computed (``logits_to_keep``: the longest choice
    block plus one). Returns ``(batch, K)`` fp32.
    """

    def __init__(self, num_choices: int):
        super().__init__()
        if num_choices < 2:
            raise ValueError(f"need at least 2 choices, got {num_choices}")
        self._num_classes = int(num_choices)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def forward(self, network, input_ids, attention_mask, continuation_mask=None, segment_ids=None, position_ids=None):
        if segment_ids is not None:
            if position_ids is None:
                raise ValueError("ChoiceLikelihoodHead: a shared-prompt batch needs position_ids with its segment_ids")
            return self._shared_prompt_scores(network, input_ids, segment_ids, position_ids)
        if continuation_mask is None:
            raise ValueError("ChoiceLikelihoodHead needs batches from iterate_choice_batches (segment_ids or continuation_mask)")
        return self._separate_scores(network, input_ids, attention_mask, continuation_mask)

    def _separate_scores(self, network, input_ids, attention_mask, continuation_mask):
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

    def _shared_prompt_scores(self, network, input_ids, segment_ids, position_ids):
        K = self._num_classes
        found = int(segment_ids.max())
        if found != K:
            raise ValueError(f"the batch holds {found} choices per example, the head expects {K}")
        dtype = getattr(network, "dtype", torch.float32)
        mask = shared_prompt_attention_mask(segment_ids, dtype)
        W = int((segment_ids > 0).sum(-1).max()) + 1                          # all choice tokens + last prompt token
        logits = network(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=W).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)                    # (b, W, V)
        seg, targets = segment_ids[:, -W:], input_ids[:, -W:]
        where = torch.arange(W, device=seg.device).expand_as(seg)
        last_prompt = torch.where(seg == 0, where, torch.full_like(where, -1)).max(-1).values  # (b,)
        continues = torch.zeros_like(seg, dtype=torch.bool)
        continues[:, 1:] = seg[:, 1:] == seg[:, :-1]
        # Each choice token is predicted by its predecessor in the same choice, or, for a choice's first
        # token, by the last prompt token.
        source = torch.where(continues, where - 1, last_prompt[:, None])
        rows = torch.arange(seg.shape[0], device=seg.device)[:, None]
        token_log_probs = log_probs[rows, source, targets]                       # (b, W)
        one_hot = (seg[..., None] == torch.arange(1, K + 1, device=seg.device)).to(token_log_probs.dtype)  # (b, W, K)
        sums = torch.einsum("bw,bwk->bk", token_log_probs, one_hot)
        return sums / one_hot.sum(1)


def shared_prompt_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(b, 1, T, T)`` additive mask (0 = attend, dtype's min = blocked) of a shared-prompt batch.

    Query i attends key j when ``j <= i``, j is not padding, and j is a prompt token (segment 0) or in
    i's own segment. Padding queries attend to themselves only (their outputs are never read).
    """
    T = segment_ids.shape[-1]
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=segment_ids.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
