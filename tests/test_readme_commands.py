"""Every command the README shows is run: here, by another test (named below, whose file holds the
command), or by `make test` itself. The GPU install lines are the exception, and say so."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent

# Each README command (its comment cut) -> where it runs: (file, text that file holds where it
# runs it). "GPU" for the GPU install, which this CPU machine cannot run.
WHERE = {
    "make venv": ("Makefile", "test: venv"),
    "python -m venv .venv && . .venv/bin/activate": "GPU",
    "pip install torch": "GPU",
    "grep -v '^torch==\\|^triton==' requirements.txt > /tmp/req-gpu.txt && pip install -r /tmp/req-gpu.txt": "GPU",
    "pip install --no-deps -r requirements-nodeps.txt": ("Makefile", "--no-deps -r requirements-nodeps.txt"),
    "pip install --no-deps --no-build-isolation -e .": ("Makefile", "--no-deps --no-build-isolation -e ."),
    "bash helm/setup_offline.sh": ("Makefile", "bash helm/setup_offline.sh"),
    "make help": ("tests/test_first_day.py", '"make", "-s", "help"'),
    "make lab": ("tests/test_readme_commands.py", '"scripts/lab.sh"'),
    "make serve": ("tests/test_readme_commands.py", '"make", "-s", "serve"'),
    "make test": (".ci/run", "make test"),
    "bash scripts/helm/h2o.sh xsum huggyllama/llama-7b llama": ("tests/test_opt_gptneox.py", '"scripts/helm/h2o.sh"'),
    # make lab runs the three scripts on the embedded model, then our_run.sh.
    "bash scripts/helm/full.sh xsum huggyllama/llama-7b llama": ("scripts/lab.sh", "scripts/helm/${mode}.sh"),
    "bash scripts/helm/local.sh xsum huggyllama/llama-7b llama": ("scripts/lab.sh", "scripts/helm/${mode}.sh"),
    "cd helm && ./our_run.sh": ("tests/helm_support.py", '"our_run.sh"'),
    ". ../.venv/bin/activate && helm-server": ("tests/test_readme_commands.py", ". ../.venv/bin/activate && helm-server"),
    "python -m h2o.serve.lm_eval --model h2o-lab --model_args "
    "pretrained=smollm2,policy=h2o,heavy_ratio=0.1,recent_ratio=0.1 "
    "--tasks copa,openbookqa,piqa,winogrande,rte,mathqa --num_fewshot 5 --batch_size 4":
        ("tests/test_lm_eval.py", '"-m", "h2o.serve.lm_eval", "--model", "h2o-lab"'),
    "bash scripts/lm_eval/h2o.sh copa smollm2 llama": ("tests/test_readme_commands.py", '"scripts/lm_eval/h2o.sh"'),
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)
    text = "\n".join(blocks).replace("\\\n", " ")  # a command continued over lines is one
    lines = [re.sub(r"\s+#\s.*$", "", line) for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [" ".join(line.split()) for line in lines if line.strip()]


def test_every_readme_command_is_run_somewhere():
    commands = readme_commands()
    assert "make lab" in commands and "make test" in commands
    unknown = [c for c in commands if c not in WHERE]
    assert not unknown, f"README commands no test runs: {unknown}"
    for command in commands:
        if WHERE[command] != "GPU":
            path, text = WHERE[command]
            assert text in (ROOT / path).read_text(), f"{command!r}: {path} no longer holds {text!r}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int, proc: subprocess.Popen, seconds: float = 60) -> str:
    """The page helm-server gives at http://127.0.0.1:port/, once it is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
                return page.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing answered on port {port} in {seconds} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`make lab`'s script on one request, in a copy of the repository that shares its venv (the
    results land in out/lab and helm/benchmark_output there)."""
    copy = tmp_path_factory.mktemp("repo")
    for folder in ("scripts", "helm", "data"):
        shutil.copytree(ROOT / folder, copy / folder, copy_function=shutil.copy2,
                        ignore=shutil.ignore_patterns("benchmark_output", "__pycache__", "cache"))
    # Timestamps kept, so that make finds the venv up to date.
    for name in ("run_helm.py", "Makefile", "requirements.txt", "requirements-nodeps.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(ROOT / ".venv")
    env = dict(os.environ, LAB_N="1", LAB_BATCH="1", PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "scripts/lab.sh"], cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    return copy, done


def test_make_lab_runs_full_h2o_local_and_prints_the_table(lab):
    copy, done = lab
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for mode in ("full", "h2o", "local"):
        assert (copy / f"out/lab/xsum-llama-{mode}-1.jsonl").read_text().count("\n") == 1
    assert (copy / "helm/benchmark_output/runs/lab-1").is_dir()
    table = done.stdout[done.stdout.index("== HELM evaluation"):]
    assert all(mode in table for mode in ("full", "h2o", "local")) and "rouge" in table.lower(), table


@pytest.mark.parametrize("command", ["make", "activate"])
def test_helm_server_answers_as_the_readme_starts_it(lab, command):
    """After `make lab`: `make serve`, and in helm/ (where `cd helm && ./our_run.sh` leaves the
    user) the venv's own helm-server."""
    copy, done = lab
    assert done.returncode == 0
    port = _free_port()
    if command == "make":
        argv, cwd = ["make", "-s", "serve", "SUITE=lab-1", f"PORT={port}"], copy
    else:
        argv, cwd = ["bash", "-c", f". ../.venv/bin/activate && helm-server --port {port}"], copy / "helm"
    # A new process group: make and bash pass the signal on to the server.
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        assert "<html" in _answers(port, proc).lower()
    finally:
        os.killpg(proc.pid, 15)
        output = proc.communicate(timeout=30)[0]
    if command == "make":
        assert "listening on 127.0.0.1 only" in output


def test_the_papers_lm_eval_script_runs_its_three_steps(tmp_path):
    """`bash scripts/lm_eval/h2o.sh TASK MODEL ARCH` on a tiny model and three documents, in a
    copy of the repository (the script writes its files at the root)."""
    for folder in ("scripts", "data"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    for name in ("generate_task_data.py", "run_lm_eval_harness.py", "evaluate_task_result.py"):
        shutil.copy2(ROOT / name, tmp_path / name)
    model = save_tiny_model(tmp_path / "tiny")
    env = dict(os.environ, LIMIT="3", SHOTS="1", PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    done = subprocess.run(["bash", "scripts/lm_eval/h2o.sh", "copa", str(model), "llama"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "copa-1.jsonl").read_text().count("\n") == 6  # 3 documents x 2 choices
    assert (tmp_path / "copa-1-llama-h2o.jsonl").read_text().count("\n") == 6
    assert "acc" in (tmp_path / "copa-1-llama-h2o.json").read_text()
