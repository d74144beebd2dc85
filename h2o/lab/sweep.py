"""The lab's experiment: every policy at every KV budget, evaluated by HELM and against the full cache.

    python -m h2o.lab.sweep [--task xsum] [--model smollm2] [--arch llama] [--n 200] [--stage all] ...

Each point (policy, budget) is generated with run_helm.py, compared with the full cache by
teacher-forced KL and greedy agreement on the first `--fidelity_n` articles, and scored with HELM
(helm/our_run.sh). Two stages, which may run on two machines: `generate` does all that needs the
model (results, KV bytes, fidelity, and with `--analysis_n` the analysis) and writes
`generated/<name>.json`; it needs no HELM. `score` scores those results with HELM and writes the
finished point, `points/<name>.json`. `all` does both, point by point. Nothing finished is
recomputed; an interrupted point resumes where its results file stops. The report (`h2o.lab.report`)
is rewritten after every scored point.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.serve import helm_io
from h2o import jsonl, models, policies
from h2o.lab import report
from h2o.lab.fidelity import against_full, full_reference
from h2o.engine.reference.generation import Eviction, Sampling, generate, kv_bytes_per_token
from h2o.policies import make_policy
from h2o.serve.results import write_whole
from h2o.serve.cli import encode
from h2o.serve.cli import main as run_helm
from lab_helm.helm_cli import run_dir  # lab_helm: where HELM's output lives and how to read it;
from lab_helm.paths import BENCHMARK_OUTPUT  # these three modules need no HELM installed
from lab_helm.tasks import TASKS, Task, get_task

ROOT = Path(__file__).resolve().parents[2]

BUDGETS = (0.04, 0.10, 0.20, 0.40)
POLICIES = ("h2o", "local", "sink", "tova", "h2o-avg", "h2o-sink", "knorm", "snapkv", "pyramidkv", "adakv",
            "h2o-shrink")


@dataclass(frozen=True)
class Point:
    policy: str  # a registered policy, or "local" (h2o with no heavy hitters), or "full"
    budget: float  # share of the prompt kept; 1.0 for the full cache
    knob: float | None = None  # the policy's `knob` option; None: the policy's default

    @property
    def label(self) -> str:
        """The policy as the report names it: `h2o-shrink:0.5` for a knob's value."""
        return self.policy if self.knob is None else f"{self.policy}:{self.knob:g}"

    @property
    def name(self) -> str:
        return "full" if self.policy == "full" else f"{self.label.replace(':', '_')}-{round(self.budget * 100):02d}"

    def options(self) -> dict:
        return {} if self.knob is None else {policies.POLICIES[self.policy].knob: self.knob}

    def ratios(self) -> tuple[float, float]:
        """(heavy, recent): a policy on the paper's heavy + recent budget (H2O and its variants)
        splits it half and half, as the paper; local is all recent; a policy with a budget of its
        own (sink, tova) reads only the total."""
        if self.policy in policies.POLICIES and policies.POLICIES[self.policy].budget is policies.Policy.budget:
            return self.budget / 2, self.budget / 2
        return 0.0, self.budget

    def run_flags(self) -> list[str]:
        if self.policy == "full":
            return []
        heavy, recent = self.ratios()
        policy = "h2o" if self.policy == "local" else self.policy
        knob = [item for key, value in self.options().items() for item in (f"--{key}", repr(value))]
        return ["--enable_small_cache", "--policy", policy,
                "--heavy_ratio", repr(heavy), "--recent_ratio", repr(recent), *knob]

    def eviction(self) -> Eviction:
        heavy, recent = self.ratios()
        policy = make_policy("h2o" if self.policy == "local" else self.policy, heavy, recent, **self.options())
        return Eviction(policy, "drop")


