"""The schema helm-summarize gets for a suite, so that helm-server compares its points.

HELM's default schema (schema_classic.yaml) files XSUM under "Core scenarios" beside a dozen
scenarios we never run, and its leaderboard opens on that empty overview. This one has only the
suite's tasks: one group per run group of the suite's runs, first, so the leaderboard opens on the
first task. A task's name, description and main metric come from the first definitions file that
has its group (`--definitions`, then HELM's default schema); its first table, "Scores", is the
ROUGE-1/2/L, coverage, density and compression its runs report, and its main metric; then come
efficiency and general information. Metric display names and descriptions come from the same files.

    python -m lab_helm.schema --suite NAME [--output-path DIR] [--definitions YAML ...]
        writes <output>/prod_env/<suite>/schema.yaml and prints its path
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from helm.benchmark.presentation.schema import get_default_schema_path

from lab_helm import suite_env
from lab_helm.paths import BENCHMARK_OUTPUT

SUMMARIZATION = ("rouge_1", "rouge_2", "rouge_l", "summarization_coverage", "summarization_density",
                 "summarization_compression")
SPLIT = "${main_split}"
GROUP_FIELDS = ("display_name", "short_display_name", "description", "taxonomy")


def _shared_metric_groups(definitions: list[dict]) -> list[dict]:
    general = next(g for d in definitions for g in d.get("metric_groups") or [] if g["name"] == "general_information")
    return [
        {"name": "efficiency", "display_name": "Efficiency",
         "description": "Seconds per request as run_helm.py timed its batches (a batch's time over its size).",
         "metrics": [{"name": "inference_runtime", "split": SPLIT}]},
        general,
    ]


def _runs(suite_dir: Path) -> list[tuple[dict, set[str]]]:
    """(run spec, names of its test-split stats) of every run in the suite, in folder order."""
    runs = []
    for run in sorted(p for p in suite_dir.iterdir() if (p / "run_spec.json").exists() and (p / "stats.json").exists()):
        stats = json.loads((run / "stats.json").read_text())
        names = {s["name"]["name"] for s in stats if s["name"].get("split") == "test"}
        runs.append((json.loads((run / "run_spec.json").read_text()), names))
    if not runs:
        raise FileNotFoundError(f"no run with run_spec.json and stats.json in {suite_dir}")
    return runs


def _task_group(name: str, reported: set[str], definitions: list[dict]) -> tuple[dict, dict]:
    """The run group of one task and its "Scores" metric group."""
    known = next((g for d in definitions for g in d.get("run_groups") or [] if g["name"] == name), {})
    main = (known.get("environment") or {}).get("main_name")
    scores = [m for m in SUMMARIZATION if m in reported] + ([main] if main and main not in SUMMARIZATION else [])
    metric_group = {"name": f"{name}_scores", "display_name": "Scores",
                    "metrics": [{"name": m, "split": SPLIT} for m in scores]}
    group = {"name": name, "display_name": name, **{k: known[k] for k in GROUP_FIELDS if k in known},
             "category": "Tasks", "metric_groups": [metric_group["name"], "efficiency", "general_information"],
             "environment": {**({"main_name": main} if main else {}), "main_split": "test"}}
    return group, metric_group


def build(suite_dir: Path, definition_files: list[Path]) -> dict:
    definitions = []
    for path in [*definition_files, Path(get_default_schema_path())]:
        with open(path, encoding="utf-8") as f:
            definitions.append(yaml.safe_load(f) or {})
    reported: dict[str, set[str]] = {}
    for spec, names in _runs(suite_dir):
        for group in spec["groups"]:
            reported.setdefault(group, set()).update(names)
    tasks = [_task_group(name, names, definitions) for name, names in reported.items()]
    metrics = {}
    for d in definitions:
        for metric in d.get("metrics") or []:
            metrics.setdefault(metric["name"], metric)
    # A group of groups, after the tasks: without one HELM adds "All scenarios" and opens on it.
    overview = {"name": "h2o_lab_tasks", "display_name": "All tasks", "category": "All tasks",
                "description": "Every task of this suite.", "subgroups": [g["name"] for g, _ in tasks]}
    return {"metrics": list(metrics.values()), "perturbations": [],
            "metric_groups": [m for _, m in tasks] + _shared_metric_groups(definitions),
            "run_groups": [g for g, _ in tasks] + [overview]}


def write(output_path: str | Path, suite: str, definition_files: Sequence[Path] = ()) -> Path:
    schema = build(Path(output_path) / "runs" / suite, list(definition_files))
    path = suite_env.folder(output_path, suite) / "schema.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(schema, sort_keys=False, allow_unicode=True))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True)
    p.add_argument("--output-path", default=str(BENCHMARK_OUTPUT))
    p.add_argument("--definitions", type=Path, nargs="*", default=[],
                   help="schema files whose run groups and metrics come before HELM's default schema's")
    args = p.parse_args(argv)
    try:
        print(write(args.output_path, args.suite, args.definitions))
    except FileNotFoundError as error:
        print(f"our_run.sh: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
