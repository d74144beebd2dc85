"""The sweep's report: a table (CSV and Markdown) and plots from the finished points.

A point holds the task's HELM scores (`scores`, per article too) and names the one the report
ranks by (`main`): ROUGE-2 for XSUM, ROUGE-L for MultiNews, recall for the needle. Spreads are 95%
confidence intervals of a mean over articles (Student's t, `paired.mean_ci`). A policy "beats" H2O at a
budget only when the interval of the per-article difference excludes zero, so a reader can tell a
real gain from noise. Needle points also hold each article's (length, depth) cell: the report
draws recall over that grid for full, h2o and local.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
from cycler import cycler  # noqa: E402

from h2o import jsonl  # noqa: E402
from h2o.lab import paired  # noqa: E402
from h2o.lab.paired import shown  # noqa: E402
from h2o.lab.points import LOCAL  # noqa: E402
from h2o.models import DEFAULT_MODEL  # noqa: E402

# Points scored before the tasks named their scores hold XSUM's.
XSUM_SCORES, XSUM_MAIN = ("rouge_1", "rouge_2", "rouge_l"), "rouge_2"
PLOT_FILES = {"rouge_2": "rouge2", "rouge_l": "rougel", "ruler_string_match_part": "recall"}
FIXED_COLUMNS = ("kv_mib_budget", "kv_mib_peak", "kv_vs_full", "kl_mean", "agreement", "fidelity_n")


def load(folder: Path) -> list[dict]:
    points = [json.loads(p.read_text()) for p in sorted((folder / "points").glob("*.json"))]
    return sorted(points, key=lambda p: (p["budget"], p["policy"]))


def scores(points: list[dict]) -> tuple[tuple[str, ...], str]:
    """The scores the points hold, in order, and the one the report ranks by."""
    first = points[0] if points else {}
    return tuple(first.get("scores", XSUM_SCORES)), first.get("main", XSUM_MAIN)


def columns(points: list[dict]) -> list[str]:
    names, main = scores(points)
    out = ["policy", "budget", "n"]
    for name in names:
        out += [name, f"{name}_ci95"] if name == main else [name]
    return out + [f"{main}_vs_full", *FIXED_COLUMNS]


def rows(points: list[dict]) -> list[dict]:
    names, main = scores(points)
    full = next((p for p in points if p["policy"] == "full"), None)
    table = []
    for p in points:
        value, ci = paired.mean_ci(p["per_article"][main])
        kl = p.get("kl_per_article")
        agree = p.get("agreement_per_article")
        table.append({
            "policy": p["policy"], "budget": p["budget"], "n": p["n"],
            **{name: p.get(name) for name in names}, main: value, f"{main}_ci95": ci,
            f"{main}_vs_full": value / full[main] if full and full.get(main) else None,
            # Points generated before the budget's bytes were recorded have none.
            "kv_mib_budget": p["kv_bytes_budget"] / 2**20 if "kv_bytes_budget" in p else None,
            "kv_mib_peak": p["kv_bytes_peak"] / 2**20,
            "kv_vs_full": p["kv_bytes_peak"] / p["kv_bytes_full"],
            "kl_mean": sum(kl) / len(kl) if kl else None,
            "agreement": sum(agree) / len(agree) if agree else None,
            "fidelity_n": len(kl) if kl else 0,
        })
    return table


def _best_lines(points: list[dict], values, higher_is_better: bool, label: str) -> list[str]:
    """One line per budget: the best policy by `values(point)` (per-article numbers), and whether
    it differs from H2O beyond noise (95% interval of the per-article difference)."""
    lines = []
    for budget in sorted({p["budget"] for p in points if p["policy"] != "full"}):
        here = [p for p in points if p["budget"] == budget and p["policy"] != "full" and values(p)]
        if not here:
            continue
        ranked = sorted(here, key=lambda p: paired.mean_ci(values(p))[0], reverse=higher_is_better)
        best = ranked[0]
        h2o = next((p for p in here if p["policy"] == "h2o"), None)
        mean = paired.mean_ci(values(best))[0]
        line = f"- {budget:.0%}: **{best['policy']}** ({label} {mean:.4f}, n={len(values(best))})"
        # Against H2O; when H2O is the best, against the runner-up.
        other = h2o if best is not h2o else (ranked[1] if len(ranked) > 1 else None)
        if other is not None:
            mean, ci = paired.mean_ci([a - b for a, b in zip(values(best), values(other))])
            verdict = "beyond noise" if abs(mean) > ci else "within noise"
            line += f"; vs {other['policy']} {mean:+.4f} ± {ci:.4f} per article ({verdict})"
        lines.append(line)
    return lines


def h2o_against_full(points: list[dict]) -> list[str]:
    """One line per budget: H2O's main score minus the full cache's, paired over the articles, so
    a reader sees where H2O holds (within noise of the full cache) and where it does not."""
    main = scores(points)[1]
    full = next((p for p in points if p["policy"] == "full"), None)
    lines = []
    for p in (p for p in points if p["policy"] == "h2o" and full is not None):
        mean, ci = paired.mean_ci([a - b for a, b in zip(p["per_article"][main], full["per_article"][main])])
        verdict = "holds: within noise" if abs(mean) <= ci else "loses: beyond noise"
        lines.append(f"- {p['budget']:.0%}: {mean:+.4f} ± {ci:.4f} per article ({verdict})")
    return lines


def best_per_budget(points: list[dict]) -> list[str]:
    """One line per budget: the best policy by the main score, and whether it beats H2O beyond noise."""
    main = scores(points)[1]
    return _best_lines(points, lambda p: p["per_article"][main], True, shown(main))


def closest_per_budget(points: list[dict]) -> list[str]:
    """One line per budget: the policy with the lowest KL to the full cache, against H2O's."""
    return _best_lines(points, lambda p: p.get("kl_per_article") or [], False, "KL")


