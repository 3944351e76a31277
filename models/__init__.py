"""Bayesian LoRA layers, model adaptation, priors and likelihood heads (installed as ``blob_pyro.models``)."""

from .adapt import bayesianize, find_adapters, linear_layer_names, match_target_modules, select_sites, with_random_B
from .bayesian_model import BayesianLoRAModel
from .heads import AnswerTokenHead, ChoiceLikelihoodHead, SequenceClassificationHead
from .lora import BayesianLoRALinear, lora_init_A
from .priors import (
    PRIORS, HierarchicalNormalPrior, IIDPrior, LaplacePrior, NormalPrior, Prior, StudentTPrior, as_prior, make_prior, parity_support,
    resolve_prior,
)

__all__ = [
    "bayesianize", "find_adapters", "linear_layer_names", "match_target_modules", "BayesianLoRAModel",
    "AnswerTokenHead", "ChoiceLikelihoodHead", "SequenceClassificationHead", "BayesianLoRALinear", "lora_init_A",
    "select_sites", "with_random_B", "IIDPrior", "as_prior", "resolve_prior", "parity_support", "PRIORS", "Prior", "NormalPrior", "LaplacePrior", "StudentTPrior", "HierarchicalNormalPrior", "make_prior",
]
