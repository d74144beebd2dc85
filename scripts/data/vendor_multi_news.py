#!/usr/bin/env python
"""Copy LongBench's 200 MultiNews examples into data/longbench/, checking they are the expected file.

    python scripts/data/vendor_multi_news.py SOURCE.jsonl

The expected sha256 is the one in data/README.md; any other file is refused. Not used at run or
test time: the vendored copy is committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

SHA256 = "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b"
TARGET = Path(__file__).resolve().parents[2] / "data" / "longbench" / "multi_news.jsonl"
FIELDS = {"_id", "context", "answers", "input", "length", "dataset", "language", "all_classes"}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[0])
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if digest != SHA256:
        print(f"{source}: sha256 {digest}, expected {SHA256}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == 200 and all(set(r) == FIELDS and len(r["answers"]) == 1 for r in rows)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, TARGET)
    print(f"{TARGET}: 200 examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
