"""The schema helm-summarize gets for a suite, so that helm-server compares its points.

HELM's default schema (schema_classic.yaml) files XSUM under "Core scenarios" beside a dozen
scenarios we never run, and its leaderboard opens on that empty overview. This one has only the
suite's tasks (lab_helm.tasks, found by their runs' run entries), one group each, first, so the
leaderboard opens on the first task; a task's first table, "Scores", is the metrics the task
declares, its main metric first, by which the page sorts (XSUM: ROUGE-2, ROUGE-1, ROUGE-L,
coverage, density, compression), then come efficiency and general information. Names, descriptions and display names of groups and metrics are those of the
installed HELM's schemas (schema_classic.yaml first) where they have them.

    python -m lab_helm.schema --suite NAME [--output-path DIR]
        writes <output>/prod_env/<suite>/schema.yaml and prints its path
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from helm.benchmark.presentation.schema import get_default_schema_path

from lab_helm import suite_env
from lab_helm.paths import BENCHMARK_OUTPUT
from lab_helm.tasks import TASKS, Task

SPLIT = "${main_split}"
GROUP_FIELDS = ("display_name", "short_display_name", "description", "taxonomy")
GENERAL = ("num_instances", "num_train_instances", "prompt_truncated", "num_prompt_tokens", "num_output_tokens")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # HELM's schemas are large: the C parser if there


def helm_definitions() -> tuple[dict[str, dict], dict[str, dict]]:
    """Run groups and metrics by name, from every schema the installed HELM ships (classic first)."""
    classic = Path(get_default_schema_path())
    groups: dict[str, dict] = {}
    metrics: dict[str, dict] = {}
    for path in [classic, *sorted(p for p in classic.parent.glob("schema_*.yaml") if p != classic)]:
        with open(path, encoding="utf-8") as f:
            schema = yaml.load(f, Loader=LOADER) or {}
        for group in schema.get("run_groups") or []:
            groups.setdefault(group["name"], group)
        for metric in schema.get("metrics") or []:
            metrics.setdefault(metric["name"], metric)
    return groups, metrics


def suite_tasks(suite_dir: Path) -> dict[str, Task]:
    """The HELM run group of each run of the suite, and the task it ran, in folder order."""
    by_entry = {task.run_entry: task for task in TASKS.values()}
    found: dict[str, Task] = {}
    for run in sorted(p for p in suite_dir.iterdir() if (p / "run_spec.json").exists()):
        spec = json.loads((run / "run_spec.json").read_text())
        task = by_entry.get(spec["name"].split(":", 1)[0])
        if task is None:
            raise FileNotFoundError(f"{run / 'run_spec.json'}: a run of no task in lab_helm/tasks.py")
        for group in spec["groups"]:
            found.setdefault(group, task)
    if not found:
        raise FileNotFoundError(f"no run in {suite_dir}")
    return found


def _metric_group(name: str, display_name: str, metrics: tuple[str, ...], description: str = "") -> dict:
    return {"name": name, "display_name": display_name, **({"description": description} if description else {}),
            "metrics": [{"name": m, "split": SPLIT} for m in metrics]}


def build(suite_dir: Path) -> dict:
    known_groups, known_metrics = helm_definitions()
    tasks = suite_tasks(suite_dir)
    run_groups, metric_groups = [], []
    for group, task in tasks.items():
        known = known_groups.get(group, {})
        # The main metric first: the leaderboard sorts by the first column.
        scores = _metric_group(f"{group}_scores", "Scores", (task.main, *(m for m in task.metrics if m != task.main)))
        metric_groups.append(scores)
        run_groups.append({
            "name": group, "display_name": task.name, **{k: known[k] for k in GROUP_FIELDS if k in known},
            "category": "Tasks", "metric_groups": [scores["name"], "efficiency", "general_information"],
            "environment": {"main_name": task.main, "main_split": "test"},
        })
    metric_groups += [
        _metric_group("efficiency", "Efficiency", ("inference_runtime",),
                      "Seconds per request as run_helm.py timed its batches (a batch's time over its size)."),
        _metric_group("general_information", "General information", GENERAL),
    ]
    # A group of groups, after the tasks: without one HELM adds "All scenarios" and opens on it.
    run_groups.append({"name": "h2o_lab_tasks", "display_name": "All tasks", "category": "All tasks",
                       "description": "Every task of this suite.", "subgroups": list(tasks)})
    used = dict.fromkeys(m["name"] for g in metric_groups for m in g["metrics"])
    metrics = [known_metrics.get(m, {"name": m, "display_name": m}) for m in used]
    return {"metrics": metrics, "perturbations": [], "metric_groups": metric_groups, "run_groups": run_groups}


def write(output_path: str | Path, suite: str) -> Path:
    schema = build(Path(output_path) / "runs" / suite)
    path = suite_env.folder(output_path, suite) / "schema.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(schema, sort_keys=False, allow_unicode=True))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", required=True)
    p.add_argument("--output-path", default=str(BENCHMARK_OUTPUT))
    args = p.parse_args(argv)
    try:
        print(write(args.output_path, args.suite))
    except FileNotFoundError as error:
        print(f"our_run.sh: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
