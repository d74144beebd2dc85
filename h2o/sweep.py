"""The lab's experiment: every policy at every KV budget, evaluated by HELM and against the full cache.

    python -m h2o.sweep [--task xsum] [--model smollm2] [--arch llama] [--n 200] ...

Each point (policy, budget) is generated with run_helm.py, scored with HELM (helm/our_run.sh),
and compared with the full cache by teacher-forced KL and greedy agreement on the first
`--fidelity_n` articles. A finished point is written to `points/<name>.json` and never
recomputed; an interrupted one resumes where its results file stops. The report
(`h2o.report`) is rewritten after every point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from h2o import helm_io, jsonl, models, policies, report
from h2o.fidelity import against_full, full_reference
from h2o.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o.run import encode
from h2o.run import main as run_helm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "helm"))  # lab_helm: where HELM's output lives and how to read it

from lab_helm.evaluate import stat_means  # noqa: E402
from lab_helm.helm_cli import run_dir  # noqa: E402
from lab_helm.paths import BENCHMARK_OUTPUT  # noqa: E402

BUDGETS = (0.04, 0.10, 0.20, 0.40, 0.60)
POLICIES = ("h2o", "local", "sink", "tova", "h2o-avg", "h2o-sink")


@dataclass(frozen=True)
class Point:
    policy: str  # a registered policy, or "local" (h2o with no heavy hitters), or "full"
    budget: float  # share of the prompt kept; 1.0 for the full cache

    @property
    def name(self) -> str:
        return "full" if self.policy == "full" else f"{self.policy}-{round(self.budget * 100):02d}"

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
        return ["--enable_small_cache", "--policy", policy,
                "--heavy_ratio", repr(heavy), "--recent_ratio", repr(recent)]

    def eviction(self) -> Eviction:
        heavy, recent = self.ratios()
        return Eviction(make_policy("h2o" if self.policy == "local" else self.policy, heavy, recent), "drop")


def points(names: list[str], budgets: list[float]) -> list[Point]:
    return [Point("full", 1.0)] + [Point(p, b) for b in budgets for p in names]


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).stem if model.endswith(".gguf") else model).strip("_")


def _write_json(path: Path, data: object) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)  # a point file is whole or absent


def _helm(results: Path, task: str, arch: str, suite: str, n: int) -> dict:
    """Score a results file with our_run.sh; HELM's means and per-article ROUGE."""
    subprocess.run(["bash", str(ROOT / "helm" / "our_run.sh"), str(results), task, arch, suite, str(n)],
                   check=True, cwd=ROOT / "helm", stdout=subprocess.DEVNULL)
    return _scores(run_dir(BENCHMARK_OUTPUT, suite))


def _scores(run: Path) -> dict:
    means = stat_means(run / "stats.json")
    per_article = {}
    for instance in json.loads((run / "per_instance_stats.json").read_text()):
        for stat in instance["stats"]:
            if stat["name"]["name"] in ("rouge_1", "rouge_2", "rouge_l"):
                per_article.setdefault(stat["name"]["name"], {})[instance["instance_id"]] = stat["mean"]
    order = sorted(per_article["rouge_2"], key=lambda i: int(re.sub(r"\D", "", i) or 0))
    return {
        **{k: means[k] for k in ("rouge_1", "rouge_2", "rouge_l") if k in means},
        "per_article": {k: [v[i] for i in order] for k, v in per_article.items()},
    }


def _kv(results: Path) -> dict:
    lines = [line.record["result"]["kv_cache"] for line in jsonl.objects(results)]
    mean = lambda key: sum(kv[key] for kv in lines) / len(lines)  # noqa: E731
    return {"kv_bytes_peak": mean("kv_bytes_peak"), "kv_bytes_full": mean("kv_bytes_full")}


def report_folder(args: argparse.Namespace) -> Path:
    return Path(args.reports) / f"{args.task}-{_slug(args.model)}"


