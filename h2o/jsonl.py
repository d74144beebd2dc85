"""JSON-lines files whose every problem names the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, NamedTuple


class Line(NamedTuple):
    number: int
    where: str  # "file:line", for messages
    record: dict


def objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[Line]:
    """Each non-blank line's object; a line that is not a JSON object raises `error` with a
    message that starts with `file:line:`."""
    with Path(path).open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as problem:
                raise error(f"{where}: not valid UTF-8 (byte {problem.start + 1} of the line)") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as problem:
                raise error(f"{where}: not valid JSON ({problem.msg})") from None
            except RecursionError:
                raise error(f"{where}: nested too deeply") from None
            if not isinstance(record, dict):
                raise error(f"{where}: a line must be a JSON object")
            yield Line(number, where, record)
