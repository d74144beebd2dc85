"""Export stage: regenerate data/<task>.jsonl, the requests HELM makes, with `helm-run --dry-run`.

    python -m lab_helm.export [--task xsum|cnn_dm|multi_news|needle|needle_essay] [--n N] [--output FILE | --check]

Builds the scenario pickle from the task's examples in a scratch output folder, runs helm-run
--dry-run with the same run entry, deployment, tokenizer, max length and instance selection as
our_run.sh, and writes one `{"request": ...}` line per HELM request, in HELM's order (the articles'
order). `--check` writes nothing: it exits 1 unless the first N lines of the committed file are
exactly what HELM makes now. Needs no network.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import dacite
from helm.common.request import Request

from lab_helm import helm_cli, scenario_data
from lab_helm.requests import request_dict
from lab_helm.tasks import TASKS, get_task

EXPORT_MODEL_ARCH = "llama"  # any h2o-lab/* deployment gives the same prompts: they share tokenizer and length


def request_lines(task_name: str, n: int | None = None, log: Path | None = None) -> list[str]:
    """The lines of data/<task>.jsonl for the first n articles (all when None)."""
    task = get_task(task_name)
    n = n or len(task.load())
    with tempfile.TemporaryDirectory(prefix="lab_helm_export_") as tmp:
        scenario_data.write(task, tmp, n)
        args = helm_cli.run_args(task.entry(EXPORT_MODEL_ARCH), "export", n, tmp, dry_run=True)
        with open(log or Path(tmp) / "helm-run.log", "w") as out:
            done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"helm-run --dry-run failed (exit {done.returncode}); log: {log or 'rerun with --log'}")
        state = json.loads((helm_cli.run_dir(tmp, "export") / "scenario_state.json").read_text())
    lines = []
    for number, request_state in enumerate(state["request_states"], start=1):
        if request_state.get("prompt_truncated"):
            raise RuntimeError(f"HELM truncated prompt {number} to fit the deployment: the prompts would not be the task's")
        if request_state.get("num_train_instances", 0) != 0:
            raise RuntimeError(f"request {number} has in-context examples: the export must be zero-shot")
        request = dacite.from_dict(Request, request_state["request"])
        lines.append(json.dumps({"request": request_dict(request)}, ensure_ascii=False))
    if len(lines) != n:
        raise RuntimeError(f"HELM made {len(lines)} requests for {n} articles")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="xsum", choices=sorted(TASKS))
    p.add_argument("--n", type=int, default=None, help="first N articles (default: all)")
    p.add_argument("--output", default=None, help="where to write (default: data/<task>.jsonl)")
    p.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    p.add_argument("--log", type=Path, default=None, help="keep helm-run's log here")
    args = p.parse_args(argv)
    task = get_task(args.task)
    lines = request_lines(args.task, args.n, args.log)
    if args.check:
        committed = task.requests.read_text(encoding="utf-8").splitlines()
        if committed[: len(lines)] != lines:
            first = next((i for i, (a, b) in enumerate(zip(committed, lines)) if a != b), min(len(committed), len(lines)))
            print(f"{task.requests}: line {first + 1} differs from what helm-run --dry-run makes; "
                  "rerun helm/export_requests.sh", file=sys.stderr)
            return 1
        print(f"{task.requests}: the first {len(lines)} lines match helm-run --dry-run")
        return 0
    output = Path(args.output) if args.output else task.requests
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} requests to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
