"""The export stage: helm-run --dry-run regenerates each task's requests file exactly, with the network cut."""

from __future__ import annotations

import subprocess
import sys

import pytest

import helm_support
from lab_helm.tasks import get_task


@pytest.mark.parametrize("task", ["xsum", "cnn_dm", "multi_news", "needle", "needle_essay"])
def test_export_equals_committed_requests(tmp_path, task):
    out = tmp_path / f"{task}.jsonl"
    cut = list(helm_support.net_cut() or ())
    done = subprocess.run(
        [*cut, sys.executable, "-m", "lab_helm.export", "--task", task, "--output", str(out),
         "--log", str(tmp_path / "helm-run.log")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "helm-run.log").read_text()[-3000:]
    # Every request, byte for byte: generation (run_helm.py reads this file) and evaluation agree.
    assert out.read_bytes() == get_task(task).requests.read_bytes()