def task_prompts(args: argparse.Namespace, tokenizer, n: int) -> tuple[list[helm_io.Request], list[list[int]]]:
    """The task's first `n` requests and their prompts' token ids, formatted as the runs format them."""
    requests = helm_io.read_requests(ROOT / "data" / f"{args.task}.jsonl")[:n]
    return requests, [encode(tokenizer, r.prompt, args.chat_template)[0] for r in requests]


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


class Fidelities:
    """Teacher-forced comparison with the full cache's greedy continuations and log-probabilities
    (both computed once, the continuations kept on disk)."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        tokenizer, _ = models.load_tokenizer(args.model, args.arch)
        self.model = models.load_model(args.model, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.dtype)
        requests, self.prompts = task_prompts(args, tokenizer, args.fidelity_n)
        # Batches of similar lengths waste little on padding.
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        self.batches = [order[i : i + args.batch_size] for i in range(0, len(order), args.batch_size)]
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


def _check_settings(folder: Path, args: argparse.Namespace) -> None:
    """A report holds one model, task and precision: refuse to resume one made otherwise."""
    settings = {"task": args.task, "model": args.model, "arch": args.arch, "dtype": args.dtype,
                "chat_template": args.chat_template}
    path = folder / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"--{k} {before.get(k)} (now {v})" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise SystemExit(f"sweep: error: {folder} was made with {', '.join(changed)}; "
                             "pass those flags or another --reports folder")
    else:
        _write_json(path, settings)


def sweep(args: argparse.Namespace) -> Path:
    folder = report_folder(args)
    (folder / "points").mkdir(parents=True, exist_ok=True)
    (folder / "results").mkdir(exist_ok=True)
    _check_settings(folder, args)
    todo = points(args.policies, args.budgets)
    fidelities = None
    for index, point in enumerate(todo, start=1):
        done = folder / "points" / f"{point.name}.json"
        if done.exists() and json.loads(done.read_text()).get("n") == args.n:
            print(f"[{index}/{len(todo)}] {point.name}: done", flush=True)
            continue
        print(f"[{index}/{len(todo)}] {point.name}: generating {args.n} summaries", flush=True)
        results = folder / "results" / f"{point.name}.jsonl"
        status = run_helm(["--input_path", str(ROOT / "data" / f"{args.task}.jsonl"), "--output_path", str(results),
                           "--model_name", args.model, "--model_arch", args.arch, "--sample_num", str(args.n),
                           "--batch_size", str(args.batch_size), "--chat_template", args.chat_template, "--dtype", args.dtype,
                           *(["--device", args.device] if args.device else []), *point.run_flags()])
        if status != 0:
            raise SystemExit(status)
        print(f"[{index}/{len(todo)}] {point.name}: HELM evaluation", flush=True)
        record = {"policy": point.policy, "budget": point.budget, "n": args.n,
                  **_helm(results, args.task, args.arch, f"sweep-{folder.name}-{point.name}", args.n),
                  **_kv(results)}
        if point.policy != "full" and args.fidelity_n > 0:
            print(f"[{index}/{len(todo)}] {point.name}: fidelity on {args.fidelity_n} articles", flush=True)
            fidelities = fidelities or Fidelities(folder, args)
            record.update(fidelities.measure(point))
        _write_json(done, record)
        report.write(folder)
    report.write(folder)
    return folder


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """What a report is of: task, model, precision, prompt format, and where reports live."""
    p.add_argument("--task", default="xsum")
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
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=list(BUDGETS))
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    unknown = [x for x in args.policies if x != "local" and x not in report.KNOWN_POLICIES]
    if unknown or any(not 0 < b <= 1 for b in args.budgets):
        print(f"sweep: error: unknown --policies {unknown}" if unknown else
              "sweep: error: --budgets must lie in (0, 1]", file=sys.stderr)
        return 2
    print(f"report: {sweep(args)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
