"""Checks that a network can be adapted and scored as the run asks, before any training.

* :func:`check_classifier_adapted`: a sequence classifier's new (random) head carries an adapter.
* :func:`check_shared_prompt_support`: a causal LM scores one shared-prompt row of choices exactly as
  separate rows (a custom 4D attention mask and ``position_ids`` honoured).
"""

from __future__ import annotations

import torch
from torch import nn

from blob_pyro.data.choice_scoring import EncodedChoices, iterate_choice_batches

from .bayesian_model import extra_batch_inputs
from .heads import ChoiceLikelihoodHead

__all__ = ["check_classifier_adapted", "check_shared_prompt_support"]


def check_classifier_adapted(network, target_modules: str) -> None:
    """Sequence classification: the classification head is new (random) and ``bayesianize`` froze it, so
    every Linear layer outside the pretrained body (``network.base_model_prefix``: BERT's ``classifier``,
    RoBERTa's ``classifier.dense``/``classifier.out_proj``, Llama's ``score``) must carry an adapter, as in
    the paper's RoBERTa runs (LoRA on the classifier); otherwise the model could never learn the task."""
    body = getattr(network, getattr(network, "base_model_prefix", ""), None)
    body_modules = {id(m) for m in body.modules()} if isinstance(body, nn.Module) else set()
    frozen_head = [
        name for name, module in network.named_modules()
        if type(module) is nn.Linear and id(module) not in body_modules and not name.endswith(".base_layer")
    ]
    if frozen_head:
        raise ValueError(
            f"--target-modules {target_modules!r} leaves the new classification head {frozen_head} randomly initialised "
            f"and frozen; add it, e.g. --target-modules query,value,{','.join(n.split('.')[-1] for n in frozen_head)} "
            "(LoRA on the classifier, as in the paper's RoBERTa runs)"
        )


def check_shared_prompt_support(network, *, model_name: str = "this model") -> None:
    """Refuse a causal LM that scores a shared-prompt row differently from separate rows.

    The shared-prompt layout needs the network to honour a custom 4D attention mask and ``position_ids``;
    some do not (e.g. GPT-2 under transformers 5 gives other scores, silently). A probe of one random
    12-token prompt with choices of 3 and 2 tokens is scored both ways (three short no-grad forwards);
    a log-probability difference above float error (1e-3 in fp32, 5e-2 in half precision) raises.
    """
    vocab = int(network.get_input_embeddings().num_embeddings)
    ids = torch.randint(0, vocab, (17,), generator=torch.Generator().manual_seed(0)).tolist()
    probe = EncodedChoices([ids[:12]], [[ids[12:15], ids[15:17]]], torch.tensor([0]))
    device = next(network.parameters()).device
    head = ChoiceLikelihoodHead(2)
    scores, was_training = {}, network.training
    network.eval()  # no dropout in the probe
    try:
        with torch.no_grad():
            for layout in ("shared_prompt", "separate"):
                batch = {k: v.to(device) for k, v in next(iterate_choice_batches(probe, batch_size=1, pad_token_id=0, shuffle=False, layout=layout)).items()}
                scores[layout] = head(network, batch["input_ids"], batch["attention_mask"], **extra_batch_inputs(batch)).float()
    finally:
        network.train(was_training)
    difference = float((scores["shared_prompt"] - scores["separate"]).abs().max())
    tolerance = 1e-3 if getattr(network, "dtype", torch.float32) == torch.float32 else 5e-2
    if not difference <= tolerance:
        raise ValueError(
            f"{model_name} scores choices differently in one shared-prompt row than in separate rows (largest "
            f"log-probability difference {difference:.3g} > {tolerance:g}): it does not honour a custom 4D attention "
            "mask and position_ids. Use --choice-layout separate."
        )
