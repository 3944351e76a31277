"""Tiny random transformers models for unit tests (milliseconds, no downloads)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from blob_pyro.models import AnswerTokenHead, BayesianLoRAModel, bayesianize

VOCAB = 40
ANSWER_TOKENS = [5, 6, 7]


def tiny_llama(num_layers: int = 2, hidden: int = 16, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def tiny_bayesian_llama(rank: int = 2, prior=None, targets=("q_proj", "v_proj", "lm_head"), *, bayesian_sites=None,
                        random_B: bool = False, **kwargs) -> BayesianLoRAModel:
    network = tiny_llama(**kwargs)
    bayesianize(network, list(targets), rank=rank, alpha=2.0 * rank, prior=prior, bayesian_sites=bayesian_sites,
                random_B=random_B)
    return BayesianLoRAModel(network, AnswerTokenHead(ANSWER_TOKENS))


def synthetic_batch(n: int = 24, seq: int = 6, seed: int = 0) -> dict:
    """A learnable task: the label is the token at position 2 modulo 3."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, VOCAB, (n, seq), generator=g)
    labels = input_ids[:, 2] % 3
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels, "indices": torch.arange(n)}