def _fmt(value: object, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _made_on(settings: dict) -> str:
    """Where the generate stage ran, as settings.json records it."""
    made = settings.get("made_with") or {}
    where = made.get("gpu") or settings.get("device")
    versions = ", ".join(f"{k} {made[k]}" for k in ("torch", "transformers") if made.get(k))
    return f"; generated on {where} ({versions})" if where and versions else ""


def markdown(table: list[dict], points: list[dict], settings: dict | None, tuned: int) -> str:
    """results.md; `tuned`: how many first articles chose the knobs (`paired.tuned_on`)."""
    title = []
    if settings:
        model = settings.get("model")
        title = [f"Model {'SmolLM2-135M-Instruct (embedded)' if model in ('', DEFAULT_MODEL) else model} "
                 f"({settings.get('arch')}), task "
                 f"{settings.get('task')}, weights and activations in {settings.get('dtype')}, chat template "
                 f"{settings.get('chat_template')}; drop mode (evicted tokens leave memory){_made_on(settings)}.",
                 ""]
    names, main = scores(points)
    head = ["policy", "budget", "n", *(f"{shown(m)} (± 95% CI)" if m == main else shown(m) for m in names),
            f"{shown(main)} / full", "KV MiB budget", "KV MiB peak", "KV / full", "KL (nats)", "greedy agreement"]
    lines = [*title, "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        values = [f"{_fmt(r[m], '.4f')} ± {_fmt(r[f'{m}_ci95'], '.4f')}" if m == main else _fmt(r[m], ".4f")
                  for m in names]
        lines.append(
            f"| {r['policy']} | {r['budget']:.0%} | {r['n']} | {' | '.join(values)} "
            f"| {_fmt(r[f'{main}_vs_full'], '.0%')} | {_fmt(r['kv_mib_budget'], '.2f')} | {r['kv_mib_peak']:.2f} | {r['kv_vs_full']:.0%} "
            f"| {_fmt(r['kl_mean'], '.3f')} | {_fmt(r['agreement'], '.0%')} |"
        )
    fidelity_n = max((r["fidelity_n"] for r in table), default=0)
    notes = [
        "",
        f"KL and greedy agreement: along the full cache's greedy continuation, teacher-forced, on the "
        f"first {fidelity_n} articles. KV MiB, per sequence over all layers: budget, what the cache holds once "
        "the prompt is evicted (every layer's heavy hitters and recent window: the same for policies that "
        "spend H2O's memory by layer or by head); peak, the most it held, prompt included, as the engine "
        "measured it.",
        "",
        (f"Each policy against H2O, paired per article, on all articles and on those held out from the choice "
         f"of knobs (articles {tuned} on): [paired.md](paired.md)." if tuned else
         "Each policy against H2O, paired per article (no knob was chosen on this task): [paired.md](paired.md)."),
        "",
        f"Best policy by {shown(main)} at each budget:",
        *best_per_budget(points),
        "",
        "Closest to the full cache (lowest KL) at each budget:",
        *closest_per_budget(points),
        "",
        f"H2O's {shown(main)} minus the full cache's on the same articles:",
        *h2o_against_full(points),
    ]
    return "\n".join(lines + notes) + "\n"


def new_figure() -> tuple[plt.Figure, plt.Axes]:
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    # Ten colours, then the same ten dotted: a report has more policies than one palette tells apart.
    ax.set_prop_cycle(cycler(linestyle=["-", ":"]) * cycler(color=plt.get_cmap("tab10").colors))
    return fig, ax


def save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    """Grid, the legend beside the axes (lines stay unhidden), and a PNG readable on any screen."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plots(folder: Path, table: list[dict], main: str) -> None:
    policies = sorted({r["policy"] for r in table if r["policy"] != "full"})
    full = next((r for r in table if r["policy"] == "full"), None)
    n = max((r["n"] for r in table), default=0)
    panels = [
        (f"{PLOT_FILES.get(main, main)}_vs_budget.png", shown(main), main,
         f"{shown(main)}, mean of {n} articles (95% CI)", f"{main}_ci95", False),
        ("kv_vs_budget.png", "Peak KV cache", "kv_mib_peak", "peak KV cache per sequence (MiB)", None, False),
        ("kl_vs_budget.png", "KL to the full cache", "kl_mean", "KL(full || small cache), nats per token", None, True),
    ]
    for filename, title, key, ylabel, err, log in panels:
        fig, ax = new_figure()
        for i, policy in enumerate(policies):
            pts = [r for r in table if r["policy"] == policy and r[key] is not None]
            if not pts:
                continue
            # A small sideways shift per policy keeps the error bars apart.
            xs = [100 * r["budget"] + 0.25 * (i - (len(policies) - 1) / 2) for r in pts]
            ax.errorbar(xs, [r[key] for r in pts], yerr=[r[err] for r in pts] if err else None,
                        marker="o", capsize=3, label=policy)
        if full is not None and full[key] is not None:
            ax.axhline(full[key], color="black", linestyle="--", label="full cache")
        ax.set_xticks(sorted({100 * r["budget"] for r in table if r["policy"] != "full"}))
        ax.set_xlabel("KV budget (% of the prompt's tokens)")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.set_title(f"{title} vs KV budget ({folder.name})")
        save_figure(fig, ax, folder / filename)


def kl_by_step_plot(folder: Path, points: list[dict], budget: float = 0.2) -> None:
    """KL to the full cache at each generated token, one line per policy, at the sweep's budget
    closest to `budget`: does the loss come at once (the prompt's eviction) or build up?"""
    stepped = [p for p in points if p.get("kl_by_step")]
    if not stepped:
        return
    chosen = min({p["budget"] for p in stepped}, key=lambda b: abs(b - budget))
    fig, ax = new_figure()
    for p in sorted((p for p in stepped if p["budget"] == chosen), key=lambda p: p["policy"]):
        ax.plot(range(1, len(p["kl_by_step"]) + 1), p["kl_by_step"], label=p["policy"])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("generated token (teacher-forced along the full cache's summary)")
    ax.set_ylabel("KL(full || small cache), nats")
    ax.set_title(f"KL at each summary token, {chosen:.0%} budget ({folder.name})")
    save_figure(fig, ax, folder / "kl_by_step.png")


def grid(point: dict, main: str) -> tuple[list[int], list[int], list[list[float]]]:
    """Lengths, depths, and the mean score of each (depth, length) cell over its articles."""
    cells = [tuple(c) for c in point["cells"]]
    lengths, depths = sorted({c[0] for c in cells}), sorted({c[1] for c in cells})
    values = {}
    for cell, value in zip(cells, point["per_article"][main]):
        values.setdefault(cell, []).append(value)
    return lengths, depths, [[paired.mean_ci(values[(n, d)])[0] if (n, d) in values else float("nan") for n in lengths]
                             for d in depths]


def grid_plot(folder: Path, points: list[dict]) -> None:
    """`needle_grid.png`: the score by haystack length and needle depth, the full cache first, then
    h2o and local at each budget, one row each."""
    main = scores(points)[1]
    celled = [p for p in points if p.get("cells")]
    full = next((p for p in celled if p["policy"] == "full"), None)
    kinds = [name for name in ("h2o", LOCAL) if any(p["policy"] == name for p in celled)]
    budgets = sorted({p["budget"] for p in celled if p["policy"] in kinds})
    if full is None and not kinds:
        return
    fig, axes = plt.subplots(max(len(kinds), 1), 1 + len(budgets), squeeze=False, layout="constrained",
                             figsize=(2.2 * (1 + len(budgets)) + 1.4, 2.2 * max(len(kinds), 1) + 0.6))
    image = None
    for r, name in enumerate(kinds or ["full"]):
        panels = [(full, "full")] + [(next((p for p in celled if p["policy"] == name and p["budget"] == b), None),
                                      f"{name} {b:.0%}") for b in budgets]
        for c, (point, title) in enumerate(panels):
            ax = axes[r][c]
            if point is None:
                ax.axis("off")
                continue
            lengths, depths, values = grid(point, main)
            image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, row in enumerate(values):
                for j, value in enumerate(row):
                    ax.text(j, i, _fmt(value, ".1f"), ha="center", va="center", fontsize=7,
                            color="black" if value > 0.6 else "white")
            ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths] if c == 0 else [])
            ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel("needle depth")
            if r == len(axes) - 1:
                ax.set_xlabel("length (tokens)")
    fig.colorbar(image, ax=axes, shrink=0.8, label=shown(main))
    fig.suptitle(f"{shown(main)} by length and depth ({folder.name})")
    fig.savefig(folder / "needle_grid.png", dpi=120)
    plt.close(fig)


