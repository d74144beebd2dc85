"""The fast engine against the reference engine: same texts and logprobs for the same requests,
whatever the batch, its composition, continuous batching or a resume."""

import json

import pytest
import torch

from conftest import ROOT, random_prompts, tiny_llama
from h2o.serve import cli as run
from h2o.serve.prompts import encode
from h2o.engine.fast.engine import FastEngine
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy

POLICIES = {"full": None, "h2o": (0.1, 0.1), "local": (0.0, 0.2)}


def _policy(name):
    return None if POLICIES[name] is None else make_policy("h2o", *POLICIES[name])


def _reference(model, tokenizer, prompts, sampling, policy, batch):
    eviction = None if policy is None else Eviction(policy, "drop")
    out = []
    for start in range(0, len(prompts), batch):
        out += generate(model, tokenizer, prompts[start:start + batch], sampling[start:start + batch], eviction)
    return out


def _assert_same(fast, reference, tolerance=1e-3):
    for a, b in zip(fast, reference, strict=True):
        assert a.text == b.text
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason
        assert max((abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)), default=0) < tolerance
        assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]


# Mixed max_tokens, temperatures and top_p: rows end at different steps and are refilled.
def _sampling(n, stop=()):
    return [
        Sampling(max_new_tokens=(16, 9, 20, 5, 12, 16, 3)[i % 7], temperature=(0.0, 0.7, 0.3, 0.0, 1.0, 0.3, 0.5)[i % 7],
                 top_p=(1.0, 0.9)[i % 2], stop=stop, top_logprobs=2, seed=100 + i)
        for i in range(n)
    ]


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_continuous_batching_gives_each_request_its_result_alone(request, tokenizer, model_name, name):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts([64, 101, 40, 77, 30, 90, 55], seed=5)  # not sorted by length
    sampling = _sampling(len(prompts))
    alone = _reference(model, tokenizer, prompts, sampling, _policy(name), batch=1)
    for rows in (1, 3, 7):
        _assert_same(FastEngine(model, tokenizer, _policy(name), rows, steps_per_check=4).run(prompts, sampling), alone)


def test_end_of_text_and_stop_sequences_end_a_row_early(gqa, tokenizer):
    prompts = random_prompts([64, 101, 40, 77], seed=5)
    greedy = [Sampling(max_new_tokens=12)] * 4
    plain = FastEngine(gqa, tokenizer, _policy("h2o"), 2).run(prompts, greedy)
    # A word the first request says at its 4th token becomes a stop sequence for all; the 6th
    # token of the second becomes the end of text.
    stop = plain[0].text.split()[3]
    eos = plain[1].token_ids[5]
    model = tiny_llama(kv_heads=2)
    model.generation_config.eos_token_id = eos
    sampling = [Sampling(max_new_tokens=12, stop=(stop,))] * 4
    expected = _reference(model, tokenizer, prompts, sampling, _policy("h2o"), batch=1)
    assert expected[0].finish_reason == "stop" and stop not in expected[0].text
    assert expected[1].finish_reason in ("endoftext", "stop") and len(expected[1].token_ids) <= 5
    _assert_same(FastEngine(model, tokenizer, _policy("h2o"), 2, steps_per_check=8).run(prompts, sampling), expected)


def test_rows_of_mixed_lengths_share_the_block_table(gqa, tokenizer):
    prompts = random_prompts([20, 200, 30, 150], seed=2)
    sampling = [Sampling(max_new_tokens=6)] * 4
    engine = FastEngine(gqa, tokenizer, None, 2, steps_per_check=2)
    done = engine.run(prompts, sampling)
    # The table is as wide as the longest request's layer: the full cache's prompt + max_tokens + 1.
    assert engine.cache.slots == 7 * 32 >= 200 + 6 + 1
    _assert_same(done, _reference(gqa, tokenizer, prompts, sampling, None, batch=1))


