"""One table for several evaluated suites of one task: its scores from HELM, KV cache and speed from run_helm.py.

    python -m lab_helm.table [--output-path helm/benchmark_output] SUITE[=LABEL] ...

A row for each results file of each suite (an our_run.sh output_name), in the order they were
evaluated: the task's scores (XSUM's and MultiNews's rouge_1/2/L, the needle's recall,
ruler_string_match_part) are the means in HELM's stats.json;
"KV budget" is the cache policy's share of the prompt (heavy hitters + recent window); "KV MiB"
is the mean peak KV-cache size per request; tok/s is generated tokens over generation time (as
run_helm.py timed its batches, prefill included). The mode is LABEL, or else the point's name,
or else guessed from the KV-cache fields: full, local (no heavy hitters) or the policy's name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lab_helm import helm_cli, suite_env
from lab_helm.evaluate import stat_means
from lab_helm.paths import BENCHMARK_OUTPUT
from lab_helm.tasks import get_task


def _mode(kv: dict) -> str:
    policy = kv.get("policy")
    if policy in (None, "full"):
        return "full"
    if kv.get("heavy_ratio") == 0:
        return "local"
    return str(policy)


def _budget(kv: dict) -> str:
    heavy, recent = kv.get("heavy_ratio"), kv.get("recent_ratio")
    if kv.get("policy") in (None, "full"):
        return "100%"
    if heavy is None or recent is None:
        return "?"
    return f"{heavy + recent:.0%} ({heavy:.0%}+{recent:.0%})"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rows(output_path: Path, suite: str, label: str | None) -> list[tuple[str, list[str]]]:
    """(task, row) for each results file of the suite."""
    models = suite_env.models(suite_env.folder(output_path, suite))
    if not models:
        raise FileNotFoundError(f"{output_path / 'runs' / suite} has no evaluation: run ./our_run.sh ... {suite} first")
    return [row(output_path, suite, model, label) for model in models]


def row(output_path: Path, suite: str, model: str, label: str | None) -> tuple[str, list[str]]:
    summary = json.loads(suite_env.summary_path(output_path, suite, model).read_text())
    means = stat_means(helm_cli.run_dir(output_path, suite, model) / "stats.json")
    task = summary["task"]
    kv = summary.get("kv_cache") or {}
    peak = kv.get("mean_kv_bytes_peak")
    return task, [
        label or summary.get("point") or _mode(kv),
        _budget(kv),
        *(_number(means.get(score), ".4f") for score in get_task(task).scores),
        _number(peak / 2**20 if peak is not None else None, ".2f"),
        _number(summary.get("tokens_per_second"), ".1f"),
        str(summary.get("requests", "-")),
    ]


def columns(task: str) -> list[str]:
    return ["mode", "KV budget", *get_task(task).scores, "KV MiB", "tok/s", "n"]


def render(rows: list[list[str]], columns: list[str]) -> str:
    table = [columns] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
             for r in table]
    lines.insert(1, "|" + "|".join("-" * (w + 1) + (":" if i >= 2 else "-") for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-path", type=Path, default=BENCHMARK_OUTPUT)
    p.add_argument("suites", nargs="+", metavar="SUITE[=LABEL]")
    args = p.parse_args(argv)
    try:
        table = []
        for spec in args.suites:
            suite, _, label = spec.partition("=")
            table += rows(args.output_path, suite, label or None)
        tasks = sorted({task for task, _ in table})
        if len(tasks) > 1:
            raise ValueError(f"the suites hold runs of {' and '.join(tasks)}: one table per task")
    except (FileNotFoundError, ValueError) as error:
        print(f"table: error: {error}", file=sys.stderr)
        return 2
    print(render([r for _, r in table], columns(tasks[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
