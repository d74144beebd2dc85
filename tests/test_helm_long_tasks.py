"""The long-input tasks: MultiNews's vendored data and LongBench prompts, the generated needles,
and both request files as SmolLM2 reads them (no HELM run here: see test_helm_export.py and
test_helm_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helm_support import requests
from lab_helm import longbench, needle
from lab_helm.lengths import CHAT_ROOM, CONTEXT
from lab_helm.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]

MULTI_NEWS_SHA256 = "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b"


class Chars:
    """A tokenizer of one token per character: cuts are easy to predict."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_vendored_multi_news_is_the_documented_file():
    path = ROOT / "data" / "longbench" / "multi_news.jsonl"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MULTI_NEWS_SHA256
    assert MULTI_NEWS_SHA256 in (ROOT / "data" / "README.md").read_text()
    examples = get_task("multi_news").load()
    assert len(examples) == 200 == len({e["id"] for e in examples})
    assert all(e["context"].startswith("Passage 1:") and e["summary"].strip() for e in examples)


def test_longbench_cut_keeps_the_first_and_last_halves():
    text = longbench.TEMPLATE.format(context="x" * 100)
    assert longbench.prompt("x" * 100, Chars(), max_tokens=len(text)) == text
    cut = longbench.prompt("x" * 100, Chars(), max_tokens=41)
    assert cut == text[:20] + text[-20:]


def test_multi_news_requests_are_longbench_prompts_cut_in_the_middle():
    head, tail = longbench.TEMPLATE.split("{context}")
    cut = 0
    for request, example in zip(requests(task="multi_news"), get_task("multi_news").load(), strict=True):
        assert {k: v for k, v in request.items() if k != "prompt"} == {
            "temperature": 0.0, "n": 1, "max_tokens": 512, "stop": [], "top_p": 1, "top_k_per_token": 1,
            "echo_prompt": False,
        }
        whole = longbench.TEMPLATE.format(context=example["context"])
        if request["prompt"] != whole:
            cut += 1
            assert request["prompt"].startswith(head) and request["prompt"].endswith(tail)
            assert len(request["prompt"]) < len(whole)
    assert cut == 8  # the contexts longer than the prompt budget, in SmolLM2's tokens


def test_needle_examples_are_the_same_in_every_process():
    # helm-run's process makes them again for the scenario: no string-hash order may leak in.
    script = "import json; from lab_helm import needle; print(json.dumps(needle.examples()))"
    for hash_seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == needle.examples(), hash_seed


def test_needle_examples_cover_the_grid_in_every_block_of_twenty():
    examples = needle.examples()
    assert examples != needle.examples(needle.SEED + 1)  # the seed draws them
    cells = len(needle.LENGTHS) * len(needle.DEPTHS)
    assert len(examples) == cells * needle.SAMPLES
    for start in range(0, len(examples), cells):
        block = examples[start : start + cells]
        assert {(e["length"], e["depth"]) for e in block} == {(n, d) for n in needle.LENGTHS for d in needle.DEPTHS}
    assert all(re.fullmatch(r"[1-9]\d{6}", e["value"]) for e in examples)


def test_needle_prompt_is_the_longest_haystack_that_fits():
    example = {"id": "t", "length": 1024, "depth": 50, "key": "calm-river", "value": "1234567"}
    budget = 1024 - needle.MAX_TOKENS - CHAT_ROOM
    prompt = needle.prompt(example, Chars())
    sentences = prompt.count(needle.NOISE)
    assert len(prompt) <= budget < len(needle.text(example, sentences + 1))
    before = prompt.split(needle.NEEDLE.format(**example))[0]
    assert before.count(needle.NOISE) == round(sentences / 2)


def test_needle_requests_hide_one_needle_at_its_depth():
    for request, example in zip(requests(task="needle"), needle.examples(), strict=True):
        assert {k: v for k, v in request.items() if k != "prompt"} == {
            "temperature": 0.0, "n": 1, "max_tokens": needle.MAX_TOKENS, "stop": [], "top_p": 1,
            "top_k_per_token": 1, "echo_prompt": False,
        }
        prompt = request["prompt"]
        sentences = prompt.count(needle.NOISE)
        assert prompt.count("special magic numbers for") == 1 and prompt.count(example["value"]) == 1
        assert prompt == needle.text(example, sentences)


def _essay_sentences_in(prompt: str, example: dict) -> int:
    """How many prose sentences `prompt` holds: the one count whose text it is (longer with each)."""
    low, high = 0, len(needle.essay_sentences())
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if len(needle.essay_text(example, middle)) < len(prompt) else (low, middle)
    assert needle.essay_text(example, low) == prompt
    return low


def test_essay_needles_are_the_needles_in_prose():
    plain, essay = needle.examples(), needle.essay_examples()
    assert [{**e, "id": None} for e in essay] == [{**e, "id": None} for e in plain]
    assert essay[0]["id"] == "needle_essay-1024-000-0" and len({e["id"] for e in essay}) == 100
    sentences = needle.essay_sentences()
    # The XSUM articles, in file order, cut after each sentence's end.
    first = get_task("xsum").load()[0]["document"]
    assert " ".join(first.split()).startswith(" ".join(sentences[:3]))
    assert len(sentences) > 10_000 and all(s == s.strip() and s for s in sentences)


def test_essay_prompt_is_the_longest_prose_that_fits():
    example = {"id": "t", "length": 2048, "depth": 25, "key": "calm-river", "value": "1234567"}
    budget = 2048 - needle.MAX_TOKENS - CHAT_ROOM
    prompt = needle.essay_prompt(example, Chars())
    sentences = _essay_sentences_in(prompt, example)
    assert len(prompt) <= budget < len(needle.essay_text(example, sentences + 1))
    before = prompt.split(needle.NEEDLE.format(**example))[0]
    assert sum(before.count(s) > 0 for s in needle.essay_sentences()[:sentences]) == round(sentences / 4)
    assert prompt.startswith(needle.TEMPLATE.split("{context}")[0])


def test_essay_requests_hide_one_needle_in_the_longest_prose_that_fits():
    from h2o import models
    from h2o.serve.prompts import encode

    tokenizer, _ = models.load_tokenizer()
    for request, example in zip(requests(task="needle_essay"), needle.essay_examples(), strict=True):
        assert request["max_tokens"] == needle.MAX_TOKENS and request["temperature"] == 0.0
        prompt = request["prompt"]
        assert prompt.count("special magic numbers for") == 1 and prompt.count(example["value"]) == 1
        sentences = _essay_sentences_in(prompt, example)
        longer = needle.essay_text(example, sentences + 1)
        budget = needle.prompt_budget(example["length"], needle.MAX_TOKENS)
        assert len(tokenizer.encode(longer, add_special_tokens=False)) > budget, example["id"]
        assert len(encode(tokenizer, prompt, "auto")[0]) + request["max_tokens"] <= example["length"]


def test_requests_fit_smollm2_as_run_helm_reads_them():
    """Templated as run_helm.py templates them, every multi_news request fits SmolLM2's 8,192
    tokens, and every needle fills its length without passing it."""
    from h2o import models
    from h2o.serve.prompts import encode

    tokenizer, config = models.load_tokenizer()
    assert config.max_position_embeddings == CONTEXT

    def tokens(request: dict) -> int:
        return len(encode(tokenizer, request["prompt"], "auto")[0]) + request["max_tokens"]

    assert max(tokens(r) for r in requests(task="multi_news")) <= CONTEXT
    for request, example in zip(requests(task="needle"), needle.examples()):
        assert example["length"] - CHAT_ROOM <= tokens(request) <= example["length"], example["id"]
