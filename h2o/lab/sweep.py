"""The lab's experiment: every policy at every KV budget, evaluated by HELM and against the full cache.

    python -m h2o.lab.sweep [--task xsum] [--model smollm2] [--arch llama] [--n 200] [--stage all] ...

Each point (policy, budget) is generated as run_helm.py generates (`h2o.serve.serve`), compared with the full cache by
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
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o import jsonl, models
from h2o.engine.kv_report import kv_bytes_per_token
from h2o.lab import analysis, report
from h2o.lab.fidelity import against_full, by_length, full_reference, greedy_continuations, in_batches
from h2o.lab.points import BUDGETS, POLICIES, Point, parse_budgets, parse_policies, write_json
from h2o.lab.points import points as points_of
from h2o.lab.settings import ReportSettings
from h2o.serve import cli, helm_io
from h2o.serve.options import ServeOptions
from h2o.serve.serve import serve
from lab_helm.helm_cli import run_dir  # lab_helm: where HELM's output lives and how to read it;
from lab_helm.paths import BENCHMARK_OUTPUT  # these three modules need no HELM installed
from lab_helm.tasks import Task, get_task

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SweepOptions(ReportSettings):
    """The sweep's flags, checked when made (a bad value raises ValueError naming its flag)."""

    n: int = 200  # articles per point
    fidelity_n: int = 50
    analysis_n: int = 0
    batch_size: int = 4
    fidelity_batch: int = 0  # 0: batch_size's
    budgets: tuple[float, ...] = BUDGETS
    policies: tuple[str, ...] = POLICIES  # NAME or NAME:VALUE (`points.policy_spec`)
    device: str | None = None
    stage: str = "all"  # generate, score or all

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> SweepOptions:
        """The sweep's command line (None: sys.argv); a malformed one exits as argparse does."""
        return cls(**vars(parser().parse_args(argv)))

    def __post_init__(self) -> None:
        unknown = [x for x in self.policies if x.partition(":")[0] not in POLICIES]
        if unknown:
            raise ValueError(f"unknown --policies {unknown}")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ValueError("--budgets must lie in (0, 1]")
        if self.fidelity_batch < 0:
            raise ValueError("--fidelity_batch must be 0 (--batch_size's) or more")
        for point in self.points()[1:]:
            point.eviction()  # a knob's value out of range fails here, before anything runs

    def points(self) -> list[Point]:
        return points_of(self.policies, self.budgets)


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
    if task.grid:
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


class Loaded:
    """The sweep's tokenizer and weights, loaded on first use and shared by every point."""

    def __init__(self, settings: ReportSettings, device: str) -> None:
        self.settings, self.device = settings, device

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return models.load_tokenizer(self.settings.model, self.settings.arch)[0]

    @cached_property
    def model(self) -> PreTrainedModel:
        return models.load_model(self.settings.model, self.device, self.settings.dtype)


class Fidelities:
    """Teacher-forced comparison with the full cache's greedy continuations and log-probabilities
    (both computed once, the continuations kept on disk)."""

    def __init__(self, folder: Path, options: SweepOptions, loaded: Loaded) -> None:
        tokenizer, self.model = loaded.tokenizer, loaded.model
        requests, self.prompts = options.task_prompts(tokenizer, options.fidelity_n)
        self.batches = by_length(self.prompts, options.fidelity_batch or options.batch_size)
        cached = folder / "fidelity_reference.json"
        continuations = json.loads(cached.read_text()) if cached.exists() else []
        if len(continuations) != len(self.prompts):
            continuations = greedy_continuations(self.model, tokenizer, requests, self.prompts, self.batches)
            write_json(cached, continuations)
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


def device_of(options: SweepOptions) -> str:
    """--device, or the GPU where there is one."""
    if options.device and options.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sweep: error: --device {options.device}: no CUDA device available")
    return options.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _made_with(device: str) -> dict:
    """What generated the report, for its reader (not checked: the score stage runs elsewhere)."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "gpu": gpu}


def _check_settings(folder: Path, recorded: ReportSettings, device: str | None) -> None:
    """A report holds one model, task and precision, generated on one kind of device: refuse to
    resume one made otherwise. `device` is None in the score stage, which computes nothing on it
    (and never creates the settings: a report starts where it is generated)."""
    settings = {"task": recorded.task, "model": recorded.model, "arch": recorded.arch, "dtype": recorded.dtype,
                "chat_template": recorded.chat_template}
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
        write_json(path, {**settings, "made_with": _made_with(device)})


def _holds(path: Path, n: int) -> bool:
    """Whether a point's record (generated or finished) exists for these `n` articles."""
    return path.exists() and json.loads(path.read_text()).get("n") == n


