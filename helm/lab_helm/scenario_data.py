"""Build the pickle a task's HELM scenario reads, from the task's examples.

HELM's `SummarizationScenario` loads `<output>/scenarios/summarization/data/xsum.pk`, a pickle of
`{"train": [...], "validation": [...], "test": [...]}` lists of `{"document", "summary"}`, and
downloads it only when the file is absent. Writing it ourselves keeps HELM offline and makes it
read exactly our articles: the first `n` of data/xsum/xsum_test_500.jsonl, in file order, as the
test split. Train and validation stay empty: the runs are zero-shot, and any validation instance
would be evaluated too. The lab's own scenarios (lab_helm.scenarios) read a pickle of the same
shape: MultiNews's `{"id", "context", "summary"}`, the needle's generated examples.

    python -m lab_helm.scenario_data [--task xsum] [--n 500] [--output-path benchmark_output]
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
from pathlib import Path

from lab_helm.paths import BENCHMARK_OUTPUT
from lab_helm.tasks import TASKS, Task, get_task


def scenario_pickle_path(task: Task, output_path: str | Path) -> Path:
    return Path(output_path) / "scenarios" / task.scenario_name / "data" / task.pickle_name


def build(task: Task, n: int | None = None) -> dict:
    articles = task.load()
    if n is not None:
        if not 1 <= n <= len(articles):
            raise ValueError(f"n must be between 1 and {len(articles)}, got {n}")
        articles = articles[:n]
    return {"train": [], "validation": [], "test": articles}


def write(task: Task, output_path: str | Path, n: int | None = None) -> Path:
    """Write the pickle for the first `n` articles (all when None); atomic, so a reader never sees
    half a file."""
    target = scenario_pickle_path(task, output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(build(task, n), f, protocol=4)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="xsum", choices=sorted(TASKS))
    p.add_argument("--n", type=int, default=None, help="first N articles (default: all)")
    p.add_argument("--output-path", default=str(BENCHMARK_OUTPUT), help="HELM's -o/--output-path")
    args = p.parse_args(argv)
    print(write(get_task(args.task), args.output_path, args.n))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
