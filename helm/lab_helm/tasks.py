"""The tasks our_run.sh knows: where their examples and requests live, HELM's run entry, the metrics."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lab_helm import needle
from lab_helm.paths import DATA, PROD_ENV

# HELM settings of the XSUM and CNN/DailyMail run entries, shared by the export and the evaluation. `device=cpu`
# turns off BERTScore and SummaC (both download models); `max_train_instances=0` makes the prompts
# zero-shot.
XSUM_ENTRY_ARGS = "temperature=0.3,device=cpu,max_train_instances=0"
MODEL_PREFIX = "h2o-lab"


@dataclass(frozen=True)
class Task:
    name: str
    run_entry: str  # HELM's run-spec function
    entry_args: str  # its arguments, before the model
    scenario_name: str  # HELM scenario `name`: its data lives in <output>/scenarios/<scenario_name>/data
    pickle_name: str  # the file the scenario reads there
    load: Callable[[], list[dict]]  # the examples, each with an "id", in the requests' order
    requests: Path  # the committed export, the input of run_helm.py
    metrics: tuple[str, ...]  # HELM stats every evaluation must have
    scores: tuple[str, ...]  # the ones lab_table.sh and the sweep show, per article too
    main: str  # the score the sweep's report ranks by
    summarization_eval_cache: bool = False  # HELM's SummarizationMetric looks for human ratings
    grid: bool = False  # each example has a (length, depth) cell: the needle's

    def entry(self, model_arch: str) -> str:
        args = [a for a in (self.entry_args, f"model={deployment(model_arch)}") if a]
        return f"{self.run_entry}:{','.join(args)}"


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _xsum() -> list[dict]:
    return _jsonl(DATA / "xsum" / "xsum_test_500.jsonl")


def _cnn_dm() -> list[dict]:
    return _jsonl(DATA / "cnn_dm" / "cnn_dm_test_1000.jsonl")


def _multi_news() -> list[dict]:
    return [{"id": r["_id"], "context": r["context"], "summary": r["answers"][0]}
            for r in _jsonl(DATA / "longbench" / "multi_news.jsonl")]


ROUGE = ("rouge_1", "rouge_2", "rouge_l")
SUMMARY_METRICS = ROUGE + ("summarization_coverage", "summarization_density", "summarization_compression")
TASKS = {
    "xsum": Task(
        name="xsum",
        run_entry="summarization_xsum",
        entry_args=XSUM_ENTRY_ARGS,
        scenario_name="summarization",
        pickle_name="xsum.pk",
        load=_xsum,
        requests=DATA / "xsum.jsonl",
        metrics=SUMMARY_METRICS,
        scores=ROUGE,
        main="rouge_2",
        summarization_eval_cache=True,
    ),
    "cnn_dm": Task(
        name="cnn_dm",
        run_entry="summarization_cnndm",
        entry_args=XSUM_ENTRY_ARGS,
        scenario_name="summarization",
        pickle_name="cnndm.pk",
        load=_cnn_dm,
        requests=DATA / "cnn_dm.jsonl",
        metrics=SUMMARY_METRICS,
        scores=ROUGE,
        main="rouge_2",
        summarization_eval_cache=True,
    ),
    "multi_news": Task(
        name="multi_news",
        run_entry="lab_multi_news",
        entry_args="",
        scenario_name="lab_multi_news",
        pickle_name="multi_news.pk",
        load=_multi_news,
        requests=DATA / "multi_news.jsonl",
        metrics=ROUGE,
        scores=ROUGE,
        main="rouge_l",  # LongBench's score for the task
    ),
    "needle": Task(
        name="needle",
        run_entry="lab_needle",
        entry_args="",
        scenario_name="lab_needle",
        pickle_name="needle.pk",
        load=needle.examples,
        requests=DATA / "needle.jsonl",
        metrics=("ruler_string_match_part",),
        scores=("ruler_string_match_part",),
        main="ruler_string_match_part",
        grid=True,
    ),
    "needle_essay": Task(
        name="needle_essay",
        run_entry="lab_needle_essay",
        entry_args="",
        scenario_name="lab_needle_essay",
        pickle_name="needle_essay.pk",
        load=needle.essay_examples,
        requests=DATA / "needle_essay.jsonl",
        metrics=("ruler_string_match_part",),
        scores=("ruler_string_match_part",),
        main="ruler_string_match_part",
        grid=True,
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