def policy_spec(spec: str) -> tuple[str, float | None]:
    """`NAME` or `NAME:VALUE` (VALUE for the policy's knob) from --policies."""
    name, _, value = spec.partition(":")
    known = name == "local" or name in policies.POLICIES
    if not known or (value and not policies.POLICIES[name].knob):
        why = "unknown policy" if not known else f"{name} has no knob to set"
        raise ValueError(f"--policies {spec}: {why}")
    try:
        return name, float(value) if value else None
    except ValueError:
        raise ValueError(f"--policies {spec}: {value!r} is not a number") from None


def points(specs: list[str], budgets: list[float]) -> list[Point]:
    return [Point("full", 1.0)] + [Point(s.partition(":")[0], b, policy_spec(s)[1]) for b in budgets for s in specs]


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).stem if model.endswith(".gguf") else model).strip("_")


def _write_json(path: Path, data: object) -> None:
    write_whole(path, json.dumps(data, indent=1))  # a point file is whole or absent


def _helm(results: Path, task: str, arch: str, suite: str, point: str, n: int) -> dict:
    """Score a point's results file with our_run.sh, as the model of that point in the report's one
    suite (helm-server compares them); HELM's means and per-article scores."""
    from lab_helm.suite_env import Point as SuitePoint  # the task registry behind it: only the score stage needs it

    results = results.resolve()  # our_run.sh runs in helm/: a path relative to here would miss
    subprocess.run(["bash", str(ROOT / "helm" / "our_run.sh"), f"{point}={results}", task, arch, suite, str(n)],
                   check=True, cwd=ROOT / "helm", stdout=subprocess.DEVNULL)
    return _scores(run_dir(BENCHMARK_OUTPUT, suite, SuitePoint(point, results).model(arch)), get_task(task))


def _scores(run: Path, task: Task) -> dict:
    """The task's scores (names, means, per article in the requests' order) and the one the report
    ranks by; for the needle, each article's (length, depth) cell too."""
    from lab_helm.evaluate import stat_means  # imports HELM: only the score stage needs it

    means = stat_means(run / "stats.json")
    per_article = {}
    for instance in json.loads((run / "per_instance_stats.json").read_text()):
        for stat in instance["stats"]:
            if stat["name"]["name"] in task.scores:
                per_article.setdefault(stat["name"]["name"], {})[instance["instance_id"]] = stat["mean"]
    order = sorted(per_article[task.main], key=lambda i: int(re.sub(r"\D", "", i) or 0))  # HELM's id0, id1, ...
    record = {
        "scores": list(task.scores), "main": task.main, **{k: means[k] for k in task.scores if k in means},
        "per_article": {k: [v[i] for i in order] for k, v in per_article.items()},
    }
    if task.name == "needle":
        record["cells"] = [[e["length"], e["depth"]] for e in task.load()[: len(order)]]
    return record


def _kv(results: Path, point: Point, model) -> dict:
    """Mean KV bytes per sequence: the peak the run measured, the full cache's, and the budget's
    (`Policy.held`: what the cache holds once over budget, equal for policies that spend the
    same memory, whichever engine measured their peak)."""
    lines = [line.record["result"]["kv_cache"] for line in jsonl.objects(results)]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    layers = model.config.num_hidden_layers
    per_slot = kv_bytes_per_token(model) // layers  # one token of one layer, every KV head
    if point.policy == "full":
        budget = [kv["kv_bytes_full"] for kv in lines]
    else:
        policy = point.eviction().policy
        budget = [policy.held(kv["prompt_tokens"], layers) * per_slot for kv in lines]
    return {"kv_bytes_peak": mean([kv["kv_bytes_peak"] for kv in lines]),
            "kv_bytes_full": mean([kv["kv_bytes_full"] for kv in lines]), "kv_bytes_budget": mean(budget)}


def report_folder(args: argparse.Namespace) -> Path:
    return Path(args.reports) / f"{args.task}-{_slug(args.model)}"


