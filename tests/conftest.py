"""Tiny random LLaMA models and a word-level tokenizer: fast stand-ins for the real thing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"

VOCAB = 96


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python that imports these helpers (conftest, tiny_families):
    pytest puts tests/ on sys.path in its own process only."""
    inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *inherited]), **extra}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def tiny_llama(kv_heads: int, seed: int = 0, context: int = 512, heads: int = 4) -> LlamaForCausalLM:
    """`heads` query heads of 16 dimensions over `kv_heads` KV heads (4 // 2: two queries per KV head)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        eos_token_id=1, pad_token_id=0, bos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than the init's, so eviction changes outputs
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(8.0)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def mha() -> LlamaForCausalLM:
    return tiny_llama(kv_heads=4)


@pytest.fixture(scope="session")
def gqa() -> LlamaForCausalLM:
    return tiny_llama(kv_heads=2)


def random_prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def save_tiny_model(folder: Path, context: int = 256) -> Path:
    """A tiny GQA model and the word-level tokenizer saved as a checkpoint folder, for run_helm.py."""
    tiny_llama(kv_heads=2, context=context).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def fast_caches(monkeypatch) -> list:
    """Every FastCache made during the test, in order (to look at its slots afterwards)."""
    from h2o.engine.fast import FastCache

    made = []
    init = FastCache.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(FastCache, "__init__", spy)
    return made
