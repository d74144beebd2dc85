"""HELM requests in, HELM results out, one JSON object a line.

Input lines: {"request": {"prompt", "temperature", "max_tokens", "stop", "top_p", "n", ...}}.
Output lines: {"request": <as read>, "result": {"choices": [...], "request_time", "finished_at", ...}},
in input order (`h2o.serve.results` writes them: whole lines, synced, so an interrupted run leaves a
valid prefix to resume from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from h2o import jsonl
from h2o.engine.transcript import Completion


class InputError(ValueError):
    """A bad input file or line; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Request:
    line: int
    raw: dict
    prompt: str
    temperature: float
    max_tokens: int
    stop: tuple[str, ...]
    top_p: float
    n: int
    top_logprobs: int


def _field(raw: dict, name: str, kind: type, where: str, default: object = None) -> object:
    if name not in raw:
        if default is None:
            raise InputError(f"{where}: request has no {name!r}")
        return default
    value = raw[name]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise InputError(f"{where}: {name!r} must be {kind.__name__}, got {value!r}")
    return value


def read_requests(path: str | Path) -> list[Request]:
    """Parse a requests file; every problem names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    requests = []
    for number, where, record in jsonl.objects(path, InputError):
        raw = record.get("request")
        if not isinstance(raw, dict):
            raise InputError(f"{where}: line has no 'request' object")
        stop = _field(raw, "stop", list, where, default=[])
        if not all(isinstance(s, str) for s in stop):
            raise InputError(f"{where}: 'stop' must be a list of strings")
        request = Request(
            line=number,
            raw=raw,
            prompt=_field(raw, "prompt", str, where),
            temperature=float(_field(raw, "temperature", float, where)),
            max_tokens=_field(raw, "max_tokens", int, where),
            stop=tuple(stop),
            top_p=float(_field(raw, "top_p", float, where, default=1.0)),
            n=_field(raw, "n", int, where, default=1),
            top_logprobs=_field(raw, "top_k_per_token", int, where, default=1),
        )
        for wrong, need in ((request.temperature < 0, f"temperature >= 0, got {request.temperature}"),
                            (request.max_tokens < 1, f"max_tokens >= 1, got {request.max_tokens}"),
                            (not 0 < request.top_p <= 1, f"0 < top_p <= 1, got {request.top_p}")):
            if wrong:
                raise InputError(f"{where}: need {need}")
        if request.n != 1:
            raise InputError(f"{where}: n={request.n}: only one completion per request is supported")
        requests.append(request)
    if not requests:
        raise InputError(f"{path}: no requests in file")
    return requests


def whole_lines(path: Path) -> list[bytes]:
    """The file's complete lines (none if it is absent); a torn last line (a run killed mid-write)
    is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]
    if len(whole) != len(data):
        with path.open("r+b") as handle:
            handle.truncate(len(whole))
    return whole.split(b"\n")[:-1]


def completed_count(output: str | Path, requests: list[Request]) -> int:
    """How many requests the output already answers, in order. A torn last line is cut off; a
    result for another request is an error, never overwritten."""
    output = Path(output)
    done = 0
    for number, raw in enumerate(whole_lines(output), start=1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise InputError(f"{output}:{number}: not valid JSON; move the file away to start over") from None
        if not isinstance(record, dict) or done >= len(requests) or record.get("request") != requests[done].raw:
            raise InputError(
                f"{output}:{number}: holds a result for a request not at this place in the input; "
                "use another --output_path"
            )
        done += 1
    return done


def result_record(request: Request, completion: Completion, batch_size: int, chat_template: bool,
                  finished_at: float) -> dict:
    """The output line of one request. `request_time`: its latency, from its start to its result
    (`Completion.seconds`: a lock-step batch's wall time, or admission to end under continuous
    batching); `finished_at`: when its result existed, in Unix seconds, so that a reader can place
    the request in time; `batch_size`: the sequences decoded at once."""
    return {
        "request": request.raw,
        "result": {
            "choices": [
                {
                    "text": completion.text,
                    "logprobs": {
                        "tokens": completion.tokens,
                        "token_logprobs": completion.token_logprobs,
                        "top_logprobs": completion.top_logprobs,
                        "text_offset": completion.text_offset,
                    },
                    "finish_reason": completion.finish_reason,
                }
            ],
            "request_time": completion.seconds,
            "finished_at": finished_at,
            "batch_size": batch_size,
            "chat_template": chat_template,
            "kv_cache": completion.kv_cache,
        },
    }