def task_prompts(args: argparse.Namespace, tokenizer, n: int) -> tuple[list[helm_io.Request], list[list[int]]]:
    """The task's first `n` requests and their prompts' token ids, formatted as the runs format them."""
    requests = helm_io.read_requests(ROOT / "data" / f"{args.task}.jsonl")[:n]
    return requests, [encode(tokenizer, r.prompt, args.chat_template)[0] for r in requests]


def by_length(prompts: list[list[int]], size: int) -> list[list[int]]:
    """The prompts' indices in batches of `size`, shortest first: batches of similar lengths waste
    little on padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def in_batches(batches: list[list[int]], compute) -> list:
    """`compute(rows)` for each batch of article indices; the results back in article order."""
    results = [None] * sum(len(rows) for rows in batches)
    for rows in batches:
        for i, value in zip(rows, compute(rows)):
            results[i] = value
    return results


def greedy_continuations(model, tokenizer, requests: list[helm_io.Request], prompts: list[list[int]],
                         batches: list[list[int]]) -> list[list[int]]:
    """The full cache's greedy token ids for each prompt, up to the request's length and stops."""
    return in_batches(batches, lambda rows: [c.token_ids for c in generate(
        model, tokenizer, [prompts[i] for i in rows],
        [Sampling(max_new_tokens=requests[i].max_tokens, stop=requests[i].stop) for i in rows])])


class Loaded:
    """The sweep's tokenizer and weights, loaded on first use and shared by every point."""

    def __init__(self, args: argparse.Namespace, device: str) -> None:
        self.args, self.device = args, device

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return models.load_tokenizer(self.args.model, self.args.arch)[0]

    @cached_property
    def model(self) -> PreTrainedModel:
        return models.load_model(self.args.model, self.device, self.args.dtype)


class Fidelities:
    """Teacher-forced comparison with the full cache's greedy continuations and log-probabilities
    (both computed once, the continuations kept on disk)."""

    def __init__(self, folder: Path, args: argparse.Namespace, loaded: Loaded) -> None:
        tokenizer, self.model = loaded.tokenizer, loaded.model
        requests, self.prompts = task_prompts(args, tokenizer, args.fidelity_n)
        self.batches = by_length(self.prompts, args.fidelity_batch or args.batch_size)
        cached = folder / "fidelity_reference.json"
        continuations = json.loads(cached.read_text()) if cached.exists() else []
        if len(continuations) != len(self.prompts):
            continuations = greedy_continuations(self.model, tokenizer, requests, self.prompts, self.batches)
            _write_json(cached, continuations)
        self.continuations = continuations
        self.reference = in_batches(self.batches, lambda rows: full_reference(self.model, *self._pick(rows)))

    def _pick(self, rows: list[int]) -> tuple[list[list[int]], list[list[int]]]:
        return [self.prompts[i] for i in rows], [self.continuations[i] for i in rows]

    def measure(self, point: Point) -> dict:
        runs = in_batches(self.batches, lambda rows: against_full(
            self.model, *self._pick(rows), point.eviction(), [self.reference[i] for i in rows]))
        # Where along the summary the caches part: mean KL at each generated token's index.
        by_step = [[r.kl[t] for r in runs if t < len(r.kl)] for t in range(max(len(r.kl) for r in runs))]
        return {"kl_per_article": [r.mean_kl for r in runs], "agreement_per_article": [r.agreement for r in runs],
                "kl_by_step": [sum(kl) / len(kl) for kl in by_step]}


