#!/usr/bin/env python
"""Copy a source dataset into data/, checking it is the expected file.

    python scripts/data/vendor.py xsum SOURCE.jsonl         # -> data/xsum/xsum_test_500.jsonl
    python scripts/data/vendor.py multi_news SOURCE.jsonl   # -> data/longbench/multi_news.jsonl

The expected sha256 of each is the one in data/README.md; any other file is refused. Not used at
run or test time: the vendored copies are committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
LONGBENCH_FIELDS = {"_id", "context", "answers", "input", "length", "dataset", "language", "all_classes"}
# name: (sha256, target, rows, check of one row)
SOURCES = {
    "xsum": ("f29bf87cc4ef36a72763d6ad2e60a74ceb1edd2de0d5bcae25968ff111dcce20", DATA / "xsum" / "xsum_test_500.jsonl",
             500, lambda r: set(r) == {"id", "document", "summary"}),
    "multi_news": ("f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b",
                   DATA / "longbench" / "multi_news.jsonl", 200,
                   lambda r: set(r) == LONGBENCH_FIELDS and len(r["answers"]) == 1),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SOURCES:
        print(__doc__, file=sys.stderr)
        return 2
    sha256, target, count, check = SOURCES[argv[0]]
    source = Path(argv[1])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != sha256:
        print(f"{source}: sha256 {digest}, expected {sha256}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != count or not all(check(r) for r in rows):
        print(f"{source}: not {count} rows of the expected fields", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    print(f"{target}: {count} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
