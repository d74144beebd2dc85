"""Where a policy's loss comes from: how much of the attention the summary pays to the prompt
survives the policy's compression of the prompt.

    python -m h2o.lab.analysis [--n 20] [--budgets 0.04,0.2] [--policies h2o,local,...] [--dtype bfloat16] [--device cuda]

(`python -m h2o.lab.sweep --analysis_n N` runs it too, in its generate stage, on the sweep's points.)

Per article, the full cache teacher-forces the full cache's greedy summary and records, for each
layer and KV head, the attention every prompt token receives from the summary's queries (summed
over the query heads sharing the KV head, as the policies score). Each policy then reads the
prompt alone and evicts once, as it does before the first summary token; its *recall* is the
share of the summary's attention that falls on the prompt tokens it kept. An oracle that knew
the summary keeps the same number of tokens in each layer and KV head (a policy's own numbers,
where layers or heads differ), the most attended: the ceiling at that budget.
Later evictions (during the summary) are not counted; the prompt is most of the cache.

GQA what-if: beside each `h2o` point, `h2o-group-max` makes the same first eviction with the
query heads that share a KV head combined by their max instead of their sum (H2O's choice here),
so a token stays when any head of the group needs it.

Writes `analysis.json`, `analysis.md` and `recall_by_layer.png` beside the sweep's report.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o import models
from h2o.engine.reference.generation import Decoder, Eviction
from h2o.lab import report
from h2o.lab.fidelity import greedy_continuations
from h2o.lab.points import POLICIES, Point, parse_budgets, parse_policies, write_json
from h2o.lab.points import points as points_of
from h2o.lab.settings import ReportSettings
from h2o.policies import Budget, Policy

DECILES = 10
SINKS = 4  # "the first tokens", as StreamingLLM's default


class _KeepAll(Policy):
    """Never evicts; its running scores are the attention each token received."""

    name = "keep-all"

    def budget(self, prompt_len: int) -> Budget:
        return Budget(heavy=0, recent=1 << 40)


@torch.inference_mode()
def summary_attention(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """(layers, kv_heads, prompt) attention each prompt token receives from the summary's queries."""
    decoder = Decoder(model, [prompt], Eviction(_KeepAll(0.0, 1.0), "mask"))
    decoder.prefill()
    length = len(prompt)
    before = torch.stack([layer.scores[0, :, :length] for layer in decoder.cache.layers])
    for token in continuation[:-1]:
        decoder.step(torch.tensor([token]))
    after = torch.stack([layer.scores[0, :, :length] for layer in decoder.cache.layers])
    return (after - before).float().cpu()


@torch.inference_mode()
def kept_after_prompt(model, prompt: list[int], point: Point) -> torch.Tensor:
    """(layers, kv_heads, prompt) bool: the prompt tokens the policy attends to after its first
    eviction (mask mode keeps the slots in position order)."""
    decoder = Decoder(model, [prompt], Eviction(point.eviction().policy, "mask"))
    decoder.prefill()
    return torch.stack([layer.active[0, :, : len(prompt)] for layer in decoder.cache.layers]).cpu()


@torch.inference_mode()
def prompt_attention_by_head(model, prompt: list[int]) -> torch.Tensor:
    """(layers, query_heads, prompt) attention each prompt token receives from the prompt's own
    rows, per query head: what H2O's first eviction scores, before the KV group is summed."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([prompt], device=model.device), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([a[0].float().sum(1) for a in out.attentions]).cpu()


def h2o_kept(per_head: torch.Tensor, kv_heads: int, budget: float, group: str = "sum") -> torch.Tensor:
    """(layers, kv_heads, prompt) bool: H2O's first eviction from per-query-head scores, with the
    query heads sharing a KV head combined by `group`: "sum" (H2O here) or "max" (a token stays
    if any head of the group needs it)."""
    layers, heads, length = per_head.shape
    grouped = per_head.view(layers, kv_heads, heads // kv_heads, length)
    scores = grouped.sum(2) if group == "sum" else grouped.amax(2)
    policy = Point("h2o", budget).eviction().policy
    limits = policy.budget(length)
    every = lambda value: torch.full((layers,), value)  # noqa: E731  (layers stand in for the batch)
    positions = torch.arange(length).expand(layers, kv_heads, length)
    chosen = policy.select(scores, torch.ones_like(scores), positions, every(length), every(limits.heavy),
                           every(limits.recent))
    return chosen.active


def recall(mass: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(layers,) share of the summary's attention on kept tokens, averaged over KV heads."""
    return ((mass * kept).sum(-1) / mass.sum(-1).clamp(min=1e-12)).mean(-1)


