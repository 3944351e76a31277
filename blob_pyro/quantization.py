"""Quantized frozen bases through bitsandbytes (``pip install blob-pyro[quant]``).

The frozen base is loaded by transformers with a ``BitsAndBytesConfig``: its linear layers become
``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), Dettmers et al. 2022) or ``Linear4bit`` (NF4 with double
quantization, QLoRA: Dettmers et al. 2023), both subclasses of ``nn.Linear`` that :func:`bayesianize`
wraps like any other linear layer. The adapters, the guide and the KL stay fp32; only the base forward
is quantized (the BLoB paper's asymmetric Bayesianization touches the LoRA factors only, section 3).
transformers keeps ``lm_head`` unquantized, so an ``lm_head`` adapter wraps an ordinary ``nn.Linear``.

Quantized models are placed on their device at load time (``device_map``); bitsandbytes 0.50 runs both
kinds on CPU as well as CUDA (slowly on CPU: for tests).
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = ["BASE_QUANTIZATIONS", "bitsandbytes_config", "is_quantized", "quantized_linear_types"]

#: The values of ``--base-quantization``.
BASE_QUANTIZATIONS = ("none", "8bit", "4bit")

_INSTALL = "pip install 'blob-pyro[quant]' (or pip install bitsandbytes)"


def _require_bitsandbytes(kind: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError(
            f"--base-quantization {kind} loads the base through bitsandbytes, which is not installed; "
            f"install it with `{_INSTALL}`, or use --base-quantization none"
        )


def bitsandbytes_config(kind: str, *, compute_dtype: torch.dtype = torch.bfloat16):
    """The ``transformers.BitsAndBytesConfig`` for ``kind`` (None for ``"none"``).

    :param kind: ``"none"``, ``"8bit"`` (LLM.int8(), fp16 compute inside bitsandbytes) or ``"4bit"``
        (NF4, double quantization, matmuls in ``compute_dtype``: QLoRA's recipe).
    :param compute_dtype: dtype of the 4-bit layers' matmuls, normally ``--base-dtype`` (bf16 on CUDA).
    :raises ValueError: for an unknown kind. :raises ModuleNotFoundError: when bitsandbytes is missing.
    """
    if kind not in BASE_QUANTIZATIONS:
        raise ValueError(f"base quantization must be one of {list(BASE_QUANTIZATIONS)}, got {kind!r}")
    if kind == "none":
        return None
    _require_bitsandbytes(kind)
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype,
    )


def quantized_linear_types() -> tuple[type, ...]:
    """The bitsandbytes linear classes (empty when bitsandbytes is not installed)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def is_quantized(network: torch.nn.Module) -> bool:
    """Whether ``network`` holds bitsandbytes layers (loaded with a ``BitsAndBytesConfig``)."""
    if getattr(network, "is_quantized", False):
        return True
    types = quantized_linear_types()
    return bool(types) and any(isinstance(m, types) for m in network.modules())
