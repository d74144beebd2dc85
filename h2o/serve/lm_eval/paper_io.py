"""The files of the paper's three lm-eval steps: request lines (`generate_task_data.py`'s output,
`run_lm_eval_harness.py`'s input) and result lines (its output, `evaluate_task_result.py`'s input).

A request line is the paper's (`prompt` = context + continuation, and its fixed fields), plus the
lab's `context` and `continuation`, which say where the scored tokens begin. A result line is
`{"request": <the line>, "result": {"choices": [{"text", "logprobs": {"tokens", "token_logprobs",
"top_logprobs", "text_offset"}, "finish_reason"}], "continuation_tokens", "kv_cache"}}`, as the
paper's with the continuation's token count and the cache it was scored with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from h2o.jsonl import objects
from h2o.serve.lm_eval.tasks import BadInput

# The paper's fixed request fields (h2o_hf/generate_task_data.py).
FIXED = {"best_of": 1, "echo": True, "logprobs": 1, "max_tokens": 0, "model": "x", "n": 1,
         "request_type": "language-model-inference", "stop": None, "temperature": 0, "top_p": 1}


def request_line(context: str, continuation: str) -> dict:
    """The request line of one (context, continuation) pair."""
    return {**FIXED, "prompt": context + continuation, "context": context, "continuation": continuation}


def key(request: dict) -> str:
    """How a result is looked up: its request as JSON (the paper's `json_to_key`)."""
    return json.dumps(request)


def read_requests(path: str | Path) -> list[dict]:
    """Every request line of `path`, checked; a bad one is `file:line: ...`."""
    if not Path(path).is_file():
        raise BadInput(f"--input-path: no such file: {path}")
    requests = []
    for line in objects(path, BadInput):
        record = line.record
        for field in ("prompt", "context", "continuation"):
            if not isinstance(record.get(field), str):
                raise BadInput(f"{line.where}: a request needs a string {field!r} (lines come from generate_task_data.py)")
        if record["prompt"] != record["context"] + record["continuation"]:
            raise BadInput(f"{line.where}: 'prompt' is not 'context' + 'continuation'")
        if not record["context"] or not record["continuation"]:
            raise BadInput(f"{line.where}: an empty 'context' or 'continuation' has nothing to score")
        requests.append(record)
    if not requests:
        raise BadInput(f"{path}: no requests")
    return requests


def read_results(path: str | Path) -> dict[str, dict]:
    """Each result line's result by its request's key; a bad line is `file:line: ...`."""
    if not Path(path).is_file():
        raise BadInput(f"--result-file: no such file: {path}")
    results = {}
    for line in objects(path, BadInput):
        request, result = line.record.get("request"), line.record.get("result")
        try:
            logprobs = result["choices"][0]["logprobs"]
            n = result["continuation_tokens"]
            ok = (isinstance(request, dict) and isinstance(n, int) and 0 < n < len(logprobs["token_logprobs"])
                  and len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
                  and all(isinstance(v, (int, float)) for v in logprobs["token_logprobs"][-n:])
                  and all(isinstance(t, dict) and len(t) == 1 for t in logprobs["top_logprobs"][-n:]))
        except (TypeError, KeyError, IndexError):
            ok = False
        if not ok:
            raise BadInput(f"{line.where}: not a result line of run_lm_eval_harness.py")
        results[key(request)] = result
    return results


def write_lines(path: str | Path, records: Iterable[dict]) -> None:
    """All lines at once, through a temporary file renamed into place: never half a file."""
    path = Path(path)
    if path.is_dir():
        raise BadInput(f"{path} is a directory; give a file")
    temporary = path.with_name(f".{path.name}.partial")
    with temporary.open("w") as out:
        for record in records:
            out.write(json.dumps(record) + "\n")
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
