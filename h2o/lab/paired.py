"""Every policy against H2O at the same budget, paired per article: on all articles, and on the
articles held out from the choice of knobs.

A knob (h2o-shrink's `shrink`) is chosen on the first `TUNED_ON` XSUM articles only (a sweep with
`--n 100`, or less); the held-out columns use the articles after them, which played no part in
the choice, so a gain there is not the knob fitted to its own test. No knob is chosen on another
task: there every article is held out, and the table has the one column. Each cell: the policy's
mean minus H2O's over the same articles, and the 95% interval of that difference (Student's t with
n - 1 degrees of freedom: the standard deviation is estimated from the same n articles, which the
normal approximation's 1.96 ignores, too narrow at small n); in bold where the interval excludes
zero.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from scipy import stats

TUNED_ON = 100
TUNED_TASK = "xsum"
SHOWN = {"rouge_1": "ROUGE-1", "rouge_2": "ROUGE-2", "rouge_l": "ROUGE-L", "ruler_string_match_part": "recall"}
COLUMNS = ("policy", "budget", "kv_mib_budget", "kv_vs_h2o", "score", "score_diff_all", "score_ci95_all", "n_all",
           "score_diff_held_out", "score_ci95_held_out", "n_held_out", "kl_diff_all", "kl_ci95_all", "kl_n_all",
           "kl_diff_held_out", "kl_ci95_held_out", "kl_n_held_out")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """(mean, 95% half-width) of a sample, Student's t with n - 1 degrees of freedom; the
    half-width is NaN with fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def paired(values: list[float], h2o: list[float], start: int = 0) -> tuple[float, float, int] | None:
    """(mean, 95% half-width, n) of values - h2o over the articles from `start`; None with fewer
    than two."""
    diffs = [a - b for a, b in zip(values[start:], h2o[start:])]
    if len(diffs) < 2:
        return None
    return *mean_ci(diffs), len(diffs)


def shown(score: str) -> str:
    """A HELM score's name as the reports write it."""
    return SHOWN.get(score, score)


def tuned_on(task: str | None) -> int:
    """How many of a task's first articles chose the knobs (reports made before tasks: XSUM's)."""
    return TUNED_ON if task in (None, TUNED_TASK) else 0


def rows(points: list[dict], tuned: int = TUNED_ON) -> list[dict]:
    """One row per policy (other than H2O and the full cache) and budget where H2O was run too."""
    score = points[0].get("main", "rouge_2") if points else "rouge_2"
    h2o = {p["budget"]: p for p in points if p["policy"] == "h2o"}
    table = []
    for p in points:
        base = h2o.get(p["budget"])
        if p["policy"] in ("h2o", "full") or base is None:
            continue
        row = {"policy": p["policy"], "budget": p["budget"], "score": score,
               "kv_mib_budget": p["kv_bytes_budget"] / 2**20 if "kv_bytes_budget" in p else None,
               "kv_vs_h2o": (p["kv_bytes_budget"] / base["kv_bytes_budget"]
                             if "kv_bytes_budget" in p and "kv_bytes_budget" in base else None)}
        series = {"score": (p["per_article"][score], base["per_article"][score]),
                  "kl": (p.get("kl_per_article") or [], base.get("kl_per_article") or [])}
        for key, (mine, theirs) in series.items():
            n = "n" if key == "score" else "kl_n"
            for split, start in (("all", 0), ("held_out", tuned)):
                mean, ci, count = paired(mine, theirs, start) or (None, None, 0)
                row.update({f"{key}_diff_{split}": mean, f"{key}_ci95_{split}": ci, f"{n}_{split}": count})
        table.append(row)
    return table


def _cell(mean: float | None, ci: float | None) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.4f} ± {ci:.4f}"
    return f"**{text}**" if abs(mean) > ci else text


def _span(count: int, start: int) -> str:
    return f"articles {start}-{start + count - 1}" if count else "none"


def markdown(table: list[dict], tuned: int = TUNED_ON) -> str:
    if not table:
        return ""
    score = shown(table[0]["score"])
    first = max(table, key=lambda r: (r["n_all"], r["kl_n_all"]))
    cell = ("Each cell: the policy's mean minus H2O's over the same articles ± the 95% interval of that difference; "
            "bold where it excludes zero. ")
    kv = "KV MiB: the budget's KV cache per sequence (every layer's heavy hitters and recent window), against H2O's."
    if tuned:
        splits = ("all", "held_out")
        about = (f"Knobs (h2o-shrink's shrink) were chosen on articles 0-{tuned - 1} only; the held-out columns are "
                 f"the articles from {tuned} on, which played no part in the choice. {cell}"
                 f"{score} on all: {_span(first['n_all'], 0)}, held out: {_span(first['n_held_out'], tuned)}; "
                 f"KL (lower is closer to the full cache) on all: {_span(first['kl_n_all'], 0)}, held out: "
                 f"{_span(first['kl_n_held_out'], tuned)}. {kv}")
        head = f"{score} − H2O, all | {score} − H2O, held out | KL − H2O, all | KL − H2O, held out"
    else:
        splits = ("all",)
        about = (f"Knobs (h2o-shrink's shrink) were chosen on {TUNED_TASK.upper()}, never on this task: every article "
                 f"is held out. {cell}{score} on {_span(first['n_all'], 0)}; KL (lower is closer to the full cache) "
                 f"on {_span(first['kl_n_all'], 0)}. {kv}")
        head = f"{score} − H2O | KL − H2O"
    lines = ["# Each policy against H2O at the same budget, paired per article", "", about, "",
             f"| budget | policy | KV MiB | KV / H2O | {head} |", "|---|---|---|---|" + "---|" * 2 * len(splits)]
    for r in sorted(table, key=lambda r: (r["budget"], r["policy"])):
        mib = "-" if r["kv_mib_budget"] is None else f"{r['kv_mib_budget']:.2f}"
        ratio = "-" if r["kv_vs_h2o"] is None else f"{r['kv_vs_h2o']:.0%}"
        cells = [_cell(r[f"{k}_diff_{s}"], r[f"{k}_ci95_{s}"]) for k in ("score", "kl") for s in splits]
        lines.append(f"| {r['budget']:.0%} | {r['policy']} | {mib} | {ratio} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(folder: Path, points: list[dict], tuned: int = TUNED_ON) -> None:
    """paired.md and paired.csv in the report folder; `tuned`: how many first articles chose the knobs."""
    table = rows(points, tuned)
    if not table:
        return
    with open(folder / "paired.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    (folder / "paired.md").write_text(markdown(table, tuned))