def summaries(folder: Path) -> None:
    """`summaries.jsonl`: per article (in the task file's order), each point's generated text side
    by side. The HELM results files under results/ are large and stay out of version control, so
    a finished point whose results file is not here (a fresh clone) keeps the texts it had."""
    finished = {path.stem for path in (folder / "points").glob("*.json")}  # an unfinished point's texts are partial
    texts: dict[str, list[str]] = {}
    if (folder / "summaries.jsonl").exists():
        for line in jsonl.objects(folder / "summaries.jsonl"):
            for name, text in line.record.items():
                if name in finished:
                    texts.setdefault(name, []).append(text)
    for path in sorted((folder / "results").glob("*.jsonl")):
        if path.stem in finished:
            texts[path.stem] = [line.record["result"]["choices"][0]["text"] for line in jsonl.objects(path)]
    if not texts:
        return
    order = sorted(texts, key=lambda name: (name != "full", name))
    count = max(len(t) for t in texts.values())
    with open(folder / "summaries.jsonl", "w") as handle:
        for article in range(count):
            row = {"article": article, **{name: texts[name][article] for name in order if article < len(texts[name])}}
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write(folder: Path) -> None:
    points = load(folder)
    if not points:
        return
    table = rows(points)
    with open(folder / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(points))
        writer.writeheader()
        writer.writerows(table)
    path = folder / "settings.json"
    settings = json.loads(path.read_text()) if path.exists() else None
    tuned = paired.tuned_on(settings.get("task") if settings else None)
    (folder / "results.md").write_text(markdown(table, points, settings, tuned))
    plots(folder, table, scores(points)[1])
    kl_by_step_plot(folder, points)
    grid_plot(folder, points)
    summaries(folder)
    paired.write(folder, points, tuned)
