"""The vendored XSUM data, the committed requests, the scenario pickle and the HELM config."""

from __future__ import annotations

import hashlib
import pickle
import subprocess
import sys
from pathlib import Path

import yaml

import helm_support
from lab_helm import scenario_data
from lab_helm.paths import PROD_ENV
from lab_helm.tasks import get_task, model_archs

ROOT = Path(__file__).resolve().parents[1]

ARTICLES_SHA256 = "f29bf87cc4ef36a72763d6ad2e60a74ceb1edd2de0d5bcae25968ff111dcce20"


def test_vendored_articles_are_the_documented_file():
    data = helm_support.ARTICLES.read_bytes()
    assert hashlib.sha256(data).hexdigest() == ARTICLES_SHA256
    assert ARTICLES_SHA256 in (ROOT / "data" / "README.md").read_text()
    rows = helm_support.articles()
    assert [r["id"] for r in rows] == [f"xsum-test-{i:04d}" for i in range(500)]
    assert all(r["document"].strip() and r["summary"].strip() for r in rows)


def test_requests_are_helm_zero_shot_prompts_of_the_articles():
    requests, articles = helm_support.requests(), helm_support.articles()
    assert len(requests) == len(articles) == 500
    for request, article in zip(requests, articles):
        # HELM's scenario: newlines to spaces, whitespace collapsed, first 512 words; no
        # truncation to fit the model, and the output prefix's trailing newline stripped.
        document = " ".join(article["document"].replace("\n", " ").split()[:512])
        assert request["prompt"] == f"###\nArticle: {document}\n\nSummarize the above article in 1 sentence."
        assert {k: v for k, v in request.items() if k != "prompt"} == {
            "temperature": 0.3, "n": 1, "max_tokens": 64, "stop": ["###"], "top_p": 1,
            "top_k_per_token": 1, "echo_prompt": False,
        }


def test_scenario_pickle_holds_the_first_n_articles_as_test(tmp_path):
    task = get_task("xsum")
    path = scenario_data.write(task, tmp_path, 7)
    assert path == tmp_path / "scenarios" / "summarization" / "data" / "xsum.pk"
    with open(path, "rb") as f:
        data = pickle.load(f)
    assert data["train"] == [] and data["validation"] == []
    assert [(d["document"], d["summary"]) for d in data["test"]] == [
        (a["document"], a["summary"]) for a in helm_support.articles(7)
    ]
    assert len(scenario_data.build(task)["test"]) == 500


def test_deployments_share_one_offline_tokenizer_and_length():
    deployments = yaml.safe_load((PROD_ENV / "model_deployments.yaml").read_text())["model_deployments"]
    models = {m["name"] for m in yaml.safe_load((PROD_ENV / "model_metadata.yaml").read_text())["models"]}
    tokenizers = {t["name"] for t in yaml.safe_load((PROD_ENV / "tokenizer_configs.yaml").read_text())["tokenizer_configs"]}
    assert {(d["tokenizer_name"], d["max_sequence_length"]) for d in deployments} == {("h2o-lab/smollm2-gguf", 8192)}
    assert {d["model_name"] for d in deployments} <= models
    assert {d["tokenizer_name"] for d in deployments} <= tokenizers
    assert {d["client_spec"]["class_name"] for d in deployments} == {"lab_helm.client.ResultsFileClient"}
    assert "llama" in model_archs()


def test_offline_setup_is_in_place():
    # helm/setup_offline.sh (run after pip install) must have put the spaCy stand-in and the
    # punkt_tab placeholder into this environment; otherwise HELM downloads them.
    done = subprocess.run([sys.executable, "-m", "lab_helm.offline", "--check"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
