#!/usr/bin/env python
"""Copy the 500 XSUM test articles into data/xsum/, checking they are the expected file.

    python scripts/data/vendor_xsum.py SOURCE.jsonl

The expected size and sha256 are those in data/README.md; any other file is refused. Not used at
run or test time: the vendored copy is committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

SHA256 = "f29bf87cc4ef36a72763d6ad2e60a74ceb1edd2de0d5bcae25968ff111dcce20"
TARGET = Path(__file__).resolve().parents[2] / "data" / "xsum" / "xsum_test_500.jsonl"


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
    assert len(rows) == 500 and all(set(r) == {"id", "document", "summary"} for r in rows)
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, TARGET)
    print(f"{TARGET}: 500 articles")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
