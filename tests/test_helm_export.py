"""The export stage: helm-run --dry-run regenerates data/xsum.jsonl exactly, with the network cut."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "helm"))

from lab_helm import testing  # noqa: E402


def test_export_equals_committed_requests(tmp_path):
    out = tmp_path / "xsum.jsonl"
    cut = list(testing.net_cut() or ())
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'helm'}:{ROOT}"}
    done = subprocess.run(
        [*cut, sys.executable, "-m", "lab_helm.export", "--output", str(out), "--log", str(tmp_path / "helm-run.log")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "helm-run.log").read_text()[-3000:]
    # All 500, byte for byte: generation (run_helm.py reads this file) and evaluation agree.
    assert out.read_bytes() == testing.REQUESTS.read_bytes()
