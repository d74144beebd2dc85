"""run_helm.py (h2o.serve.cli.main) on requests whose prompts are not in length order, several at a
time: the output follows the input's order, and each result is the one that request gets alone."""

from __future__ import annotations

import json

import pytest

from conftest import random_prompts
from h2o.serve.cli import main

LENGTHS = [70, 31, 95, 44, 58, 23, 81]  # neither ascending nor descending
MAX_TOKENS = [12, 5, 16, 9, 14, 7, 11]  # rows end at different steps


def _request(prompt: list[int], max_tokens: int) -> dict:
    return {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.0, "max_tokens": max_tokens,
            "stop": ["###"], "top_p": 1, "n": 1, "top_k_per_token": 2}


def _write(path, requests: list[dict]):
    path.write_text("".join(json.dumps({"request": r}) + "\n" for r in requests))
    return path


def _run(tiny_model_dir, inp, out, *flags) -> list[dict]:
    assert main(["--input_path", str(inp), "--output_path", str(out), "--model_name", str(tiny_model_dir),
                 "--no_cuda", *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _same_result(got: dict, alone: dict, kv_skip: tuple[str, ...] = ()) -> None:
    a, b = got["choices"][0], alone["choices"][0]
    assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
    assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
    assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"]
    assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-4)
    for x, y in zip(a["logprobs"]["top_logprobs"], b["logprobs"]["top_logprobs"]):
        assert x.keys() == y.keys() and list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)
    kv = [{k: v for k, v in r["kv_cache"].items() if k not in kv_skip} for r in (got, alone)]
    assert kv[0] == kv[1]


SMALL = ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"]
RUNS = {
    "reference-drop": ["--engine", "reference", *SMALL],
    "reference-mask": ["--engine", "reference", "--kv_mode", "mask", *SMALL],
    "reference-full": ["--engine", "reference"],
    "fast-drop": ["--engine", "fast", *SMALL],
    "fast-full": ["--engine", "fast"],
}


@pytest.mark.parametrize("batch_size", ["2", "3"])
@pytest.mark.parametrize("run", list(RUNS))
def test_results_come_in_input_order_and_equal_each_request_alone(tiny_model_dir, tmp_path, run, batch_size):
    requests = [_request(p, m) for p, m in zip(random_prompts(LENGTHS, seed=40), MAX_TOKENS)]
    inp = _write(tmp_path / "in.jsonl", requests)
    lines = _run(tiny_model_dir, inp, tmp_path / "out.jsonl", "--batch_size", batch_size, *RUNS[run])
    assert [line["request"] for line in lines] == requests
    for i, (line, request) in enumerate(zip(lines, requests)):
        alone = _run(tiny_model_dir, _write(tmp_path / f"alone{i}.jsonl", [request]), tmp_path / f"alone{i}.out.jsonl",
                     *RUNS[run])
        # Mask mode's peak counts what the batch decodes after the request ended (not compared).
        _same_result(line["result"], alone[0]["result"], ("kv_bytes_peak",) if run == "reference-mask" else ())
        assert len(line["result"]["choices"][0]["logprobs"]["tokens"]) == request["max_tokens"]
        if run != "reference-full" and run != "fast-full":
            assert line["result"]["kv_cache"]["prompt_tokens"] == LENGTHS[i]
            assert line["result"]["kv_cache"]["heavy_budget"] == int(0.1 * LENGTHS[i])
    texts = [line["result"]["choices"][0]["text"] for line in lines]
    assert len(set(texts)) == len(texts)  # each request its own continuation: a mix-up would show


def test_both_engines_agree_on_the_shuffled_requests(tiny_model_dir, tmp_path):
    requests = [_request(p, m) for p, m in zip(random_prompts(LENGTHS, seed=40), MAX_TOKENS)]
    inp = _write(tmp_path / "in.jsonl", requests)
    for small in (SMALL, []):
        runs = [_run(tiny_model_dir, inp, tmp_path / f"{engine}{len(small)}.jsonl", "--batch_size", "3",
                     "--engine", engine, *small) for engine in ("reference", "fast")]
        for reference, fast in zip(*runs):
            # The fast engine's peak counts its allocated slots; the reference's what it held.
            _same_result(fast["result"], reference["result"], ("engine", "kv_bytes_peak"))
