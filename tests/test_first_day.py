"""A student's first commands: a mistyped task leaves nothing behind, and `make help` lists the targets."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def test_our_run_unknown_task_leaves_nothing(tmp_path):
    shutil.copytree(ROOT / "helm", tmp_path / "helm", ignore=shutil.ignore_patterns("benchmark_output", "__pycache__"))
    shutil.copytree(ROOT / "data", tmp_path / "data")
    (tmp_path / "h2o.jsonl").write_text("")
    before = _tree(tmp_path)
    proc = subprocess.run(["bash", "helm/our_run.sh", "h2o=h2o.jsonl", "nosuchtask", "llama"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nosuchtask" in lines[0], proc.stderr
    assert _tree(tmp_path) == before


def test_make_help_lists_the_targets():
    proc = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    targets = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("make ")}
    assert {"lab", "test", "venv", "serve"} <= targets
