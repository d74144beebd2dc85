"""Data parallel on the CPU: two gloo ranks under torchrun give what one process gives."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from test_run_helm import _requests, _run, model_dir  # noqa: F401  (fixture)

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_ranks_merge_into_the_single_rank_output(model_dir, tmp_path):  # noqa: F811
    inp = _requests(tmp_path / "in.jsonl", n=5, temperature=0.7)
    assert _run(model_dir, inp, tmp_path / "single.jsonl", "--enable_small_cache") == 0
    out = tmp_path / "parallel.jsonl"
    assert _run(model_dir, inp, out, "--enable_small_cache", "--sample_num", "1") == 0  # resume from 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", "29531", str(ROOT / "run_helm.py"),
         "--input_path", str(inp), "--output_path", str(out), "--model_name", str(model_dir),
         "--no_cuda", "--enable_small_cache"],
        check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300,
    )
    texts = lambda path: [json.loads(line)["result"]["choices"][0]["text"] for line in open(path)]  # noqa: E731
    requests = lambda path: [json.loads(line)["request"] for line in open(path)]  # noqa: E731
    assert requests(out) == requests(inp)
    assert texts(out) == texts(tmp_path / "single.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir() if ".part" in p.name) == []


def test_a_device_map_runs_the_small_cache(model_dir, tmp_path):  # noqa: F811
    inp = _requests(tmp_path / "in.jsonl", n=2)
    assert _run(model_dir, inp, tmp_path / "a.jsonl", "--enable_small_cache") == 0
    assert _run(model_dir, inp, tmp_path / "b.jsonl", "--enable_small_cache", "--device_map", "auto") == 0
    first = [json.loads(x)["result"]["choices"][0]["text"] for x in open(tmp_path / "a.jsonl")]
    assert first == [json.loads(x)["result"]["choices"][0]["text"] for x in open(tmp_path / "b.jsonl")]
