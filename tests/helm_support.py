"""Support for the tests that exercise HELM's side: fake results, the network cut, running our_run.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from lab_helm.paths import DATA, HELM_DIR
from lab_helm.results import read_requests
from lab_helm.tasks import get_task

REQUESTS = DATA / "xsum.jsonl"
ARTICLES = DATA / "xsum" / "xsum_test_500.jsonl"


def requests(n: int | None = None, task: str = "xsum") -> list[dict]:
    """The first n requests of the task's data/<task>.jsonl (all when None), as the evaluation reads them."""
    rows = read_requests(get_task(task).requests)
    return rows[:n] if n else rows


def articles(n: int | None = None) -> list[dict]:
    with open(ARTICLES, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:n] if n else rows


def fake_result(text: str, seconds: float = 1.0, policy: str = "full", finished_at: float | None = None) -> dict:
    """A result of run_helm.py's shape for `text`: `seconds` its latency, ending at `finished_at`
    (None: a result that does not say when it ended)."""
    words = text.split(" ")
    tokens = [(" " if i else "") + w for i, w in enumerate(words)]
    kv = {"policy": policy, "mode": "full" if policy == "full" else "drop", "prompt_tokens": 400,
          "kv_bytes_peak": 4096 * 400, "kv_bytes_full": 4096 * 400}
    if policy != "full":
        kv.update(heavy_ratio=0.1, recent_ratio=0.1, heavy_budget=40, recent_budget=40, kv_bytes_peak=4096 * 80)
    result = {
        "choices": [{
            "text": text,
            "logprobs": {"tokens": tokens, "token_logprobs": [-1.0] * len(tokens),
                         "top_logprobs": [{t: -1.0} for t in tokens],
                         "text_offset": [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]},
            "finish_reason": "stop",
        }],
        "request_time": seconds,
        "batch_size": 1,
        "kv_cache": kv,
        "chat_template": False,
    }
    if finished_at is not None:
        result["finished_at"] = finished_at
    return result


def lead(document: str, words: int = 20) -> str:
    """A prediction that is neither empty nor the reference: the article's first words."""
    return " " + " ".join(document.split()[:words])


def write_results(path: Path, rows: list[tuple[dict, dict]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for request, result in rows:
            f.write(json.dumps({"request": request, "result": result}, ensure_ascii=False) + "\n")
    return path


@lru_cache(maxsize=1)
def net_cut() -> tuple[str, ...] | None:
    """A command prefix that runs a command with no network (a fresh network namespace), or None."""
    if not shutil.which("unshare"):
        return None
    for prefix in (("unshare", "-n"), ("unshare", "-rn")):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def our_run_command(*args: str, output_path: Path, cut: bool = True,
                    env: dict | None = None) -> tuple[list[str], dict]:
    """The command line and environment of our_run.sh with these knobs (network cut by default)."""
    prefix = list(net_cut() or ()) if cut else []
    knobs = ("jsonl", "task", "model_arch", "output_name", "max_eval_instances", "output_path")
    environment = {k: v for k, v in os.environ.items() if k not in knobs}
    environment.update({"output_path": str(output_path), **(env or {})})
    return [*prefix, str(HELM_DIR / "our_run.sh"), *args], environment


def our_run(*args: str, output_path: Path, cut: bool = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    command, environment = our_run_command(*args, output_path=output_path, cut=cut, env=env)
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


def run_dir(output_path: Path, suite: str) -> Path:
    runs = [p for p in (output_path / "runs" / suite).iterdir() if (p / "stats.json").exists()]
    assert len(runs) == 1, runs
    return runs[0]


def stat_mean(output_path: Path, suite: str, name: str) -> float:
    for stat in json.loads((run_dir(output_path, suite) / "stats.json").read_text()):
        n = stat["name"]
        if n["name"] == name and n.get("split") == "test" and "perturbation" not in n:
            return stat["mean"]
    raise KeyError(name)


def assert_rouge_is_rouge_scores(output_path: Path, suite: str, predictions: list[str], references: list[str]) -> None:
    """HELM's ROUGE-1/2/L in `suite`'s stats equal rouge-score's on the same texts."""
    import pytest

    for metric, rouge_type in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        expected = expected_rouge(predictions, references, rouge_type)
        assert stat_mean(output_path, suite, metric) == pytest.approx(expected, abs=1e-12), metric


def expected_rouge(predictions: list[str], references: list[str], rouge_type: str) -> float:
    """ROUGE as HELM's SummarizationMetric computes it, straight from rouge-score: F-measure with
    Porter stemming, prediction stripped, reference whitespace-normalised as the scenario does,
    averaged over instances."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=True)
    scores = [scorer.score(" ".join(ref.split()), pred.strip())[rouge_type].fmeasure
              for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores)
