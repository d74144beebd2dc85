"""Read a results jsonl from run_helm.py and match it against the requests HELM asks for.

Every problem is a `ResultsError` with a one-line message: a missing or empty file, a bad line
(named `file:line`), two results for one request, results for prompts HELM does not ask for, and
requests HELM asks for that have no result (how many, and the first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from h2o import jsonl
from lab_helm.requests import differences, snippet


class ResultsError(Exception):
    """A results file that cannot be evaluated; the message is one line."""


@dataclass(frozen=True)
class Record:
    line: int
    request: dict
    result: dict


def _check_result(result: dict, where: str) -> None:
    choices = result.get("choices")
    if not isinstance(choices, list) or not choices:
        raise ResultsError(f"{where}: result has no 'choices'")
    for choice in choices:
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str):
            raise ResultsError(f"{where}: every choice needs a 'text' string")
        logprobs = choice.get("logprobs")
        if logprobs is None:
            continue
        if not isinstance(logprobs, dict):
            raise ResultsError(f"{where}: 'logprobs' must be an object")
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not isinstance(tokens, list) or not isinstance(values, list) or len(tokens) != len(values):
            raise ResultsError(f"{where}: 'logprobs' needs 'tokens' and 'token_logprobs' lists of one length")


def load(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"results file {path} does not exist")
    if not path.is_file():
        raise ResultsError(f"results file {path} is not a file")
    records = []
    for number, where, record in jsonl.objects(path, ResultsError):
        request, result = record.get("request"), record.get("result")
        if not isinstance(request, dict) or not isinstance(request.get("prompt"), str):
            raise ResultsError(f"{where}: no 'request' object with a 'prompt'")
        if not isinstance(result, dict):
            raise ResultsError(f"{where}: no 'result' object")
        _check_result(result, where)
        records.append(Record(number, request, result))
    if not records:
        raise ResultsError(f"results file {path} is empty")
    return records


def read_requests(path: str | Path) -> list[dict]:
    """The `request` objects of a requests file such as data/xsum.jsonl, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["request"] for line in f if line.strip()]


def index(records: list[Record], path: str | Path) -> dict[str, Record]:
    """Results by prompt; a second result for the same prompt is an error."""
    by_prompt: dict[str, Record] = {}
    for record in records:
        first = by_prompt.get(record.request["prompt"])
        if first is not None:
            raise ResultsError(f"{path}:{record.line}: a second result for the request of line {first.line}")
        by_prompt[record.request["prompt"]] = record
    return by_prompt


def match(
    wanted: list[dict], records: list[Record], path: str | Path, asked: str, names: list[str] | None = None
) -> list[Record]:
    """The record answering each wanted request, in `wanted` order.

    `asked` says what HELM asks for (for messages); `names[i]` names wanted request i.
    Raises ResultsError listing, one line each, results HELM did not ask for and requests
    without a result.
    """
    by_prompt = index(records, path)
    wanted_by_prompt = {request["prompt"]: i for i, request in enumerate(wanted)}

    problems = []
    extra = [r for r in records if r.request["prompt"] not in wanted_by_prompt]
    if extra:
        first = extra[0]
        problems.append(
            f"{path}: {len(extra)} result(s) for prompts HELM does not ask for ({asked}); "
            f"first: line {first.line}, prompt {snippet(first.request['prompt'])}"
        )
    changed = [
        (r, differences(r.request, wanted[wanted_by_prompt[r.request["prompt"]]]))
        for r in records
        if r.request["prompt"] in wanted_by_prompt
    ]
    changed = [(r, d) for r, d in changed if d]
    if changed:
        first, diff = changed[0]
        problems.append(
            f"{path}: {len(changed)} result(s) for requests HELM asks with other settings; "
            f"first: line {first.line}, {'; '.join(diff)}"
        )
    missing = [i for i, request in enumerate(wanted) if request["prompt"] not in by_prompt]
    if missing:
        i = missing[0]
        name = f" ({names[i]})" if names else ""
        problems.append(
            f"{path}: lacks {len(missing)} of the {len(wanted)} results HELM asks for ({asked}); "
            f"first: request {i + 1}{name}, prompt {snippet(wanted[i]['prompt'])}"
        )
    if problems:
        raise ResultsError("\n".join(problems))
    return [by_prompt[request["prompt"]] for request in wanted]
