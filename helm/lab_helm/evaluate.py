"""The steps of our_run.sh around helm-run: check and stage before, verify and report after.

    python -m lab_helm.evaluate prepare --jsonl FILE --task xsum --model-arch llama --suite NAME [--n N]
        Checks the results file against the requests HELM will ask for (the first N lines of
        data/<task>.jsonl; N defaults to the number of results), then stages the run: the scenario
        pickle of the first N articles, HELM's eval-cache files, and generation.json (KV cache and
        speed of the generation) in runs/<suite>/. Prints N and the run entry, one a line.
    python -m lab_helm.evaluate check --jsonl FILE --suite NAME
        After helm-run: the requests HELM made are exactly the results file's; prints the metrics.

Errors are one line each, prefixed `our_run.sh: error:`, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import sys
from pathlib import Path

import dacite
from helm.common.request import Request

from lab_helm import helm_cli, results, scenario_data
from lab_helm.paths import BENCHMARK_OUTPUT
from lab_helm.requests import request_dict
from lab_helm.tasks import Task, get_task, model_archs, read_articles

PROG = "our_run.sh"
METRICS = ("rouge_1", "rouge_2", "rouge_l", "summarization_coverage", "summarization_density",
           "summarization_compression")

# HELM's SummarizationMetric looks up human ratings and QAFactEval scores for the outputs of
# HELM's own 2022 models, keyed by their deployment names, and downloads the files that hold
# them into runs/<suite>/eval_cache/ when absent. No h2o-lab/* output can be in them, so empty
# files of the same shape give the same metrics, with no download.
HUMAN_EVAL_COLUMNS = (
    ["HITId", "Input.model_name", "Input.id", "Input.output_text", "Answer.consistency.consistent"]
    + [f"Answer.coherence.cohere_{i}" for i in range(1, 6)]
    + [f"Answer.relevance.rel_{i}" for i in range(1, 6)]
)


class UsageError(Exception):
    pass


def write_eval_cache(suite_dir: Path, task: Task) -> None:
    cache = suite_dir / "eval_cache"
    cache.mkdir(parents=True, exist_ok=True)
    for shots in (0, 5):
        (cache / f"{task.name}_{shots}shots.csv").write_text(",".join(HUMAN_EVAL_COLUMNS) + "\n")
    with open(cache / "qafacteval.pk", "wb") as f:
        pickle.dump({task.run_entry: {}}, f)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def generation_summary(records: list[results.Record], path: Path) -> dict:
    """KV cache and speed of the generation, from run_helm.py's result fields."""
    kv = [r.result.get("kv_cache") or {} for r in records]
    tokens, seconds = 0, 0.0
    counted = True
    for r in records:
        choices = r.result["choices"]
        logprobs = [c.get("logprobs") for c in choices]
        if any(lp is None for lp in logprobs):
            counted = False
        else:
            tokens += sum(len(lp["tokens"]) for lp in logprobs)
        t, b = r.result.get("request_time"), r.result.get("batch_size") or 1
        if isinstance(t, (int, float)):
            seconds += t / b  # every request of a batch carries the batch's time
    first = kv[0]

    def mean_of(key: str) -> float | None:
        return _mean([k[key] for k in kv if isinstance(k.get(key), (int, float))])

    return {
        "results_file": str(path.resolve()),
        "requests": len(records),
        "generated_tokens": tokens if counted else None,
        "generation_seconds": seconds or None,
        "tokens_per_second": tokens / seconds if counted and seconds else None,
        "kv_cache": {
            "policy": first.get("policy"),
            "mode": first.get("mode"),
            "heavy_ratio": first.get("heavy_ratio"),
            "recent_ratio": first.get("recent_ratio"),
            "mean_heavy_budget": mean_of("heavy_budget"),
            "mean_recent_budget": mean_of("recent_budget"),
            "mean_prompt_tokens": mean_of("prompt_tokens"),
            "mean_kv_bytes_peak": mean_of("kv_bytes_peak"),
            "mean_kv_bytes_full": mean_of("kv_bytes_full"),
        },
        "chat_template": sorted({str(r.result.get("chat_template")) for r in records}),
    }


def prepare(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    archs = model_archs()
    if args.model_arch not in archs:
        raise UsageError(f"unknown model_arch {args.model_arch!r}; prod_env/model_deployments.yaml has: {', '.join(archs)}")
    if not args.suite or "/" in args.suite or args.suite.startswith("."):
        raise UsageError(f"output_name {args.suite!r} must be a plain folder name")
    jsonl = Path(args.jsonl)
    records = results.load(jsonl)
    requests = results.read_requests(task.requests)
    n = args.n if args.n is not None else min(len(records), len(requests))
    if not 1 <= n <= len(requests):
        raise UsageError(f"max_eval_instances must be between 1 and {len(requests)}, got {n}")
    names = [a["id"] for a in read_articles(task)[:n]]
    asked = f"{task.run_entry}, the first {n} requests of data/{task.requests.name}"
    ordered = results.match(requests[:n], records, jsonl, asked, names)

    output = Path(args.output_path)
    suite_dir = output / "runs" / args.suite
    if suite_dir.exists():
        shutil.rmtree(suite_dir)  # a suite holds one evaluation: never mix runs of two files
    scenario_data.write(task, output, n)
    write_eval_cache(suite_dir, task)
    summary = generation_summary(ordered, jsonl)
    summary.update(task=task.name, model_arch=args.model_arch, suite=args.suite)
    (suite_dir / "generation.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(n)
    print(task.entry(args.model_arch))


def stat_means(stats_path: Path) -> dict[str, float]:
    """Means of the test-split stats (no perturbation) in a HELM stats.json."""
    out = {}
    for stat in json.loads(stats_path.read_text()):
        name = stat["name"]
        if name.get("split") == "test" and "perturbation" not in name and "sub_split" not in name:
            if "mean" in stat:
                out[name["name"]] = stat["mean"]
    return out


def check(args: argparse.Namespace) -> None:
    jsonl = Path(args.jsonl)
    run = helm_cli.run_dir(args.output_path, args.suite)
    state = json.loads((run / "scenario_state.json").read_text())
    asked = [request_dict(dacite.from_dict(Request, rs["request"])) for rs in state["request_states"]]
    results.match(asked, results.load(jsonl), jsonl, f"{run.name}, {len(asked)} requests")
    means = stat_means(run / "stats.json")
    missing = [m for m in METRICS if m not in means]
    if missing:
        raise UsageError(f"{run / 'stats.json'} lacks {', '.join(missing)}")
    print(f"{len(asked)} requests evaluated: " + ", ".join(f"{m}={means[m]:.4f}" for m in METRICS))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("prepare", "check"):
        s = sub.add_parser(name)
        s.add_argument("--jsonl", required=True)
        s.add_argument("--suite", required=True)
        s.add_argument("--output-path", default=str(BENCHMARK_OUTPUT))
        if name == "prepare":
            s.add_argument("--task", default="xsum")
            s.add_argument("--model-arch", default="llama")
            s.add_argument("--n", type=int, default=None)
    args = p.parse_args(argv)
    try:
        prepare(args) if args.step == "prepare" else check(args)
    except (results.ResultsError, UsageError, KeyError, FileNotFoundError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        for line in str(message).splitlines():
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
