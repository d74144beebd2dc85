"""The steps of our_run.sh around helm-run: check and stage before, verify and report after.

    python -m lab_helm.evaluate prepare (--jsonl FILE | --point NAME=FILE ...) --suite NAME
            [--task xsum] [--model-arch llama] [--n N]
        Checks each results file against the requests HELM will ask for (the first N lines of
        data/<task>.jsonl; N defaults to the fewest results of the files), then stages the run:
        the scenario pickle of the first N examples, HELM's eval-cache files (XSUM), the suite's prod_env
        (lab_helm.suite_env: a model per file) and generation-<model>.json (KV cache and speed of
        the generation) in runs/<suite>/. A --jsonl suite holds that one file, so it is emptied
        first; --point adds to the suite, replacing only the points named. Prints N, the prod_env
        folder and the run entries, one a line.
    python -m lab_helm.evaluate check (--jsonl FILE | --point NAME=FILE ...) --suite NAME [--task xsum]
            [--model-arch llama]
        After helm-run: the requests HELM made are exactly the results file's; prints the task's
        metrics.

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

from lab_helm import helm_cli, results, scenario_data, suite_env
from lab_helm.paths import BENCHMARK_OUTPUT
from lab_helm.requests import request_dict
from lab_helm.tasks import Task, get_task, model_archs

PROG = "our_run.sh"

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
    # HELM's own rule for the ratings' file: cnndm_<k>shots.csv for a CNN/DailyMail run, else xsum's.
    dataset = "cnndm" if "cnndm" in task.run_entry else "xsum"
    for shots in (0, 5):
        (cache / f"{dataset}_{shots}shots.csv").write_text(",".join(HUMAN_EVAL_COLUMNS) + "\n")
    # One suite may hold XSUM and CNN/DailyMail runs: each task keeps its key.
    scores_path = cache / "qafacteval.pk"
    scores = pickle.loads(scores_path.read_bytes()) if scores_path.is_file() else {}
    with open(scores_path, "wb") as f:
        pickle.dump({**scores, task.run_entry: {}}, f)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) spans: the time during which one at least was open."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def generation_summary(records: list[results.Record], path: Path) -> dict:
    """KV cache and speed of the generation, from run_helm.py's result fields."""
    kv = [r.result.get("kv_cache") or {} for r in records]
    tokens = 0
    counted = True
    for r in records:
        choices = r.result["choices"]
        logprobs = [c.get("logprobs") for c in choices]
        if any(lp is None for lp in logprobs):
            counted = False
        else:
            tokens += sum(len(lp["tokens"]) for lp in logprobs)
    # Generation seconds: the wall time during which at least one request was being generated, i.e. the
    # union of the requests' spans [finished_at - request_time, finished_at] (request_time: the request's
    # latency). This is right for lock-step batches (one after another) and for continuous batching (rows
    # admitted and ended apart, where latencies over the batch size miscount) alike, and counts neither the
    # pause of a resumed run nor twice the time of ranks working at once. None unless every result has both
    # times. tok/s: generated tokens over these seconds.
    spans = [(r.result["finished_at"] - r.result["request_time"], r.result["finished_at"]) for r in records
             if _number(r.result.get("request_time")) and _number(r.result.get("finished_at"))]
    seconds = busy_seconds(spans) if len(spans) == len(records) else None
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


def points(args: argparse.Namespace) -> list[suite_env.Point]:
    if args.jsonl is not None:
        return [suite_env.Point(None, Path(args.jsonl))]
    try:
        found = [suite_env.parse_point(spec) for spec in args.point]
    except ValueError as error:
        raise UsageError(str(error)) from None
    names = [p.name for p in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"point {twice[0]!r} is given twice")
    return found


def _clear(output: Path, suite: str, models: list[str] | None) -> None:
    """Remove what a previous evaluation left of these models (of every model when None)."""
    suite_dir = output / "runs" / suite
    if models is None:
        for folder in (suite_dir, suite_env.folder(output, suite)):
            if folder.exists():
                shutil.rmtree(folder)
        return
    for model in models:
        for run in helm_cli.runs(output, suite, model):
            shutil.rmtree(run)


def prepare(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    archs = model_archs()
    if args.model_arch not in archs:
        raise UsageError(f"unknown model_arch {args.model_arch!r}; prod_env/model_deployments.yaml has: {', '.join(archs)}")
    if not args.suite or "/" in args.suite or args.suite.startswith("."):
        raise UsageError(f"output_name {args.suite!r} must be a plain folder name")
    todo = points(args)
    loaded = [results.load(p.results) for p in todo]
    requests = results.read_requests(task.requests)
    n = args.n if args.n is not None else min(len(requests), *(len(r) for r in loaded))
    if not 1 <= n <= len(requests):
        raise UsageError(f"max_eval_instances must be between 1 and {len(requests)}, got {n}")
    names = [a["id"] for a in task.load()[:n]]
    asked = f"{task.run_entry}, the first {n} requests of data/{task.requests.name}"
    ordered = [results.match(requests[:n], records, p.results, asked, names) for p, records in zip(todo, loaded)]

    output = Path(args.output_path)
    models = [p.model(args.model_arch) for p in todo]
    _clear(output, args.suite, None if args.jsonl is not None else models)
    suite_dir = output / "runs" / args.suite
    suite_dir.mkdir(parents=True, exist_ok=True)
    scenario_data.write(task, output, n)
    if task.summarization_eval_cache:
        write_eval_cache(suite_dir, task)
    env = suite_env.folder(output, args.suite)
    for point, records, model in zip(todo, ordered, models):
        summary = generation_summary(records, point.results)
        summary.update(task=task.name, model_arch=args.model_arch, suite=args.suite, point=point.name, model=model)
        suite_env.add(env, point, args.model_arch, summary["kv_cache"])
        suite_env.summary_path(output, args.suite, model).write_text(json.dumps(summary, indent=2) + "\n")
    print(n)
    print(env)
    for point in todo:
        print(task.entry(point.arch_slot(args.model_arch)))


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
    task = get_task(args.task)
    for point in points(args):
        run = helm_cli.run_dir(args.output_path, args.suite, point.model(args.model_arch))
        state = json.loads((run / "scenario_state.json").read_text())
        asked = [request_dict(dacite.from_dict(Request, rs["request"])) for rs in state["request_states"]]
        results.match(asked, results.load(point.results), point.results, f"{run.name}, {len(asked)} requests")
        means = stat_means(run / "stats.json")
        missing = [m for m in task.metrics if m not in means]
        if missing:
            raise UsageError(f"{run / 'stats.json'} lacks {', '.join(missing)}")
        print(f"{point.name + ': ' if point.name else ''}{len(asked)} requests evaluated: "
              + ", ".join(f"{m}={means[m]:.4f}" for m in task.metrics))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    for name in ("prepare", "check"):
        s = sub.add_parser(name)
        files = s.add_mutually_exclusive_group(required=True)
        files.add_argument("--jsonl", help="one results file: the suite holds it alone")
        files.add_argument("--point", action="append", metavar="NAME=FILE", help="a point added to the suite")
        s.add_argument("--suite", required=True)
        s.add_argument("--output-path", default=str(BENCHMARK_OUTPUT))
        s.add_argument("--model-arch", default="llama")
        s.add_argument("--task", default="xsum")
        if name == "prepare":
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