def test_kv_report_names_the_engine_and_counts_the_slots(gqa, tokenizer):
    prompts = random_prompts([100], seed=2)
    [done] = FastEngine(gqa, tokenizer, _policy("h2o"), 1).run(prompts, [Sampling(max_new_tokens=4)])
    config = gqa.config
    per_slot = 2 * (config.hidden_size // config.num_attention_heads) * 4 * config.num_key_value_heads
    slots = 10 + 10 + 1
    assert done.kv_cache["engine"] == "fast"
    assert (done.kv_cache["heavy_budget"], done.kv_cache["recent_budget"]) == (10, 10)
    # Every layer's slots, plus the moment one layer holds the whole prompt.
    assert done.kv_cache["kv_bytes_peak"] == (config.num_hidden_layers * slots + 100 - slots) * per_slot
    assert done.kv_cache["kv_bytes_full"] == (100 + 3) * per_slot * config.num_hidden_layers


@pytest.fixture(scope="module")
def smollm2():
    from h2o import models

    tokenizer, _ = models.load_tokenizer()
    lines = (ROOT / "data" / "xsum.jsonl").read_text().splitlines()[:4]
    prompts = [encode(tokenizer, json.loads(line)["request"]["prompt"], "on")[0] for line in lines]
    return models.load_model(), tokenizer, prompts


@pytest.mark.parametrize("name", list(POLICIES))
def test_smollm2_engines_agree_at_helms_temperature(smollm2, name):
    model, tokenizer, prompts = smollm2
    # HELM's XSUM request: temperature 0.3, stop at "###"; fewer tokens to keep the test short.
    sampling = [Sampling(max_new_tokens=24, temperature=0.3, stop=("###",), seed=42 * 1_000_003 + i)
                for i in range(len(prompts))]
    fast = FastEngine(model, tokenizer, _policy(name), 4, steps_per_check=8).run(prompts, sampling)
    assert sum(len(c.token_ids) for c in fast) >= 40  # not a vacuous match on empty texts
    for batch in (1, 4):
        _assert_same(fast, _reference(model, tokenizer, prompts, sampling, _policy(name), batch))
    assert _policy(name) is None or fast[0].kv_cache["kv_bytes_peak"] < fast[0].kv_cache["kv_bytes_full"]


def _requests(path, lengths, seed=3):
    with open(path, "w") as f:
        for i, prompt in enumerate(random_prompts(lengths, seed=seed)):
            request = {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.5, "max_tokens": 8,
                       "stop": [], "top_p": 1, "n": 1, "top_k_per_token": 1}
            f.write(json.dumps({"request": request}) + "\n")


def _results(path):
    return [json.loads(line)["result"] for line in open(path)]


def test_run_helm_auto_takes_the_fast_engine_and_resumes_to_the_same_results(tiny_model_dir, tmp_path, caplog):
    _requests(tmp_path / "in.jsonl", [40, 70, 25, 90, 55])
    common = ["--input_path", str(tmp_path / "in.jsonl"), "--model_name", str(tiny_model_dir), "--device", "cpu",
              "--enable_small_cache", "--batch_size", "2"]
    with caplog.at_level("INFO"):
        assert run.main(common + ["--output_path", str(tmp_path / "fast.jsonl")]) == 0
    assert "engine: fast" in caplog.text
    fast = _results(tmp_path / "fast.jsonl")
    assert {r["kv_cache"]["engine"] for r in fast} == {"fast"}
    assert run.main(common + ["--output_path", str(tmp_path / "ref.jsonl"), "--engine", "reference"]) == 0
    reference = _results(tmp_path / "ref.jsonl")
    assert [r["choices"][0]["text"] for r in fast] == [r["choices"][0]["text"] for r in reference]
    # Killed after two results: the rerun resumes to the same five.
    lines = (tmp_path / "fast.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "resumed.jsonl").write_text("".join(lines[:2]))
    assert run.main(common + ["--output_path", str(tmp_path / "resumed.jsonl")]) == 0
    resumed = _results(tmp_path / "resumed.jsonl")
    for a, b in zip(resumed, fast, strict=True):
        a, b = a["choices"][0], b["choices"][0]
        assert (a["text"], a["logprobs"]["tokens"]) == (b["text"], b["logprobs"]["tokens"])
        # Another batch is other float arithmetic: logprobs agree to rounding, not bit for bit.
        assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-5)


@pytest.mark.parametrize("flags, why", [
    (["--kv_mode", "mask"], "mask mode"),
    (["--policy", "adakv"], "policy adakv has its own selection rule"),
])
def test_what_the_fast_engine_cannot_serve_takes_the_reference_engine(tiny_model_dir, tmp_path, capsys, caplog,
                                                                       flags, why):
    _requests(tmp_path / "in.jsonl", [40, 70])
    common = ["--input_path", str(tmp_path / "in.jsonl"), "--model_name", str(tiny_model_dir), "--device", "cpu",
              "--enable_small_cache", *flags]
    with caplog.at_level("INFO"):
        assert run.main(common + ["--output_path", str(tmp_path / "out.jsonl")]) == 0
    assert f"engine: reference ({why}" in caplog.text
    assert {r["kv_cache"]["engine"] for r in _results(tmp_path / "out.jsonl")} == {"reference"}
    assert run.main(common + ["--output_path", str(tmp_path / "fast.jsonl"), "--engine", "fast"]) == 2
    assert f"--engine fast: {why}" in capsys.readouterr().err
    assert not (tmp_path / "fast.jsonl").exists()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", list(POLICIES))
def test_on_cuda_kernels_and_graphs_give_the_reference_results(tokenizer, name):
    model = tiny_llama(kv_heads=2).cuda()
    prompts = random_prompts([64, 101, 40, 77, 30, 90, 55], seed=5)
    sampling = _sampling(len(prompts), stop=("w7",))
    alone = _reference(model, tokenizer, prompts, sampling, _policy(name), batch=1)
    for rows in (2, 7):
        engine = FastEngine(model, tokenizer, _policy(name), rows, steps_per_check=4)
        _assert_same(engine.run(prompts, sampling), alone)
        assert engine.stats["captures"] >= 1


def test_both_engines_count_the_full_caches_bytes_alike(gqa, tokenizer):
    prompts = random_prompts([40, 70], seed=3)
    sampling = [Sampling(max_new_tokens=64), Sampling(max_new_tokens=9)]
    fast = FastEngine(gqa, tokenizer, None, 2).run(prompts, sampling)
    reference = _reference(gqa, tokenizer, prompts, sampling, None, batch=2)
    for a, b in zip(fast, reference):
        assert (a.kv_cache["kv_bytes_peak"], a.kv_cache["kv_bytes_full"]) == (
            b.kv_cache["kv_bytes_peak"], b.kv_cache["kv_bytes_full"])
        assert a.kv_cache["kv_bytes_peak"] == a.kv_cache["kv_bytes_full"]