def oracle(mass: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
    """The tokens per (layer, head) the summary attends most: `count` of them, or (layers, heads)
    counts."""
    order = mass.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(mass.shape[-1]).expand_as(order))
    return rank < torch.as_tensor(count)[..., None]


def deciles(weights: torch.Tensor) -> list[float]:
    """Share of `weights` (summed over layers and heads) in each tenth of the prompt."""
    per_token = weights.float().sum(dim=(0, 1))
    bins = torch.arange(per_token.numel()) * DECILES // per_token.numel()
    shares = torch.zeros(DECILES).index_add_(0, bins, per_token)
    return (shares / shares.sum().clamp(min=1e-12)).tolist()


def _kept_sets(model, prompt: list[int], points: list[Point], per_head: torch.Tensor | None):
    """Each point's kept tokens; beside each h2o point, H2O with the KV group's max (a what-if
    of the first eviction, named `h2o-group-max`)."""
    for point in points:
        yield point, kept_after_prompt(model, prompt, point)
        if point.policy == "h2o" and per_head is not None:
            kv_heads = model.config.num_key_value_heads
            yield Point("h2o-group-max", point.budget), h2o_kept(per_head, kv_heads, point.budget, "max")


def analyse(model, prompts: list[list[int]], continuations: list[list[int]], points: list[Point]) -> dict:
    """Recall per policy and budget (overall and by layer), and where in the prompt the summary
    looks against where each policy keeps tokens; every number a mean over articles."""
    by_point: dict[str, dict] = {}
    sinks_share, summary_deciles = [], []
    for index, (prompt, continuation) in enumerate(zip(prompts, continuations), start=1):
        print(f"[{index}/{len(prompts)}] article: {len(prompt)} prompt tokens", flush=True)
        mass = summary_attention(model, prompt, continuation)
        sinks_share.append(float(mass[..., :SINKS].sum() / mass.sum()))
        summary_deciles.append(deciles(mass))
        per_head = prompt_attention_by_head(model, prompt) if any(p.policy == "h2o" for p in points) else None
        for point, kept in _kept_sets(model, prompt, points, per_head):
            entry = by_point.setdefault(point.name, {"policy": point.label, "budget": point.budget,
                                                     "layers": [], "oracle_layers": [], "deciles": []})
            entry["layers"].append(recall(mass, kept).tolist())
            entry["oracle_layers"].append(recall(mass, oracle(mass, kept.sum(-1))).tolist())
            entry["deciles"].append(deciles(kept))
    mean = lambda rows: [sum(col) / len(col) for col in zip(*rows)]  # noqa: E731
    results = []
    for entry in by_point.values():
        layers, ceiling = mean(entry["layers"]), mean(entry["oracle_layers"])
        results.append({
            "policy": entry["policy"], "budget": entry["budget"],
            "recall": sum(layers) / len(layers), "oracle_recall": sum(ceiling) / len(ceiling),
            "recall_by_layer": layers, "oracle_by_layer": ceiling, "kept_deciles": mean(entry["deciles"]),
            "recall_per_article": [sum(a) / len(a) for a in entry["layers"]],
        })
    return {"n": len(prompts), "sinks": SINKS, "summary_on_sinks": sum(sinks_share) / len(sinks_share),
            "summary_deciles": mean(summary_deciles), "points": results}


