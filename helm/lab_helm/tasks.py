"""The tasks our_run.sh knows: where their articles and requests live, and HELM's run entry."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lab_helm.paths import DATA, PROD_ENV

# HELM settings shared by the export and the evaluation. `device=cpu` turns off BERTScore and
# SummaC (both download models); `max_train_instances=0` makes the prompts zero-shot.
RUN_ENTRY_ARGS = "temperature=0.3,device=cpu,max_train_instances=0"
MODEL_PREFIX = "h2o-lab"


@dataclass(frozen=True)
class Task:
    name: str
    run_entry: str  # HELM's run-spec function
    scenario_name: str  # HELM scenario `name`: its data lives in <output>/scenarios/<scenario_name>/data
    pickle_name: str  # the file the scenario reads there
    articles: Path  # vendored source: one {"id", "document", "summary"} a line
    requests: Path  # the committed export, the input of run_helm.py

    def entry(self, model_arch: str) -> str:
        return f"{self.run_entry}:{RUN_ENTRY_ARGS},model={deployment(model_arch)}"


TASKS = {
    "xsum": Task(
        name="xsum",
        run_entry="summarization_xsum",
        scenario_name="summarization",
        pickle_name="xsum.pk",
        articles=DATA / "xsum" / "xsum_test_500.jsonl",
        requests=DATA / "xsum.jsonl",
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def deployment(model_arch: str) -> str:
    return f"{MODEL_PREFIX}/{model_arch}"


def model_archs() -> list[str]:
    """The model_arch values prod_env/model_deployments.yaml declares (h2o-lab/<arch>)."""
    import yaml

    with open(PROD_ENV / "model_deployments.yaml", encoding="utf-8") as f:
        names = [d["name"] for d in yaml.safe_load(f)["model_deployments"]]
    return [n.split("/", 1)[1] for n in names if n.startswith(MODEL_PREFIX + "/")]


def read_articles(task: Task) -> list[dict]:
    with open(task.articles, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
