"""Tiny random Mistral, Qwen2 and Qwen3 models (built from their transformers configs, saved with
the tiny tokenizer) through run_helm.py with --model_arch: drop mode gives mask mode's results,
the fast engine the reference's, and a batch what each request gets alone."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM,
)

from conftest import VOCAB, random_prompts, tiny_tokenizer
from h2o.serve.cli import main

ARCHS = {
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
LENGTHS = [70, 31, 95, 44, 58]
MAX_TOKENS = [12, 5, 16, 9, 14]


def tiny(arch: str, vocab: int = VOCAB, seed: int = 0):
    config_class, model_class = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
        eos_token_id=1, pad_token_id=0, bos_token_id=0,
    )
    model = model_class(config).eval()
    with torch.no_grad():  # sharper attention than the init's, so eviction changes outputs
        for layer in model.model.layers:
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj):
                projection.weight.mul_(4.0)
                if projection.bias is not None:  # Qwen2's query and key biases
                    projection.bias.normal_(0.0, 1.0)
            for norm in (getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)):
                if norm is not None:  # Qwen3 normalizes queries and keys per head: scale there
                    norm.weight.mul_(4.0)
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[1] = 0.0  # no end of text: each request runs to its max_tokens
    model.generation_config.eos_token_id = None
    return model


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letter_tokenizer() -> Qwen2Tokenizer:
    """For qwen2: AutoTokenizer loads a Qwen2Tokenizer for any folder of model_type qwen2, whatever
    tokenizer_config.json names (transformers lists qwen2 among the models whose hub tokenizer
    class is wrong), and a Qwen2Tokenizer made from the word-level tokenizer's files encodes
    nothing. A byte-level BPE of its own kind, then: one token per letter, with or without the
    space before it."""
    pieces = ["<pad>", "<eos>", "\u0120", *LETTERS, *("\u0120" + c for c in LETTERS)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [("\u0120", c) for c in LETTERS]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token="<pad>", eos_token="<eos>", unk_token=None)


@pytest.fixture(scope="module", params=list(ARCHS))
def model_dir(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{arch}")
    tokenizer = letter_tokenizer() if arch == "qwen2" else tiny_tokenizer()
    tiny(arch, len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    words = list(LETTERS) if arch == "qwen2" else [f"w{i}" for i in range(VOCAB - 2)]
    return arch, folder, words


def _requests(path, words):
    lines = []
    for prompt, max_tokens in zip(random_prompts(LENGTHS, seed=60), MAX_TOKENS):
        request = {"prompt": " ".join(words[t % len(words)] for t in prompt), "temperature": 0.0,
                   "max_tokens": max_tokens, "stop": ["###"], "top_p": 1, "n": 1}
        lines.append(json.dumps({"request": request}) + "\n")
    path.write_text("".join(lines))
    return path


def _run(model_dir, inp, out, *flags) -> list[dict]:
    arch, folder, _ = model_dir
    assert main(["--input_path", str(inp), "--output_path", str(out), "--model_name", str(folder),
                 "--model_arch", arch, "--no_cuda", *flags]) == 0
    return [json.loads(line)["result"] for line in out.read_text().splitlines()]


def _choices(results: list[dict]) -> list[tuple]:
    return [(r["choices"][0]["text"], r["choices"][0]["logprobs"]["tokens"]) for r in results]


def _logprobs(results: list[dict]) -> list[list[float]]:
    return [r["choices"][0]["logprobs"]["token_logprobs"] for r in results]


SMALL = ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"]


def test_drop_is_mask_and_a_batch_is_one_at_a_time(model_dir, tmp_path):
    inp = _requests(tmp_path / "in.jsonl", model_dir[2])
    runs = {
        "full": _run(model_dir, inp, tmp_path / "full.jsonl", "--batch_size", "3", "--engine", "reference"),
        "mask": _run(model_dir, inp, tmp_path / "mask.jsonl", "--batch_size", "3", *SMALL, "--kv_mode", "mask"),
        "drop": _run(model_dir, inp, tmp_path / "drop.jsonl", "--batch_size", "3", *SMALL, "--engine", "reference"),
        "drop1": _run(model_dir, inp, tmp_path / "drop1.jsonl", "--batch_size", "1", *SMALL, "--engine", "reference"),
        "fast": _run(model_dir, inp, tmp_path / "fast.jsonl", "--batch_size", "3", *SMALL, "--engine", "fast"),
        "fast1": _run(model_dir, inp, tmp_path / "fast1.jsonl", "--batch_size", "1", *SMALL, "--engine", "fast"),
    }
    drop = _choices(runs["drop"])
    assert [len(tokens) for _, tokens in drop] == MAX_TOKENS
    for name in ("mask", "drop1", "fast", "fast1"):
        assert _choices(runs[name]) == drop, name
        for got, expected in zip(_logprobs(runs[name]), _logprobs(runs["drop"])):
            assert got == pytest.approx(expected, abs=1e-4), name
    assert drop != _choices(runs["full"])  # the eviction shows on this architecture
    for result, n in zip(runs["drop"], LENGTHS):
        kv = result["kv_cache"]
        assert kv["prompt_tokens"] == n and kv["heavy_budget"] == int(0.1 * n)
        assert kv["kv_bytes_peak"] < kv["kv_bytes_full"]


def test_a_budget_of_the_whole_text_is_the_full_cache(model_dir, tmp_path):
    # Nothing is evicted until the prompt + the new tokens outgrow the window: the full cache's
    # results, on each architecture's own attention (biases, per-head norms, sliding window).
    inp = _requests(tmp_path / "in.jsonl", model_dir[2])
    full = _run(model_dir, inp, tmp_path / "full.jsonl", "--batch_size", "3", "--engine", "reference")
    whole = _run(model_dir, inp, tmp_path / "whole.jsonl", "--batch_size", "3", "--engine", "reference",
                 "--enable_small_cache", "--heavy_ratio", "0", "--recent_ratio", "1")
    for a, b in zip(_choices(whole), _choices(full)):
        assert a[1][:2] == b[1][:2]  # the window holds the prompt and the first new token
    for a, b in zip(_logprobs(whole), _logprobs(full)):
        assert a[:2] == pytest.approx(b[:2], abs=1e-4)
