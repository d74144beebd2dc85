"""HELM's CNN/DailyMail beside XSUM: the vendored articles, the requests HELM makes for them, the
scenario pickle, and the scripts that take `cnn_dm` as a task."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess

import pytest

import helm_support
from lab_helm import evaluate, scenario_data
from lab_helm.tasks import get_task

from conftest import ROOT

ARTICLES = ROOT / "data" / "cnn_dm" / "cnn_dm_test_1000.jsonl"
ARTICLES_SHA256 = "340e7705a8f71b06be4e0bd1a7ee60cdeb23a6c2da41b62bed1766029261b888"
REQUESTS_SHA256 = "0e8814a15eb9ef39736409712b4fefbab2a8dff80cc6f963864a33e6fd929155"


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_vendored_articles_and_requests_are_the_documented_files():
    readme = (ROOT / "data" / "README.md").read_text()
    for path, digest in ((ARTICLES, ARTICLES_SHA256), (ROOT / "data" / "cnn_dm.jsonl", REQUESTS_SHA256)):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest and digest in readme
    rows = _lines(ARTICLES)
    assert [r["id"] for r in rows] == [f"cnn_dm-test-{i:04d}" for i in range(1000)]
    assert all(r["article"].strip() and r["highlights"].strip() for r in rows)


def test_requests_are_helms_zero_shot_prompts_of_the_articles():
    for line, article in zip(_lines(ROOT / "data" / "cnn_dm.jsonl"), _lines(ARTICLES), strict=True):
        request = line["request"]
        document = " ".join(article["article"].replace("\n", " ").split()[:512])
        assert request["prompt"] == f"###\nArticle: {document}\n\nSummarize the above article in 3 sentences."
        assert {k: v for k, v in request.items() if k != "prompt"} == {
            "temperature": 0.3, "n": 1, "max_tokens": 128, "stop": ["###"], "top_p": 1,
            "top_k_per_token": 1, "echo_prompt": False,
        }


def test_scenario_pickle_and_eval_cache_are_cnndms(tmp_path):
    task = get_task("cnn_dm")
    path = scenario_data.write(task, tmp_path, 3)
    assert path == tmp_path / "scenarios" / "summarization" / "data" / "cnndm.pk"
    data = pickle.loads(path.read_bytes())
    assert data["train"] == data["validation"] == [] and [r["id"] for r in data["test"]] == [
        f"cnn_dm-test-{i:04d}" for i in range(3)]
    evaluate.write_eval_cache(tmp_path, get_task("xsum"))
    evaluate.write_eval_cache(tmp_path, task)
    cache = tmp_path / "eval_cache"
    assert (cache / "cnndm_0shots.csv").is_file() and (cache / "xsum_5shots.csv").is_file()
    assert set(pickle.loads((cache / "qafacteval.pk").read_bytes())) == {"summarization_xsum", "summarization_cnndm"}


def test_an_unknown_task_of_the_helm_scripts_names_cnn_dm_among_the_known_ones():
    run = subprocess.run(["bash", "scripts/helm/h2o.sh", "cnn_dn"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "cnn_dn" in run.stderr
    run = subprocess.run(["bash", "helm/our_run.sh", "x.jsonl", "cnn_dn"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "cnn_dm" in run.stderr.strip().splitlines()[-1]


METRICS = ("rouge_1", "rouge_2", "rouge_l", "summarization_coverage", "summarization_density",
           "summarization_compression")


@pytest.mark.skipif(helm_support.net_cut() is None, reason="cannot cut the network (unshare -n)")
def test_our_run_scores_cnn_dm_as_helm_does_with_the_network_cut(tmp_path):
    n = 3
    articles = get_task("cnn_dm").load()[:n]
    predictions = [helm_support.lead(a["article"], 40) for a in articles]
    results_file = helm_support.write_results(
        tmp_path / "cnn_dm-llama-lead.jsonl",
        [(r, helm_support.fake_result(p)) for r, p in zip(helm_support.requests(n, "cnn_dm"), predictions)])
    out = tmp_path / "benchmark_output"
    done = helm_support.our_run(str(results_file), "cnn_dm", output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    for metric in METRICS:
        helm_support.stat_mean(out, "cnn_dm-llama-lead", metric)
    # HELM's scenario cleans the references as the articles: newlines to spaces, whitespace collapsed.
    references = [" ".join(a["highlights"].replace("\n", " ").split()) for a in articles]
    helm_support.assert_rouge_is_rouge_scores(out, "cnn_dm-llama-lead", predictions, references)
