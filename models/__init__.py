"""Bayesian LoRA layers, model adaptation, priors and likelihood heads (installed as ``blob_pyro.models``)."""

from .adapt import bayesianize, find_adapters, linear_layer_names, match_target_modules
from .bayesian_model import BayesianLoRAModel
from .heads import AnswerTokenHead, ChoiceLikelihoodHead, SequenceClassificationHead
from .lora import BayesianLoRALinear, lora_init_A
from .priors import PRIORS, HierarchicalNormalPrior, LaplacePrior, NormalPrior, Prior, StudentTPrior, make_prior

__all__ = [
    "bayesianize", "find_adapters", "linear_layer_names", "match_target_modules", "BayesianLoRAModel",
    "AnswerTokenHead", "ChoiceLikelihoodHead", "SequenceClassificationHead", "BayesianLoRALinear", "lora_init_A",
    "PRIORS", "Prior", "NormalPrior", "LaplacePrior", "StudentTPrior", "HierarchicalNormalPrior", "make_prior",
]
