"""`make lab-lm-eval TASK=copa`: full, h2o and local on one lm-eval task with the paper's three
steps (`h2o.serve.lm_eval.paper`), then one accuracy table with both normalisations.

The requests are made once; each mode scores them once (mask mode, the paper's simulation, or
`--kv_mode drop`) and is evaluated twice from its results: the paper's mean log-probability per
continuation token, and lm-eval's own sum (with lm-eval's byte-normalised `acc_norm` where the
task has it). Intervals are 95%: 1.96 of lm-eval's standard errors. Reruns reuse finished files.

    python -m h2o.lab.lm_eval_lab --task copa --limit 20 [--report reports/lm_eval-smollm2]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from h2o.models import DEFAULT_MODEL
from h2o.serve.lm_eval import paper
from h2o.serve.lm_eval.cli import offline
from h2o.serve.lm_eval.tasks import PAPER_SHOTS, BadInput, check_names

# The paper's three modes (h2o_hf/scripts/lm_eval/*.sh): 20% of the text in the small caches.
MODES: dict[str, dict[str, object]] = {
    "full": {},
    "h2o": {"policy": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1},
    "local": {"policy": "h2o", "heavy_ratio": 0.0, "recent_ratio": 0.2},
}
Z95 = 1.96


@dataclass(frozen=True)
class Row:
    """One mode's accuracies on the task: (value, 95% half-width) or None where not reported."""

    mode: str
    paper_acc: tuple[float, float]
    lm_eval_acc: tuple[float, float]
    lm_eval_acc_norm: tuple[float, float] | None
    n: int


def _metric(results: dict, task: str, name: str) -> tuple[float, float] | None:
    scores = results["results"][task]
    if f"{name},none" not in scores:
        return None
    return scores[f"{name},none"], Z95 * scores[f"{name}_stderr,none"]


def _cached(path: Path, make) -> dict:
    """The JSON at `path`, made by `make()` and written once."""
    if not path.is_file():
        paper.write_json(str(path), make())
    return json.loads(path.read_text())


def run_task(task: str, limit: int | None, shots: int, model: str, arch: str, kv_mode: str, batch_size: int,
             out: Path) -> list[Row]:
    """Every mode of `MODES` on `task`'s first `limit` documents (None: all)."""
    from h2o.serve.lm_eval.model import LabLM

    check_names([task], "--task")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{task}-{shots}-{limit or 'all'}"
    requests = out / f"{stem}.jsonl"
    if not requests.is_file():
        paper.generate_task_data(str(requests), task, shots, limit)
    rows = []
    for mode, cache in MODES.items():
        results = out / f"{stem}-{arch}-{mode}{'-drop' if cache and kv_mode == 'drop' else ''}.jsonl"
        if not results.is_file():
            small = {**cache, "kv_mode": kv_mode} if cache else {}
            lm = LabLM(pretrained=model, model_arch=arch, batch_size=batch_size, **small)
            paper.run_requests(str(requests), str(results), lm)
        metrics = {norm: _cached(results.with_suffix(f".{norm}.json"),
                                 lambda norm=norm: paper.evaluate_results(str(results), task, shots, norm, limit))
                   for norm in ("mean", "sum")}
        rows.append(Row(mode, _metric(metrics["mean"], task, "acc"), _metric(metrics["sum"], task, "acc"),
                        _metric(metrics["sum"], task, "acc_norm"), metrics["sum"]["n-samples"][task]["effective"]))
    return rows


def _cell(value: tuple[float, float] | None) -> str:
    return "-" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def table(task: str, rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [f"| {task} | n | acc, paper (mean logprob) | acc, lm-eval (sum) | acc_norm, lm-eval |",
             "|---|--:|--:|--:|--:|"]
    lines += [f"| {r.mode} | {r.n} | {_cell(r.paper_acc)} | {_cell(r.lm_eval_acc)} | {_cell(r.lm_eval_acc_norm)} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm_eval_lab", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="copa")
    p.add_argument("--limit", type=int, default=20, help="the first N documents (0: the whole split)")
    p.add_argument("--shots", type=int, default=PAPER_SHOTS)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--model_arch", default="llama")
    p.add_argument("--kv_mode", default="mask", choices=("mask", "drop"))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--out", default="out/lab/lm_eval", help="folder of the requests, results and metrics")
    p.add_argument("--report", default=None, help="also write the table as TASK.md in this folder")
    args = p.parse_args(argv)
    offline()
    try:
        rows = run_task(args.task, args.limit or None, args.shots, args.model, args.model_arch, args.kv_mode,
                        args.batch_size, Path(args.out))
    except BadInput as error:
        print(f"lm_eval_lab: error: {error}", file=sys.stderr)
        return 2
    text = table(args.task, rows)
    print(text)
    if args.report:
        Path(args.report).mkdir(parents=True, exist_ok=True)
        (Path(args.report) / f"{args.task}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