def device_of(args: argparse.Namespace) -> str:
    """--device, or the GPU where there is one."""
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sweep: error: --device {args.device}: no CUDA device available")
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _made_with(device: str) -> dict:
    """What generated the report, for its reader (not checked: the score stage runs elsewhere)."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gpu": gpu}


def _check_settings(folder: Path, args: argparse.Namespace, device: str | None) -> None:
    """A report holds one model, task and precision, generated on one kind of device: refuse to
    resume one made otherwise. `device` is None in the score stage, which computes nothing on it
    (and never creates the settings: a report starts where it is generated)."""
    settings = {"task": args.task, "model": args.model, "arch": args.arch, "dtype": args.dtype,
                "chat_template": args.chat_template}
    if device is not None:
        settings["device"] = torch.device(device).type
    path = folder / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"--{k} {before.get(k, 'unrecorded')} (now {v})" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise SystemExit(f"sweep: error: {folder} was made with {', '.join(changed)}; "
                             "pass those flags or another --reports folder")
    elif device is not None:
        _write_json(path, {**settings, "made_with": _made_with(device)})


def _holds(path: Path, n: int) -> bool:
    """Whether a point's record (generated or finished) exists for these `n` articles."""
    return path.exists() and json.loads(path.read_text()).get("n") == n


class Sweep:
    """One report folder's points: generated (what needs the model) and scored (HELM)."""

    def __init__(self, folder: Path, args: argparse.Namespace, device: str | None) -> None:
        self.folder, self.args = folder, args
        self.loaded = Loaded(args, device) if device is not None else None
        self.fidelities: Fidelities | None = None

    def finished(self, point: Point) -> Path:
        return self.folder / "points" / f"{point.name}.json"

    def generated(self, point: Point) -> Path:
        return self.folder / "generated" / f"{point.name}.json"

    def results(self, point: Point) -> Path:
        return self.folder / "results" / f"{point.name}.jsonl"

    def generate(self, point: Point, tag: str) -> None:
        """The point's results, KV bytes and fidelity, into generated/<name>.json."""
        args = self.args
        if _holds(self.generated(point), args.n):
            print(f"{tag}: generated", flush=True)
            return
        print(f"{tag}: generating {args.n} summaries", flush=True)
        results = self.results(point)
        status = run_helm(["--input_path", str(ROOT / "data" / f"{args.task}.jsonl"), "--output_path", str(results),
                           "--model_name", args.model, "--model_arch", args.arch, "--sample_num", str(args.n),
                           "--batch_size", str(args.batch_size), "--chat_template", args.chat_template,
                           "--dtype", args.dtype, "--device", self.loaded.device, *point.run_flags()],
                          model=self.loaded.model)
        if status != 0:
            raise SystemExit(status)
        record = {"policy": point.label, "budget": point.budget, "n": args.n, "knob": point.knob,
                  **_kv(results, point, self.loaded.model)}
        if point.policy != "full" and args.fidelity_n > 0:
            print(f"{tag}: fidelity on {args.fidelity_n} articles", flush=True)
            self.fidelities = self.fidelities or Fidelities(self.folder, args, self.loaded)
            record.update(self.fidelities.measure(point))
        _write_json(self.generated(point), record)

    def unscorable(self, point: Point, requests: list[helm_io.Request]) -> str | None:
        """Why the score stage cannot score this point, or None."""
        if not _holds(self.generated(point), self.args.n):
            return f"{self.generated(point)}: no record of {self.args.n} generated articles; run --stage generate first"
        done = helm_io.completed_count(self.results(point), requests)
        if done != len(requests):
            return f"{self.results(point)}: {done} of {len(requests)} results; run --stage generate to finish it"
        return None

    def score(self, point: Point, tag: str) -> None:
        """HELM's scores of the generated point, into points/<name>.json, and the report."""
        print(f"{tag}: HELM evaluation", flush=True)
        args = self.args
        generated = json.loads(self.generated(point).read_text())
        scores = _helm(self.results(point), args.task, args.arch, f"sweep-{self.folder.name}", point.name, args.n)
        _write_json(self.finished(point), {**{k: generated.pop(k) for k in ("policy", "budget", "n")},
                                           **scores, **generated})
        report.write(self.folder)


def analyse(folder: Path, args: argparse.Namespace, loaded: Loaded, todo: list[Point]) -> None:
    """h2o.lab.analysis on the sweep's points and first --analysis_n articles, unless done."""
    from h2o.lab import analysis  # it imports this module

    wanted = [p for p in todo if p.policy != "full"]
    path = folder / "analysis.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before.get("n") == args.analysis_n and before.get("names") == [p.name for p in wanted]:
            print("analysis: done", flush=True)
            return
    print(f"analysis on {args.analysis_n} articles", flush=True)
    analysis.write(folder, loaded.model, loaded.tokenizer, args, wanted, args.analysis_n)


