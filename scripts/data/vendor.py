#!/usr/bin/env python
"""Copy a source dataset into data/, checking it is the expected file.

    python scripts/data/vendor.py xsum SOURCE.jsonl         # -> data/xsum/xsum_test_500.jsonl
    python scripts/data/vendor.py multi_news SOURCE.jsonl   # -> data/longbench/multi_news.jsonl
    python scripts/data/vendor.py cnn_dm SOURCE.jsonl       # -> data/cnn_dm/cnn_dm_test_1000.jsonl

The expected sha256 of each source is the one in data/README.md; any other file is refused. XSUM
and MultiNews are copied as they are; CNN/DailyMail's source holds the paper's prompts, from which
the article and the reference highlights are taken back out. Not used at run or test time: the
vendored copies are committed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data"
LONGBENCH_FIELDS = {"_id", "context", "answers", "input", "length", "dataset", "language", "all_classes"}
# The paper's CNN/DailyMail prompt around each article (its summarization scripts' 0-shot file).
CNN_DM_PROMPT = ("###\nArticle: ", "\n\nSummarize the above article in 3 sentences.")


def _cnn_dm_row(row: dict) -> bool:
    head, tail = CNN_DM_PROMPT
    return row["article"].startswith(head) and row["article"].endswith(tail) and isinstance(row["summary_gt"], str)


def _cnn_dm(rows: list[dict]) -> list[dict]:
    """HELM's field names (`article`, `highlights`) and an id, the prompt taken off the article."""
    head, tail = CNN_DM_PROMPT
    return [{"id": f"cnn_dm-test-{i:04d}", "article": r["article"][len(head):-len(tail)], "highlights": r["summary_gt"]}
            for i, r in enumerate(rows)]


# name: (sha256 of the source, target, rows, check of one row[, conversion of the rows])
SOURCES = {
    "xsum": ("f29bf87cc4ef36a72763d6ad2e60a74ceb1edd2de0d5bcae25968ff111dcce20", DATA / "xsum" / "xsum_test_500.jsonl",
             500, lambda r: set(r) == {"id", "document", "summary"}),
    "multi_news": ("f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b",
                   DATA / "longbench" / "multi_news.jsonl", 200,
                   lambda r: set(r) == LONGBENCH_FIELDS and len(r["answers"]) == 1),
    "cnn_dm": ("bc8eb40985c8a8bae7706eaf4fe296d2e00d58489e6ca965a99d23e40c3a7182",
               DATA / "cnn_dm" / "cnn_dm_test_1000.jsonl", 1000, _cnn_dm_row, _cnn_dm),
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in SOURCES:
        print(__doc__, file=sys.stderr)
        return 2
    sha256, target, count, check, *convert = SOURCES[argv[0]]
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
    if convert:
        target.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in convert[0](rows)), encoding="utf-8")
    else:
        shutil.copyfile(source, target)
    print(f"{target}: {count} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
