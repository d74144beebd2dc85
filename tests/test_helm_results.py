"""Bad results files fail with one clear line, before HELM runs; the client never makes up answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helm.common.request import Request

import helm_support
from lab_helm import evaluate, results
from lab_helm.client import MissingResultError, ResultsFileClient
from lab_helm.requests import request_dict


@pytest.fixture(scope="module")
def good():
    """(request, result) pairs for the first 5 requests: the lead of each article as summary."""
    return [(r, helm_support.fake_result(helm_support.lead(a["document"]), finished_at=i + 1.0))  # one at a time
            for i, (r, a) in enumerate(zip(helm_support.requests(5), helm_support.articles(5)))]


def error_lines(done) -> list[str]:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith("our_run.sh: error: ") for line in lines), lines
    return lines


# Through our_run.sh: each stops before helm-run, with exit status 2.

def test_missing_file(tmp_path):
    (line,) = error_lines(helm_support.our_run(str(tmp_path / "nope.jsonl"), output_path=tmp_path / "out", cut=False))
    assert "nope.jsonl does not exist" in line


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (line,) = error_lines(helm_support.our_run(str(empty), output_path=tmp_path / "out", cut=False))
    assert "empty.jsonl is empty" in line
    empty.write_text("\n\n")
    (line,) = error_lines(helm_support.our_run(str(empty), output_path=tmp_path / "out", cut=False))
    assert "empty.jsonl is empty" in line


def test_result_for_a_prompt_helm_did_not_ask_for(tmp_path, good):
    other = (helm_support.requests(10)[9], helm_support.fake_result(" x"))
    path = helm_support.write_results(tmp_path / "extra.jsonl", good[:3] + [other])
    # HELM asks for the first 3 requests; line 4 answers request 10.
    (line,) = error_lines(helm_support.our_run(str(path), "xsum", "llama", "extra", "3",
                                          output_path=tmp_path / "out", cut=False))
    assert "1 result(s) for prompts HELM does not ask for" in line
    assert "first: line 4" in line and "the first 3 requests" in line


def test_results_helm_asks_for_are_missing(tmp_path, good):
    path = helm_support.write_results(tmp_path / "short.jsonl", good[:2])
    (line,) = error_lines(helm_support.our_run(str(path), "xsum", "llama", "short", "5",
                                          output_path=tmp_path / "out", cut=False))
    assert "lacks 3 of the 5 results HELM asks for" in line
    assert "first: request 3 (xsum-test-0002)" in line
    assert not (tmp_path / "out" / "runs" / "short").exists()


# Straight through the prepare step (the same code, without the shell): the other checks.

def prepare(tmp_path, path, *extra) -> int:
    return evaluate.main(["prepare", "--jsonl", str(path), "--suite", "s",
                          "--output-path", str(tmp_path / "out"), *extra])


@pytest.mark.parametrize("case, message", [
    ("gap", "lacks 1 of the 3 results"),
    ("duplicate", ":3: a second result for the request of line 2"),
    ("settings", "temperature=0.7 where HELM asks 0.3"),
    ("not json", ":2: not valid JSON"),
    ("no result", ":1: no 'result' object"),
    ("no text", ":1: every choice needs a 'text' string"),
])
def test_bad_lines(tmp_path, good, capsys, case, message):
    rows = [json.dumps({"request": r, "result": s}) for r, s in good]
    lines = {
        "gap": [rows[0], rows[1], rows[3]],
        "duplicate": [rows[0], rows[1], rows[1]],
        "settings": [rows[0], rows[1].replace('"temperature": 0.3', '"temperature": 0.7')],
        "not json": [rows[0], rows[1][:40]],
        "no result": [json.dumps({"request": good[0][0]})],
        "no text": [json.dumps({"request": good[0][0], "result": {"choices": [{"txt": "a"}]}})],
    }[case]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert prepare(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_unknown_task_and_model_arch(tmp_path, good, capsys):
    path = helm_support.write_results(tmp_path / "r.jsonl", good[:1])
    assert prepare(tmp_path, path, "--task", "cnn") == 2
    assert "unknown task 'cnn'" in capsys.readouterr().err
    assert prepare(tmp_path, path, "--model-arch", "gpt9") == 2
    assert "unknown model_arch 'gpt9'" in capsys.readouterr().err
    assert prepare(tmp_path, path, "--n", "501") == 2
    assert "between 1 and 500" in capsys.readouterr().err


def test_prepare_stages_the_run(tmp_path, good, capsys):
    path = helm_support.write_results(tmp_path / "r.jsonl", good)
    assert prepare(tmp_path, path) == 0
    n, env, entry = capsys.readouterr().out.split()
    assert n == "5" and env == str(tmp_path / "out" / "prod_env" / "s")
    assert entry == "summarization_xsum:temperature=0.3,device=cpu,max_train_instances=0,model=h2o-lab/llama"
    deployment = yaml.safe_load((Path(env) / "model_deployments.yaml").read_text())["model_deployments"]
    assert [d["client_spec"]["args"]["results_path"] for d in deployment] == [str(path.resolve())]
    suite = tmp_path / "out" / "runs" / "s"
    assert sorted(p.name for p in (suite / "eval_cache").iterdir()) == ["qafacteval.pk", "xsum_0shots.csv", "xsum_5shots.csv"]
    summary = json.loads((suite / "generation-llama.json").read_text())
    assert summary["requests"] == 5 and summary["kv_cache"]["policy"] == "full"
    assert summary["tokens_per_second"] == pytest.approx(summary["generated_tokens"] / 5.0)


@pytest.mark.parametrize("timing, seconds", [
    # (latency, finished_at) per request.
    ([(2.0, 2.0), (2.0, 2.0), (3.0, 5.0), (3.0, 5.0)], 5.0),  # lock step: two batches of two, one after the other
    ([(6.0, 6.0), (1.0, 1.0), (1.0, 2.0)], 6.0),  # continuous batching, 2 rows: one long request beside two short
    ([(1.0, 1.0), (2.0, 102.0)], 3.0),  # resumed 99 s after the first run ended
    ([(1.0, 1.0), (1.0, None)], None),  # a result that does not say when it ended
])
def test_generation_seconds_are_the_time_any_request_was_in_flight(tmp_path, timing, seconds):
    rows = [(r, helm_support.fake_result(helm_support.lead(a["document"]), latency, finished_at=end))
            for (latency, end), r, a in zip(timing, helm_support.requests(len(timing)), helm_support.articles(len(timing)))]
    path = helm_support.write_results(tmp_path / "r.jsonl", rows)
    summary = evaluate.generation_summary(results.load(path), path)
    assert summary["generation_seconds"] == seconds
    if seconds is None:
        assert summary["tokens_per_second"] is None
    else:
        assert summary["tokens_per_second"] == pytest.approx(summary["generated_tokens"] / seconds)


def test_busy_seconds_is_the_length_of_the_spans_union():
    assert evaluate.busy_seconds([]) == 0.0
    assert evaluate.busy_seconds([(0.0, 4.0), (1.0, 2.0), (3.0, 6.0), (10.0, 11.0)]) == 7.0


# The client HELM calls.

def helm_request(fields: dict) -> Request:
    return Request(model_deployment="h2o-lab/llama", model="h2o-lab/llama", prompt=fields["prompt"],
                   temperature=fields["temperature"], num_completions=fields["n"], max_tokens=fields["max_tokens"],
                   stop_sequences=fields["stop"], top_p=fields["top_p"], top_k_per_token=fields["top_k_per_token"])


def test_client_serves_results_with_logprobs(tmp_path, good):
    path = helm_support.write_results(tmp_path / "r.jsonl", good[:2])
    client = ResultsFileClient(str(path))
    request = helm_request(good[1][0])
    assert request_dict(request) == good[1][0]
    result = client.make_request(request)
    choice = good[1][1]["choices"][0]
    (completion,) = result.completions
    assert result.success and completion.text == choice["text"]
    assert [t.text for t in completion.tokens] == choice["logprobs"]["tokens"]
    assert completion.logprob == pytest.approx(sum(choice["logprobs"]["token_logprobs"]))
    assert completion.finish_reason == {"reason": "stop"}
    assert result.request_time == 1.0 and result.batch_size == 1


def test_client_fails_loudly_on_a_missing_result(tmp_path, good):
    path = helm_support.write_results(tmp_path / "r.jsonl", good[:2])
    client = ResultsFileClient(str(path))
    with pytest.raises(MissingResultError, match="has no result for HELM's request"):
        client.make_request(helm_request(good[2][0]))
    changed = dict(good[0][0], max_tokens=32)
    with pytest.raises(MissingResultError, match="max_tokens=64 where HELM asks 32"):
        client.make_request(helm_request(changed))