class Sweep:
    """One report folder's points: generated (what needs the model) and scored (HELM)."""

    def __init__(self, folder: Path, options: SweepOptions, device: str | None) -> None:
        self.folder, self.options = folder, options
        self.loaded = Loaded(options, device) if device is not None else None
        self.fidelities: Fidelities | None = None

    def finished(self, point: Point) -> Path:
        return self.folder / "points" / f"{point.name}.json"

    def generated(self, point: Point) -> Path:
        return self.folder / "generated" / f"{point.name}.json"

    def results(self, point: Point) -> Path:
        return self.folder / "results" / f"{point.name}.jsonl"

    def generate(self, point: Point, tag: str) -> None:
        """The point's results, KV bytes and fidelity, into generated/<name>.json."""
        options = self.options
        if _holds(self.generated(point), options.n):
            print(f"{tag}: generated", flush=True)
            return
        print(f"{tag}: generating {options.n} summaries", flush=True)
        results = self.results(point)
        model = self.loaded.model
        cli.log_to_stderr()  # the run's lines, as run_helm.py prints them
        try:
            serve(point.serve_options(ServeOptions(
                output_path=str(results), input_path=str(options.requests), model_name=options.model,
                model_arch=options.arch, sample_num=options.n, batch_size=options.batch_size,
                chat_template=options.chat_template, dtype=options.dtype, device=self.loaded.device)), model)
        except cli.ERRORS as error:
            raise SystemExit(cli.print_error(error)) from None
        record = {"policy": point.label, "budget": point.budget, "n": options.n, "knob": point.knob,
                  **_kv(results, point, model)}
        if point.policy != "full" and options.fidelity_n > 0:
            print(f"{tag}: fidelity on {options.fidelity_n} articles", flush=True)
            self.fidelities = self.fidelities or Fidelities(self.folder, options, self.loaded)
            record.update(self.fidelities.measure(point))
        write_json(self.generated(point), record)

    def unscorable(self, point: Point, requests: list[helm_io.Request]) -> str | None:
        """Why the score stage cannot score this point, or None."""
        if not _holds(self.generated(point), self.options.n):
            return (f"{self.generated(point)}: no record of {self.options.n} generated articles; "
                    "run --stage generate first")
        done = helm_io.completed_count(self.results(point), requests)
        if done != len(requests):
            return f"{self.results(point)}: {done} of {len(requests)} results; run --stage generate to finish it"
        return None

    def score(self, point: Point, tag: str) -> None:
        """HELM's scores of the generated point, into points/<name>.json, and the report."""
        print(f"{tag}: HELM evaluation", flush=True)
        options = self.options
        generated = json.loads(self.generated(point).read_text())
        scores = _helm(self.results(point), options.task, options.arch, f"sweep-{self.folder.name}", point.name,
                       options.n)
        write_json(self.finished(point), {**{k: generated.pop(k) for k in ("policy", "budget", "n")},
                                           **scores, **generated})
        report.write(self.folder)


def analyse(folder: Path, options: SweepOptions, loaded: Loaded, todo: list[Point]) -> None:
    """h2o.lab.analysis on the sweep's points and first --analysis_n articles, unless done."""
    wanted = [p for p in todo if p.policy != "full"]
    path = folder / "analysis.json"
    if path.exists():
        before = json.loads(path.read_text())
        # The same points in any order: the analysis of each is its own.
        if before.get("n") == options.analysis_n and sorted(before.get("names", [])) == sorted(p.name for p in wanted):
            print("analysis: done", flush=True)
            return
    print(f"analysis on {options.analysis_n} articles", flush=True)
    analysis.write(folder, loaded.model, loaded.tokenizer, options, wanted, options.analysis_n)


def sweep(options: SweepOptions) -> Path:
    available = len(helm_io.read_requests(options.requests))
    if options.n > available:
        print(f"--n {options.n}: data/{options.task}.jsonl has {available} requests; a point is all of them",
              flush=True)
        options = replace(options, n=available)
    folder = options.folder
    for sub in ("points", "results", "generated"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    generating, scoring = options.stage in ("generate", "all"), options.stage in ("score", "all")
    device = device_of(options) if generating else None
    _check_settings(folder, options, device)
    run = Sweep(folder, options, device)
    todo = options.points()
    left = [p for p in todo if not _holds(run.finished(p), options.n)]
    if not generating:
        # Every point checked before any is scored: a bad one stops the stage with nothing half done.
        requests = helm_io.read_requests(options.requests)[: options.n]
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
    if generating and options.analysis_n > 0:
        analyse(folder, options, run.loaded, todo)
    if scoring:
        report.write(folder)
    return folder


def parser() -> argparse.ArgumentParser:
    """The sweep's flags: each sets the `SweepOptions` field of its name, and defaults to it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ReportSettings.add_flags(p)
    p.add_argument("--n", type=int, default=SweepOptions.n, help="articles per point")
    p.add_argument("--fidelity_n", type=int, default=SweepOptions.fidelity_n,
                   help="articles for KL / agreement (0: skip)")
    p.add_argument("--analysis_n", type=int, default=SweepOptions.analysis_n,
                   help="articles for h2o.lab.analysis on the sweep's points, in the generate stage (0: skip)")
    p.add_argument("--batch_size", type=int, default=SweepOptions.batch_size)
    p.add_argument("--fidelity_batch", type=int, default=SweepOptions.fidelity_batch,
                   help="articles a batch for KL / agreement (default: --batch_size); a batch steps the reference "
                        "engine once per continuation token and holds batch x tokens x vocabulary log-probabilities")
    p.add_argument("--budgets", type=parse_budgets, default=SweepOptions.budgets)
    p.add_argument("--policies", type=parse_policies, default=SweepOptions.policies,
                   help="NAME or NAME:VALUE, VALUE for the policy's knob (h2o-shrink:0.5), comma-separated")
    p.add_argument("--device", default=SweepOptions.device,
                   help="where the generate stage runs (default: cuda if present)")
    p.add_argument("--stage", default=SweepOptions.stage, choices=("generate", "score", "all"),
                   help="generate: what needs the model, no HELM; score: HELM on generated points; all: both")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        options = SweepOptions.from_argv(argv)
        folder = sweep(options)
    except (ValueError, FileNotFoundError) as error:  # a bad flag, or a requests or results file named with its line
        print(f"sweep: error: {error}", file=sys.stderr)
        return 2
    print(f"{'generated' if options.stage == 'generate' else 'report'}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
