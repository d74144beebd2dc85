"""The lm-eval half: the h2o-lab model against lm-eval's own `hf` model (full cache), mask mode
against a restatement of the paper's lm-eval masking, drop mode against both, the paper's three
steps end to end, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env, random_prompts, save_tiny_model, tiny_llama, tiny_tokenizer
from paper_reference_lm_eval import paper_token_logprobs
from h2o.engine.reference.generation import Eviction
from h2o.engine.reference.scoring import score
from h2o.policies import make_policy
from h2o.serve.lm_eval import paper, tasks
from h2o.serve.lm_eval.model import LabLM
from h2o.serve.lm_eval.tasks import BadInput

PY = sys.executable


def _words(ids: list[int]) -> str:
    return " ".join(f"w{i - 2}" for i in ids)


def _pairs(seed: int = 5) -> list[tuple[str, str]]:
    """(context, continuation) texts of the tiny tokenizer's words, lm-eval's leading space included."""
    texts = random_prompts([24, 31, 12, 40], seed=seed)  # 10+ tokens: a recent budget of 1+ at 10%
    return [(_words(t[:-k]), " " + _words(t[-k:])) for t, k in zip(texts, (1, 5, 3, 12))]


@pytest.fixture(scope="module")
def mha_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mha")
    tiny_llama(kv_heads=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-gqa"))


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_full_cache_equals_lm_evals_hf_model(gqa_dir, batch_size):
    from lm_eval.models.huggingface import HFLM

    pairs = _pairs()
    theirs = HFLM(pretrained=str(gqa_dir), device="cpu", dtype="float32", batch_size=1).loglikelihood(_instances(pairs))
    ours = LabLM(pretrained=str(gqa_dir), batch_size=batch_size).loglikelihood(_instances(pairs))
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b


def test_mean_loglikelihood_is_the_sum_over_the_continuations_tokens(gqa_dir):
    pairs = _pairs()
    summed = LabLM(pretrained=str(gqa_dir)).loglikelihood(_instances(pairs))
    mean = LabLM(pretrained=str(gqa_dir), loglikelihood="mean").loglikelihood(_instances(pairs))
    lengths = [len(c.split()) for _, c in pairs]
    assert [m for m, _ in mean] == pytest.approx([s / n for (s, _), n in zip(summed, lengths)], abs=1e-6)


@pytest.mark.parametrize("heavy, recent", [(0.1, 0.1), (0.0, 0.2), (0.3, 0.1), (0.25, 0.05)])
def test_mask_mode_is_the_papers_lm_eval_masking_token_for_token(mha, heavy, recent):
    texts = random_prompts([40, 57, 23, 64], seed=3)
    eviction = Eviction(make_policy("h2o", heavy, recent), "mask")
    batched = score(mha, texts, [1] * len(texts), eviction)
    for text, ours in zip(texts, batched):
        paper_logprobs = paper_token_logprobs(mha, text, heavy, recent)
        assert score(mha, [text], [1], eviction)[0].logprobs == paper_logprobs
        assert ours.logprobs == pytest.approx(paper_logprobs, abs=1e-5)  # left padding: other sums
        assert ours.logprobs != pytest.approx(paper_token_logprobs(mha, text), abs=1e-3)


def test_run_lm_eval_harness_writes_the_papers_token_logprobs(mha_dir, mha, tmp_path):
    pairs = _pairs()
    requests = tmp_path / "copa-5.jsonl"
    requests.write_text("".join(json.dumps(paper.request_line(c, x)) + "\n" for c, x in pairs))
    for small, ratios in ((["--enable_small_cache"], (0.1, 0.1)), ([], (None, None))):
        out = tmp_path / "out.jsonl"
        assert paper.run_main(["--input-path", str(requests), "--output-path", str(out), "--model-name",
                               str(mha_dir), "--batch_size", "2", *small]) == 0
        for line, (c, x) in zip(out.read_text().splitlines(), pairs):
            result = json.loads(line)["result"]
            logprobs = result["choices"][0]["logprobs"]["token_logprobs"]
            ids = tiny_tokenizer().encode(c + x)
            assert logprobs[0] is None and result["continuation_tokens"] == len(x.split())
            assert logprobs[1:] == pytest.approx(paper_token_logprobs(mha, ids, *ratios), abs=1e-5)


def test_drop_mode_equals_mask_mode_when_the_budget_holds_the_text(gqa):
    texts = random_prompts([30, 45, 12], seed=7)
    starts = [20, 30, 4]
    full = score(gqa, texts, starts)
    whole = make_policy("h2o", 0.0, 1.0)
    for mode in ("mask", "drop"):
        for ours, reference in zip(score(gqa, texts, starts, Eviction(whole, mode)), full):
            assert ours.logprobs == pytest.approx(reference.logprobs, abs=1e-5)


def test_drop_mode_differs_from_the_full_cache_and_from_mask_mode_on_a_small_budget(gqa):
    texts = random_prompts([48, 60], seed=9)
    starts = [30, 40]
    small = make_policy("h2o", 0.1, 0.1)
    full = score(gqa, texts, starts)
    drop = score(gqa, texts, starts, Eviction(small, "drop"))
    mask = score(gqa, texts, starts, Eviction(small, "mask"))
    for d, m, f in zip(drop, mask, full):
        assert d.logprobs != pytest.approx(f.logprobs, abs=1e-3)
        assert d.logprobs != pytest.approx(m.logprobs, abs=1e-3)


def test_drop_mode_scores_each_continuation_token_through_the_evicting_cache(gqa):
    """Token by token in a batch of texts of unequal continuations = one text at a time."""
    texts = random_prompts([30, 45, 22], seed=11)
    starts = [25, 20, 21]
    eviction = Eviction(make_policy("h2o", 0.2, 0.1), "drop")
    batched = score(gqa, texts, starts, eviction)
    for text, start, ours in zip(texts, starts, batched):
        assert ours.logprobs == pytest.approx(score(gqa, [text], [start], eviction)[0].logprobs, abs=1e-5)


def test_the_lab_tasks_stage_lm_evals_configs_over_the_vendored_files(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = tasks.stage(tasks.known(), tmp_path)
    assert tasks.known() == ["copa", "mathqa", "openbookqa", "piqa", "rte", "winogrande"]
    for name in tasks.known():
        config = load_yaml(folder / f"{name}.yaml", resolve_func=False)
        assert config["task"] == name and config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
        for path in config["dataset_kwargs"]["data_files"].values():
            assert path.startswith(str(ROOT / "data" / "lm_eval"))


def test_the_papers_three_steps_and_the_lab_command_agree(gqa_dir, tmp_path):
    requests, results = tmp_path / "copa-5.jsonl", tmp_path / "copa-5-llama-h2o.jsonl"
    assert paper.generate_main(["--output-file", str(requests), "--task-name", "copa", "--num-fewshot", "2",
                                "--limit", "3"]) == 0
    assert len(requests.read_text().splitlines()) == 6
    assert paper.run_main(["--input-path", str(requests), "--output-path", str(results), "--model-name",
                           str(gqa_dir), "--enable_small_cache", "--kv_mode", "drop"]) == 0
    steps = paper.evaluate_results(str(results), "copa", 2, "sum", limit=3)["results"]["copa"]["acc,none"]
    direct = tmp_path / "direct"
    run = subprocess.run([PY, "-m", "h2o.serve.lm_eval", "--model", "h2o-lab", "--model_args",
                          f"pretrained={gqa_dir},policy=h2o,kv_mode=drop", "--tasks", "copa", "--num_fewshot", "2",
                          "--limit", "3", "--output_path", str(direct)], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.loads(next(direct.rglob("results_*.json")).read_text())
    assert saved["results"]["copa"]["acc,none"] == steps


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, *args], cwd=ROOT, env=child_env(), capture_output=True, text=True)


def _one_line_error(run: subprocess.CompletedProcess, prog: str, *words: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-2000:]
    assert lines[-1].startswith(f"{prog}: error: ") and all(w in lines[-1] for w in words), lines[-1]
    assert not [line for line in lines if line.startswith("Traceback")]


def test_an_unknown_task_is_one_line_naming_it():
    run = _command("-m", "h2o.serve.lm_eval", "--model", "h2o-lab", "--tasks", "copa,hellaswag")
    _one_line_error(run, "h2o.serve.lm_eval", "--tasks", "'hellaswag'", "copa, mathqa")
    assert len(run.stderr.strip().splitlines()) == 1


def test_a_bad_model_arg_is_one_line_naming_it(gqa_dir):
    run = _command("-m", "h2o.serve.lm_eval", "--model", "h2o-lab", "--model_args",
                   f"pretrained={gqa_dir},policy=nope", "--tasks", "copa", "--limit", "1")
    _one_line_error(run, "h2o.serve.lm_eval", "policy", "'nope'")


def test_a_missing_data_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(BadInput, match=r"copa_train\.jsonl: missing \(copa's train split"):
        tasks.stage(["copa"], tmp_path / "staged", data=tmp_path)
    assert not (tmp_path / "staged").exists()


def test_a_malformed_request_line_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(paper.request_line("w1 w2", " w3"))
    for second, words in (("{not json", ("not valid JSON",)), (json.dumps({"prompt": "w1"}), ("'context'",)),
                          (json.dumps({**json.loads(good), "prompt": "x"}), ("'prompt' is not",))):
        bad.write_text(good + "\n" + second + "\n")
        run = _command("run_lm_eval_harness.py", "--input-path", str(bad), "--output-path", str(tmp_path / "o.jsonl"))
        _one_line_error(run, "run_lm_eval_harness.py", f"{bad}:2:", *words)
        assert not (tmp_path / "o.jsonl").exists()


def test_a_malformed_result_line_or_a_missing_results_file_is_one_line(tmp_path):
    bad = tmp_path / "results.jsonl"
    bad.write_text(json.dumps({"request": {}, "result": {"choices": []}}) + "\n")
    run = _command("evaluate_task_result.py", "--result-file", str(bad), "--task-name", "copa")
    _one_line_error(run, "evaluate_task_result.py", f"{bad}:1:", "not a result line")
    run = _command("evaluate_task_result.py", "--result-file", str(tmp_path / "none.jsonl"), "--task-name", "nope")
    _one_line_error(run, "evaluate_task_result.py", "none.jsonl")


def test_a_bad_task_name_in_the_papers_steps_is_one_line(tmp_path):
    run = _command("generate_task_data.py", "--output-file", str(tmp_path / "x.jsonl"), "--task-name", "nope")
    _one_line_error(run, "generate_task_data.py", "--task-name", "'nope'")
    assert not (tmp_path / "x.jsonl").exists()


def test_the_vendored_task_files_are_the_documented_ones():
    import hashlib

    readme = (ROOT / "data" / "README.md").read_text()
    files = sorted((ROOT / "data" / "lm_eval").rglob("*.jsonl"))
    assert len(files) == 11
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme, path


def test_a_policy_without_a_whole_text_mask_is_refused_in_mask_mode_only():
    from h2o.serve.lm_eval.model import LabModelArgs

    with pytest.raises(BadInput, match="'adakv' selects tokens its own way"):
        LabModelArgs.parse({"policy": "adakv"}).eviction()
    assert LabModelArgs.parse({"policy": "adakv", "kv_mode": "drop"}).eviction().mode == "drop"
    with pytest.raises(BadInput, match="unknown argument 'heavy'"):
        LabModelArgs.parse({"heavy": 0.1})


def test_the_papers_scripts_refuse_an_unknown_task_in_one_line():
    run = subprocess.run(["bash", "scripts/lm_eval/h2o.sh", "hellaswag"], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True)
    _one_line_error(run, "generate_task_data.py", "--task-name", "'hellaswag'")
    assert not (ROOT / "hellaswag-5.jsonl").exists()
