"""our_run.sh end to end, with the network cut: HELM's metrics are rouge-score's on the same texts.

The first test evaluates made-up results (the articles' first words as summaries); the second
generates with run_helm.py (embedded SmolLM2) for full, h2o and local first; the last two score
made-up results of the long-input tasks, MultiNews (ROUGE) and the needle (recall). All cut the
network with `unshare -n` (or `unshare -rn`) and skip where that is impossible.
LAB_HELM_E2E_N sets how many requests the generation test makes (default 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helm_support
from lab_helm.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]

METRICS = ("rouge_1", "rouge_2", "rouge_l", "summarization_coverage", "summarization_density",
           "summarization_compression")

needs_net_cut = pytest.mark.skipif(helm_support.net_cut() is None, reason="cannot cut the network (unshare -n)")


def check_suite(output_path: Path, suite: str, results_file: Path, n: int) -> None:
    """stats.json has every XSUM metric; ROUGE-1/2/L equal rouge-score's on the same texts."""
    predictions = [json.loads(line)["result"]["choices"][0]["text"]
                   for line in results_file.read_text().splitlines()][:n]
    references = [a["summary"] for a in helm_support.articles(n)]
    for metric in METRICS:
        helm_support.stat_mean(output_path, suite, metric)
    helm_support.assert_rouge_is_rouge_scores(output_path, suite, predictions, references)
    assert (output_path / "runs" / suite / "runs.json").exists()  # helm-summarize ran


@needs_net_cut
def test_our_run_on_made_up_results(tmp_path):
    n = 4
    rows = [(r, helm_support.fake_result(helm_support.lead(a["document"]), seconds=2.0))
            for r, a in zip(helm_support.requests(n), helm_support.articles(n))]
    results_file = helm_support.write_results(tmp_path / "xsum-llama-lead.jsonl", rows)
    out = tmp_path / "benchmark_output"
    done = helm_support.our_run(env={"jsonl": str(results_file)}, output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 requests evaluated" in done.stdout
    check_suite(out, "xsum-llama-lead", results_file, n)
    assert 0 < helm_support.stat_mean(out, "xsum-llama-lead", "rouge_2") < 1

    table = subprocess.run([str(ROOT / "helm" / "lab_table.sh"), "--output-path", str(out), "xsum-llama-lead=lead"],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    header, _, row = table.stdout.splitlines()
    assert header.split("|")[1].strip() == "mode" and row.split("|")[1].strip() == "lead"
    assert f"{helm_support.stat_mean(out, 'xsum-llama-lead', 'rouge_2'):.4f}" in row


MODES = {
    "full": [],
    "h2o": ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"],
    "local": ["--enable_small_cache", "--heavy_ratio", "0", "--recent_ratio", "0.2"],
}


@needs_net_cut
@pytest.mark.skipif(not (ROOT / "run_helm.py").exists(), reason="run_helm.py not there yet")
def test_generate_then_evaluate_full_h2o_local(tmp_path):
    n = int(os.environ.get("LAB_HELM_E2E_N", "2"))
    out = tmp_path / "benchmark_output"
    suites = []
    for mode, flags in MODES.items():
        results_file = tmp_path / f"xsum-llama-{mode}.jsonl"
        generate = subprocess.run(
            [*helm_support.net_cut(), sys.executable, str(ROOT / "run_helm.py"), "--input_path", str(helm_support.REQUESTS),
             "--output_path", str(results_file), "--sample_num", str(n), *flags],
            cwd=ROOT, capture_output=True, text=True, timeout=1800,
        )
        assert generate.returncode == 0, generate.stderr[-3000:]
        done = helm_support.our_run(str(results_file), output_path=out)
        assert done.returncode == 0, done.stdout + done.stderr
        check_suite(out, f"xsum-llama-{mode}", results_file, n)
        suites.append(f"xsum-llama-{mode}")

    table = subprocess.run([sys.executable, "-m", "lab_helm.table", "--output-path", str(out), *suites],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    modes = [line.split("|")[1].strip() for line in table.stdout.splitlines()[2:]]
    assert modes == ["full", "h2o", "local"], table.stdout


@needs_net_cut
def test_our_run_scores_multi_news_by_rouge(tmp_path):
    n = 2
    examples = get_task("multi_news").load()[:n]
    predictions = [helm_support.lead(e["context"], 60) for e in examples]
    results_file = helm_support.write_results(
        tmp_path / "multi_news-llama-lead.jsonl",
        [(r, helm_support.fake_result(p)) for r, p in zip(helm_support.requests(n, "multi_news"), predictions)])
    out = tmp_path / "benchmark_output"
    done = helm_support.our_run(str(results_file), "multi_news", output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{n} requests evaluated: rouge_1=" in done.stdout
    helm_support.assert_rouge_is_rouge_scores(out, "multi_news-llama-lead", predictions,
                                              [e["summary"] for e in examples])
    assert (out / "runs" / "multi_news-llama-lead" / "runs.json").exists()


@needs_net_cut
def test_our_run_scores_the_needle_by_recall(tmp_path):
    examples = get_task("needle").load()[:3]
    answers = [f" The special magic number is {examples[0]['value']}.", f" It is {examples[0]['value']}.",
               f" {examples[2]['value']}"]  # the second names another example's number
    results_file = helm_support.write_results(
        tmp_path / "needle-llama-made-up.jsonl",
        [(r, helm_support.fake_result(a)) for r, a in zip(helm_support.requests(3, "needle"), answers)])
    out = tmp_path / "benchmark_output"
    done = helm_support.our_run(str(results_file), "needle", output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert helm_support.stat_mean(out, "needle-llama-made-up", "ruler_string_match_part") == pytest.approx(2 / 3)
    table = subprocess.run([str(ROOT / "helm" / "lab_table.sh"), "--output-path", str(out), "needle-llama-made-up"],
                           capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    header, _, row = table.stdout.splitlines()
    assert "ruler_string_match_part" in header and "0.6667" in row