def markdown(analysis: dict, folder: Path) -> str:
    points = sorted(analysis["points"], key=lambda p: (p["budget"], -p["recall"]))
    lines = [
        f"# Where the loss comes from ({folder.name}, {analysis['n']} articles)",
        "",
        "Recall: the share of the attention the full cache's summary pays to the prompt that falls on",
        "the prompt tokens a policy keeps after its first eviction (mean over layers, KV heads and",
        "articles). Oracle: the same number of tokens, chosen knowing the summary's attention.",
        "h2o-group-max: H2O's first eviction with the query heads sharing a KV head combined by their",
        "max instead of their sum.",
        "",
        "| budget | policy | recall | oracle | worst layer (recall) |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        worst = min(range(len(p["recall_by_layer"])), key=lambda i: p["recall_by_layer"][i])
        lines.append(f"| {p['budget']:.0%} | {p['policy']} | {p['recall']:.3f} | {p['oracle_recall']:.3f} "
                     f"| {worst} ({p['recall_by_layer'][worst]:.3f}) |")
    lines += [
        "",
        f"The summary pays {analysis['summary_on_sinks']:.1%} of its attention on the prompt to the first "
        f"{analysis['sinks']} tokens.",
        "",
        "Where in the prompt (tenths, first to last) the summary looks, and where each policy keeps its tokens",
        "at the smallest budget:",
        "",
        "| | " + " | ".join(f"{10 * i}-{10 * (i + 1)}%" for i in range(DECILES)) + " |",
        "|---|" + "---|" * DECILES,
        "| summary's attention | " + " | ".join(f"{v:.2f}" for v in analysis["summary_deciles"]) + " |",
    ]
    smallest = min(p["budget"] for p in points)
    for p in (p for p in points if p["budget"] == smallest):
        lines.append(f"| {p['policy']} keeps | " + " | ".join(f"{v:.2f}" for v in p["kept_deciles"]) + " |")
    return "\n".join(lines) + "\n"


def plot(analysis: dict, folder: Path, budget: float) -> None:
    here = sorted((p for p in analysis["points"] if p["budget"] == budget), key=lambda p: -p["recall"])
    fig, ax = report.new_figure()
    for p in here:
        ax.plot(p["recall_by_layer"], marker=".", label=p["policy"])
    if here:
        ax.plot(here[0]["oracle_by_layer"], color="black", linestyle="--", label="oracle")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the summary's attention kept")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Attention kept after the prompt's eviction, {budget:.0%} budget ({analysis['n']} articles)")
    report.save_figure(fig, ax, folder / "recall_by_layer.png")


def write(folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: ReportSettings,
          points: list[Point], n: int) -> None:
    """The analysis of `points` on the task's first `n` articles: analysis.json, .md and the plot
    (at the budget closest to 20%) in `folder`."""
    requests, prompts = settings.task_prompts(tokenizer, n)
    continuations = greedy_continuations(model, tokenizer, requests, prompts, [[i] for i in range(len(prompts))])
    analysis = {"dtype": settings.dtype, "device": str(model.device), "names": [p.name for p in points],
                **analyse(model, prompts, continuations, points)}
    write_json(folder / "analysis.json", analysis)
    (folder / "analysis.md").write_text(markdown(analysis, folder))
    plot(analysis, folder, min({p.budget for p in points}, key=lambda b: abs(b - 0.2)))


@dataclass(frozen=True)
class AnalysisOptions(ReportSettings):
    """This module's flags, checked when made (a bad value raises ValueError naming its flag)."""

    n: int = 20  # articles
    budgets: tuple[float, ...] = (0.04, 0.2)
    policies: tuple[str, ...] = POLICIES
    device: str = "cpu"

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> AnalysisOptions:
        """The command line (None: sys.argv); a malformed one exits as argparse does."""
        p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        ReportSettings.add_flags(p)
        p.add_argument("--n", type=int, default=cls.n, help="articles")
        p.add_argument("--budgets", type=parse_budgets, default=cls.budgets)
        p.add_argument("--policies", type=parse_policies, default=cls.policies)
        p.add_argument("--device", default=cls.device, help="cpu, cuda, ...")
        return cls(**vars(p.parse_args(argv)))

    def __post_init__(self) -> None:
        if self.n < 1 or any(not 0 < b < 1 for b in self.budgets):
            raise ValueError("--n must be at least 1 and --budgets lie in (0, 1)")
        for point in self.points():
            point.eviction()

    def points(self) -> list[Point]:
        return points_of(self.policies, self.budgets)[1:]  # the full cache is no point here


def main(argv: list[str] | None = None) -> int:
    try:
        options = AnalysisOptions.from_argv(argv)
        tokenizer, _ = models.load_tokenizer(options.model, options.arch)
    except (ValueError, FileNotFoundError) as error:
        print(f"analysis: error: {error}", file=sys.stderr)
        return 2
    folder = options.folder
    folder.mkdir(parents=True, exist_ok=True)
    model = models.load_model(options.model, options.device, options.dtype)
    write(folder, model, tokenizer, options, options.points(), options.n)
    print(f"analysis: {folder / 'analysis.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
