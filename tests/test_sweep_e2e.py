"""The budget sweep (h2o.lab.sweep, behind scripts/helm/sweep.sh) end to end on a tiny model, scored by
HELM offline, each number recomputed here by other means:

- per-article ROUGE-1/2/L: rouge-score on the results files' texts against the XSUM references,
  in article order;
- KV bytes: the mean of the results files' kv_cache fields, read as plain JSON; the full cache's
  from the prompt and continuation lengths;
- KL and greedy agreement: sum p_full * (log p_full - log p_small) along the full cache's greedy
  continuation, from logits of tests/h2o_oracle.py (a plain forward pass with its own H2O
  bookkeeping, no code shared with h2o/);
- a rerun computes nothing.

The fixture's sweep runs in two stages: `generate` in a process that cannot import HELM, ROUGE or
nltk (the GPU machine has none), then `score`; the killed sweep runs both at once and must give
the same points.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import helm_support
from h2o_oracle import PlainLlama, teacher_forced

N, FIDELITY_N = 3, 2
MAX_TOKENS = 64  # what the XSUM requests ask for


def _prompts(n: int) -> list[str]:
    return [r["prompt"] for r in helm_support.requests(n)]


def _tokenizer(n: int) -> PreTrainedTokenizerFast:
    """Word level over the words of the first n prompts; none holds '#', so no text the model
    writes can hold the stop sequence '###'."""
    words = sorted({w for p in _prompts(n) for w in p.split() if "#" not in w})
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="\u241f\u241f", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=1, pad_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[:3] = 0.0  # pad, eos, unk: let the summaries run their length
    model.generation_config.eos_token_id = None
    return model


# Importing any of these fails in the generate stage's process, as on a machine without them.
NOT_ON_THE_GPU_MACHINE = ("helm", "rouge_score", "nltk", "lab_helm.evaluate")


def _generate_without_helm(argv: list[str]) -> subprocess.CompletedProcess:
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_ON_THE_GPU_MACHINE)
    script = (f"import sys; {blocked}; from h2o.lab import sweep; code = sweep.main({argv!r}); "
              "assert not [m for m in sys.modules if m.startswith(('helm.', 'rouge_score.', 'nltk.'))]; "
              "sys.exit(code)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from h2o.lab import sweep

    root = tmp_path_factory.mktemp("sweep")
    folder = root / "tiny-words"
    tokenizer = _tokenizer(N)
    _model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    argv = ["--model", str(folder), "--n", str(N), "--fidelity_n", str(FIDELITY_N), "--budgets", "0.2",
            "--policies", "h2o,local", "--batch_size", "2", "--fidelity_batch", "1", "--device", "cpu",
            "--reports", str(root / "reports")]
    generated = _generate_without_helm([*argv, "--stage", "generate", "--analysis_n", "2"])
    assert generated.returncode == 0, generated.stderr
    [report] = [p for p in (root / "reports").iterdir() if p.is_dir()]
    assert sorted(p.name for p in (report / "generated").iterdir()) == [f"{n}.json" for n in NAMES]
    assert not any((report / "points").iterdir())  # nothing scored yet
    patch = pytest.MonkeyPatch()
    patch.setenv("output_path", str(root / "benchmark_output"))  # our_run.sh's HELM output folder
    patch.setattr(sweep, "BENCHMARK_OUTPUT", root / "benchmark_output")
    # Scoring loads no model.
    patch.setattr(sweep.models, "load_model", lambda *a, **k: pytest.fail("the score stage loaded the model"))
    try:
        assert sweep.main([*argv, "--stage", "score"]) == 0
    finally:
        patch.undo()
    return {"folder": folder, "report": report, "argv": argv, "root": root}


def _results(report, name: str) -> list[dict]:
    with open(report / "results" / f"{name}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _point(report, name: str) -> dict:
    return json.loads((report / "points" / f"{name}.json").read_text())


NAMES = ["full", "h2o-20", "local-20"]


def test_every_point_is_written_with_its_results(swept):
    report = swept["report"]
    assert sorted(p.stem for p in (report / "points").glob("*.json")) == sorted(NAMES)
    for name in NAMES:
        lines = _results(report, name)
        assert [line["request"] for line in lines] == helm_support.requests(N)
        assert all(line["result"]["choices"][0]["text"].strip() for line in lines)
    assert (report / "results.md").exists() and (report / "results.csv").exists()


@pytest.mark.parametrize("name", NAMES)
def test_per_article_rouge_is_rouge_score_on_the_texts_in_article_order(swept, name):
    from rouge_score import rouge_scorer

    point = _point(swept["report"], name)
    texts = [line["result"]["choices"][0]["text"] for line in _results(swept["report"], name)]
    references = [a["summary"] for a in helm_support.articles(N)]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(" ".join(ref.split()), text.strip()) for text, ref in zip(texts, references)]
    for key, kind in (("rouge_1", "rouge1"), ("rouge_2", "rouge2"), ("rouge_l", "rougeL")):
        expected = [s[kind].fmeasure for s in scores]
        assert point["per_article"][key] == pytest.approx(expected, abs=1e-12), key
        assert point[key] == pytest.approx(sum(expected) / N, abs=1e-12), key
    assert point["n"] == N and len(set(point["per_article"]["rouge_1"])) > 1  # articles tell apart


def test_helm_shows_every_point_in_the_reports_one_suite(swept):
    runs = swept["root"] / "benchmark_output" / "runs" / f"sweep-{swept['report'].name}"
    (table, *_) = json.loads((runs / "groups" / "summarization_xsum.json").read_text())
    rouge_2 = [h["value"] for h in table["header"]].index("ROUGE-2")
    shown = {row[0]["value"]: row[rouge_2]["value"] for row in table["rows"]}
    displays = ["Full cache", "H2O 20% (10% heavy + 10% recent)", "Local 20% (recent window only)"]
    assert shown == pytest.approx({d: _point(swept["report"], n)["rouge_2"] for d, n in zip(displays, NAMES)})


def test_kv_bytes_are_the_results_files(swept):
    report = swept["report"]
    folder = swept["folder"]
    config = json.loads((folder / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    per_token = config["num_hidden_layers"] * config["num_key_value_heads"] * 2 * head_dim * 4  # float32
    tokenizer = _tokenizer(N)
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in _prompts(N)]
    for name in NAMES:
        kv = [line["result"]["kv_cache"] for line in _results(report, name)]
        point = _point(report, name)
        assert point["kv_bytes_peak"] == pytest.approx(sum(k["kv_bytes_peak"] for k in kv) / N, rel=1e-12)
        assert point["kv_bytes_full"] == pytest.approx(sum(k["kv_bytes_full"] for k in kv) / N, rel=1e-12)
        for k, n, line in zip(kv, lengths, _results(report, name)):
            generated = len(line["result"]["choices"][0]["logprobs"]["tokens"])
            assert k["prompt_tokens"] == n
            assert k["kv_bytes_full"] == (n + generated - 1) * per_token
            if name == "full":
                assert k["kv_bytes_peak"] >= k["kv_bytes_full"]
                continue
            ratios = (0.1, 0.1) if name == "h2o-20" else (0.0, 0.2)
            h, r = int(ratios[0] * n), max(1, int(ratios[1] * n))
            assert (k["heavy_budget"], k["recent_budget"]) == (h, r)
            # The peak: one layer holds the whole prompt, the others their budget (+ 1 slot at most).
            layers, per_layer = config["num_hidden_layers"], per_token // config["num_hidden_layers"]
            assert (n + (layers - 1) * (h + r)) * per_layer <= k["kv_bytes_peak"]
            assert k["kv_bytes_peak"] <= (n + (layers - 1) * (h + r + 1)) * per_layer


def test_a_negative_fidelity_batch_is_refused_before_anything_runs(tmp_path, capsys):
    from h2o.lab import sweep

    assert sweep.main(["--fidelity_batch", "-1", "--reports", str(tmp_path)]) == 2
    assert "--fidelity_batch must be 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_fidelity_batches_hold_prompts_of_similar_lengths():
    from h2o.lab.fidelity import by_length

    prompts = [[0] * n for n in (5, 2, 9, 3, 7)]
    assert by_length(prompts, 2) == [[1, 3], [0, 4], [2]]
    assert by_length(prompts, 5) == [[1, 3, 0, 4, 2]]


@pytest.fixture(scope="module")
def fidelity_inputs(swept):
    tokenizer = _tokenizer(N)
    plain = PlainLlama(LlamaForCausalLM.from_pretrained(swept["folder"]).eval())
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in _prompts(FIDELITY_N)]
    continuations = json.loads((swept["report"] / "fidelity_reference.json").read_text())
    return plain, prompts, continuations


def test_the_fidelity_continuations_are_the_full_caches_greedy_tokens(fidelity_inputs):
    plain, prompts, continuations = fidelity_inputs
    assert len(continuations) == FIDELITY_N
    for prompt, continuation in zip(prompts, continuations):
        # Each token the argmax after the ones before it: greedy; and no end of text or stop met.
        assert len(continuation) == MAX_TOKENS
        assert teacher_forced(plain, prompt, continuation, None).argmax(-1).tolist() == continuation


@pytest.mark.parametrize("name, heavy_ratio, recent_ratio", [("h2o-20", 0.1, 0.1), ("local-20", 0.0, 0.2)])
def test_kl_and_agreement_are_computed_directly(swept, fidelity_inputs, name, heavy_ratio, recent_ratio):
    plain, prompts, continuations = fidelity_inputs
    point = _point(swept["report"], name)
    kl_means, agreements, by_step = [], [], []
    for prompt, continuation in zip(prompts, continuations):
        n = len(prompt)
        budget = (int(heavy_ratio * n), max(1, int(recent_ratio * n)))
        full = teacher_forced(plain, prompt, continuation, None).double().log_softmax(-1)
        small = teacher_forced(plain, prompt, continuation, budget).double().log_softmax(-1)
        kl = (full.exp() * (full - small)).sum(-1)
        kl_means.append(float(kl.mean()))
        agreements.append(float((small.argmax(-1) == torch.tensor(continuation)).double().mean()))
        by_step.append(kl)
    assert point["kl_per_article"] == pytest.approx(kl_means, rel=1e-3, abs=1e-5)
    assert point["agreement_per_article"] == pytest.approx(agreements, abs=1e-12)
    steps = torch.stack(by_step).mean(0).tolist()  # both continuations are MAX_TOKENS long
    assert point["kl_by_step"] == pytest.approx(steps, rel=1e-3, abs=1e-5)
    assert min(kl_means) > 1e-3 and min(agreements) < 1  # the small cache shows


def test_a_rerun_skips_every_finished_point(swept, monkeypatch, capsys):
    from h2o.lab import sweep

    def never(*args, **kwargs):
        raise AssertionError("a finished point was computed again")

    report = swept["report"]
    before = {p.name: p.read_bytes() for p in (report / "points").glob("*.json")}
    results = {p.name: p.read_bytes() for p in (report / "results").glob("*.jsonl")}
    for name in ("serve", "_helm", "Fidelities"):
        monkeypatch.setattr(sweep, name, never)
    capsys.readouterr()
    assert sweep.main(swept["argv"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines == [f"[{i}/3] {name}: done" for i, name in enumerate(["full", "h2o-20", "local-20"], start=1)]
    assert {p.name: p.read_bytes() for p in (report / "points").glob("*.json")} == before
    assert {p.name: p.read_bytes() for p in (report / "results").glob("*.jsonl")} == results


def test_the_generate_stage_analyses_the_sweeps_points(swept):
    analysis = json.loads((swept["report"] / "analysis.json").read_text())
    assert analysis["n"] == 2 and analysis["device"] == "cpu" and analysis["names"] == ["h2o-20", "local-20"]
    assert sorted(p["policy"] for p in analysis["points"]) == ["h2o", "h2o-group-max", "local"]
    assert (swept["report"] / "analysis.md").exists() and (swept["report"] / "recall_by_layer.png").exists()


def test_the_score_stage_refuses_incomplete_results_before_scoring_any_point(swept, tmp_path, capsys):
    from h2o.lab import sweep

    report = tmp_path / "reports" / swept["report"].name
    shutil.copytree(swept["report"], report)
    shutil.rmtree(report / "points")
    results = report / "results" / "local-20.jsonl"
    results.write_text("".join(results.read_text().splitlines(keepends=True)[:-1]))  # the last summary lost
    argv = [*swept["argv"][:-1], str(tmp_path / "reports"), "--stage", "score"]
    capsys.readouterr()
    assert sweep.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sweep: error: {results}: {N - 1} of {N} results; run --stage generate to finish it"]
    (report / "generated" / "h2o-20.json").unlink()
    assert sweep.main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"sweep: error: {report / 'generated' / 'h2o-20.json'}: no record of {N} generated articles; "
        "run --stage generate first"]
    assert not any((report / "points").iterdir())  # full's results were whole, yet nothing was scored


def test_a_point_killed_before_its_record_is_redone_and_never_reported_half_done(swept, tmp_path):
    import signal
    import time

    from h2o.lab import sweep

    argv = [*swept["argv"][:-1], str(tmp_path / "reports")]  # the same sweep, another report folder
    output = tmp_path / "benchmark_output"
    script = ("import sys; from pathlib import Path; from h2o.lab import sweep; "
              f"sweep.BENCHMARK_OUTPUT = Path({str(output)!r}); sys.exit(sweep.main({argv!r}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "output_path": str(output)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    report = tmp_path / "reports" / swept["report"].name
    results = report / "results" / "h2o-20.jsonl"
    deadline = time.monotonic() + 300
    # Killed once h2o-20's summaries exist, while HELM scores them: before its record is written.
    while not (results.exists() and results.read_bytes().count(b"\n") == N):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (report / "points" / "h2o-20.json").exists()
    assert "h2o" not in (report / "results.csv").read_text()  # only finished points are reported
    patch = pytest.MonkeyPatch()
    patch.setenv("output_path", str(output))
    patch.setattr(sweep, "BENCHMARK_OUTPUT", output)
    try:
        assert sweep.main(argv) == 0
    finally:
        patch.undo()
    for name in NAMES:
        resumed, whole = _point(report, name), _point(swept["report"], name)
        for key in ("per_article", "kv_bytes_peak", "kv_bytes_full", "rouge_2"):
            assert resumed[key] == whole[key], (name, key)
        if name != "full":
            assert resumed["kl_per_article"] == pytest.approx(whole["kl_per_article"], rel=1e-6)
