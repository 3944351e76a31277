"""Put Bayesian LoRA adapters into any transformers model, in place (PEFT's target-module semantics)."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .lora import BayesianLoRALinear
from .priors import NormalPrior, as_prior

__all__ = ["bayesianize", "linear_layer_names", "match_target_modules", "find_adapters", "select_sites", "with_random_B"]

TargetModules = Union[str, Sequence[str]]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full module paths of every ``nn.Linear`` in ``model`` (already-adapted layers excluded)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not name.endswith(".base_layer"):
            names.append(name)
    return names


def _matches(name: str, target_modules: TargetModules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def match_target_modules(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """The Linear layer names selected by ``target_modules``, in module order.

    PEFT semantics: a list matches exact names or dotted suffixes (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``); a single string is a regular expression that must match the
    full name.
    """
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from err
    elif not target_modules:
        raise ValueError("target_modules is empty: name at least one Linear layer (e.g. ['q_proj', 'v_proj'])")
    return [name for name in linear_layer_names(model) if _matches(name, target_modules)]


def select_sites(site_names: list[str], pattern: Optional[str]) -> list[str]:
    """The A sites matched by ``pattern`` (``re.search``; None selects all), in model order.

    :raises ValueError: for an invalid regex or one that matches no site (the message lists the sites).
    """
    if pattern is None:
        return list(site_names)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"sites={pattern!r} is not a valid regular expression: {err}") from None
    chosen = [s for s in site_names if regex.search(s)]
    if not chosen:
        raise ValueError(
            f"sites={pattern!r} matches no LoRA site; the model's sites are e.g. {site_names[:4]} "
            f"({len(site_names)} in all): pass a regex such as 'lm_head' or 'q_proj'"
        )
    return chosen


def _suffixes(names: Iterable[str]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def bayesianize(
    model: nn.Module,
    target_modules: TargetModules,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    prior=None,
    dropout: float = 0.0,
    adapter_dtype: torch.dtype = torch.float32,
    bayesian_sites: Optional[str] = None,
    random_B: bool = False,
) -> list[str]:
    """Replace the matching ``nn.Linear`` layers of ``model`` by :class:`BayesianLoRALinear`, in place.

    Every parameter of ``model`` is frozen first, so only adapter parameters remain trainable.
    Each adapter is a root ``PyroModule`` named by its full module path, so sample sites read
    ``model.layers.0.self_attn.q_proj.lora_A`` and never collide.

    :param target_modules: list of exact names / dotted suffixes, or one full-match regex string.
    :param prior: prior over every A (default: ``NormalPrior(0.2)``, BLoB's): a
        :class:`~blob_pyro.models.priors.Prior` or a scalar ``pyro.distributions`` instance
        (e.g. ``dist.Laplace(0., 0.1)``, wrapped in an ``IIDPrior``).
    :param bayesian_sites: regex (``re.search``) of the A sites, ``<module path>.lora_A``, that are
        Bayesian; the other adapters are deterministic LoRA layers (no prior term; a guide gives them point
        estimates). None: every adapter is Bayesian.
    :param random_B: make B a sample site of every Bayesian adapter too (the mean-field "BBB" family).
    :returns: the adapted module names, in module order.
    :raises ValueError: when nothing matches; the message lists the available Linear names.
    """
    prior = NormalPrior() if prior is None else as_prior(prior)
    if find_adapters(model):
        raise ValueError("model already has Bayesian LoRA adapters; build a fresh model to adapt it again")
    names = match_target_modules(model, target_modules)
    if not names:
        available = linear_layer_names(model)
        raise ValueError(
            f"target_modules {target_modules!r} matched no nn.Linear layer. Available layer-name suffixes: "
            f"{_suffixes(available)}; e.g. {available[:6]}. Pass suffixes such as ['q_proj', 'v_proj'] "
            "(LLaMA) or ['query', 'value'] (BERT), or a full-match regex string."
        )
    bayesian = set(select_sites([f"{name}.lora_A" for name in names], bayesian_sites))
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base_layer = getattr(parent, child_name)
        adapter = BayesianLoRALinear(
            base_layer, name=name, rank=rank, alpha=alpha, prior=prior, dropout=dropout, adapter_dtype=adapter_dtype,
            bayesian=f"{name}.lora_A" in bayesian, random_B=random_B and f"{name}.lora_A" in bayesian,
        )
        setattr(parent, child_name, adapter)
    return names


def find_adapters(model: nn.Module) -> dict[str, BayesianLoRALinear]:
    """All adapters of ``model`` keyed by module path, in module order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BayesianLoRALinear)}


def with_random_B(model, *, random_B: bool = True):
    """A new :class:`~blob_pyro.models.BayesianLoRAModel` over the same network whose Bayesian adapters are
    rebuilt with ``random_B`` (their B values, priors and options kept): how a post-hoc method (Laplace over
    A and B) gets a model in which B is a sample site. The adapters of ``model`` are replaced in the network,
    so use only the returned model afterwards.
    """
    from .bayesian_model import BayesianLoRAModel

    network = model.network
    for layer in model.adapters.values():
        name = layer._pyro_name
        parent_name, _, child_name = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        dropout = layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
        B = layer._parameters["lora_B"]
        rebuilt = BayesianLoRALinear(
            layer._modules["base_layer"], name=name, rank=layer.rank, alpha=layer.alpha, prior=layer.prior, dropout=dropout,
            adapter_dtype=B.dtype, bayesian=layer.prior_scored, random_B=random_B and layer.prior_scored,
        )
        with torch.no_grad():
            rebuilt.lora_B.copy_(B)
        rebuilt.train(layer.training)
        setattr(parent, child_name, rebuilt)
    return BayesianLoRAModel(network, model.head).train(model.training)