def sweep(args: argparse.Namespace) -> Path:
    available = len(helm_io.read_requests(get_task(args.task).requests))
    if args.n > available:
        print(f"--n {args.n}: data/{args.task}.jsonl has {available} requests; a point is all of them", flush=True)
        args.n = available
    folder = report_folder(args)
    for sub in ("points", "results", "generated"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    generating, scoring = args.stage in ("generate", "all"), args.stage in ("score", "all")
    device = device_of(args) if generating else None
    _check_settings(folder, args, device)
    run = Sweep(folder, args, device)
    todo = points(args.policies, args.budgets)
    left = [p for p in todo if not _holds(run.finished(p), args.n)]
    if not generating:
        # Every point checked before any is scored: a bad one stops the stage with nothing half done.
        requests = helm_io.read_requests(ROOT / "data" / f"{args.task}.jsonl")[: args.n]
        for point in left:
            why = run.unscorable(point, requests)
            if why:
                raise ValueError(why)
    for index, point in enumerate(todo, start=1):
        tag = f"[{index}/{len(todo)}] {point.name}"
        if point not in left:
            print(f"{tag}: done", flush=True)
            continue
        if generating:
            run.generate(point, tag)
        if scoring:
            run.score(point, tag)
    if generating and args.analysis_n > 0:
        analyse(folder, args, run.loaded, todo)
    if scoring:
        report.write(folder)
    return folder


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """What a report is of: task, model, precision, prompt format, and where reports live."""
    p.add_argument("--task", default="xsum", choices=sorted(TASKS))
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--arch", default="llama")
    p.add_argument("--chat_template", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES),
                   help="bfloat16: about twice as fast as float32 on CPUs with AVX512-BF16")
    p.add_argument("--reports", default=str(ROOT / "reports"), help="folder of the reports")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--n", type=int, default=200, help="articles per point")
    p.add_argument("--fidelity_n", type=int, default=50, help="articles for KL / agreement (0: skip)")
    p.add_argument("--analysis_n", type=int, default=0,
                   help="articles for h2o.lab.analysis on the sweep's points, in the generate stage (0: skip)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--fidelity_batch", type=int, default=0,
                   help="articles a batch for KL / agreement (default: --batch_size); a batch steps the reference "
                        "engine once per continuation token and holds batch x tokens x vocabulary log-probabilities")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=list(BUDGETS))
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES),
                   help="NAME or NAME:VALUE, VALUE for the policy's knob (h2o-shrink:0.5), comma-separated")
    p.add_argument("--device", default=None, help="where the generate stage runs (default: cuda if present)")
    p.add_argument("--stage", default="all", choices=("generate", "score", "all"),
                   help="generate: what needs the model, no HELM; score: HELM on generated points; all: both")
    args = p.parse_args(argv)
    unknown = [x for x in args.policies if x.partition(":")[0] not in ("local", *report.KNOWN_POLICIES)]
    if unknown or any(not 0 < b <= 1 for b in args.budgets):
        print(f"sweep: error: unknown --policies {unknown}" if unknown else
              "sweep: error: --budgets must lie in (0, 1]", file=sys.stderr)
        return 2
    if args.fidelity_batch < 0:
        print("sweep: error: --fidelity_batch must be 0 (--batch_size's) or more", file=sys.stderr)
        return 2
    try:
        for point in points(args.policies, args.budgets)[1:]:
            point.eviction()  # a knob's value out of range fails here, before anything runs
        folder = sweep(args)
    except (ValueError, FileNotFoundError) as error:  # a bad requests or results file, named with its line
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"{'generated' if args.stage == 'generate' else 'report'}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
