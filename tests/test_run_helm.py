"""run_helm.py end to end on a tiny saved model: the output contract, resume and every bad input."""

import json
import time
from dataclasses import replace

import pytest

from conftest import random_prompts, save_tiny_model
from h2o.serve.cli import main
from h2o.serve.options import ServeOptions
from h2o.serve.serve import serve


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), context=128)


def _requests(path, n=4, lengths=None, **overrides):
    lengths = lengths or [40 + 7 * i for i in range(n)]
    with open(path, "w") as f:
        for prompt in random_prompts(lengths, seed=2):
            request = {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.0,
                       "max_tokens": 12, "stop": ["###"], "top_p": 1, "n": 1, **overrides}
            f.write(json.dumps({"request": request}) + "\n")
    return path


def _run(model_dir, inp, out, *flags):
    return main(["--input_path", str(inp), "--output_path", str(out), "--model_name", str(model_dir),
                 "--no_cuda", *flags])


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_results_follow_the_helm_contract(model_dir, tmp_path):
    inp = _requests(tmp_path / "in.jsonl")
    assert _run(model_dir, inp, tmp_path / "out.jsonl", "--enable_small_cache") == 0
    lines, requests = _lines(tmp_path / "out.jsonl"), _lines(inp)
    assert [line["request"] for line in lines] == [r["request"] for r in requests]
    result = lines[0]["result"]
    choice = result["choices"][0]
    assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) == 12
    assert choice["finish_reason"] == "length" and result["chat_template"] is False
    assert result["kv_cache"]["mode"] == "drop" and result["kv_cache"]["heavy_budget"] == 4
    assert result["kv_cache"]["kv_bytes_peak"] < result["kv_cache"]["kv_bytes_full"]


def test_batching_and_seed_give_the_same_results(model_dir, tmp_path):
    inp = _requests(tmp_path / "in.jsonl", temperature=0.7)
    texts = []
    for name, batch in (("a", "1"), ("b", "3"), ("c", "1")):
        assert _run(model_dir, inp, tmp_path / f"{name}.jsonl", "--enable_small_cache", "--batch_size", batch) == 0
        texts.append([line["result"]["choices"][0]["text"] for line in _lines(tmp_path / f"{name}.jsonl")])
    assert texts[0] == texts[1] == texts[2]
    assert _run(model_dir, inp, tmp_path / "d.jsonl", "--enable_small_cache", "--seed", "7") == 0
    assert [line["result"]["choices"][0]["text"] for line in _lines(tmp_path / "d.jsonl")] != texts[0]


def test_a_rerun_resumes_and_repairs_a_torn_last_line(model_dir, tmp_path):
    inp, out = _requests(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert _run(model_dir, inp, out, "--sample_num", "2") == 0
    first = out.read_text()
    with open(out, "a") as f:
        f.write('{"request": {"prompt": "w1 w2')  # a run killed mid-write
    assert _run(model_dir, inp, out) == 0
    text = out.read_text()
    assert text.startswith(first) and len(text.splitlines()) == 4
    assert _run(model_dir, inp, tmp_path / "fresh.jsonl") == 0
    fresh = [line["result"]["choices"][0]["text"] for line in _lines(tmp_path / "fresh.jsonl")]
    assert [line["result"]["choices"][0]["text"] for line in _lines(out)] == fresh


def _error(capsys, model_dir, inp, out, *flags):
    capsys.readouterr()
    assert _run(model_dir, inp, out, *flags) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    return message


def test_a_bad_line_is_named_by_file_and_line(model_dir, tmp_path, capsys):
    inp = _requests(tmp_path / "in.jsonl")
    with open(inp, "a") as f:
        f.write("{not json\n")
    assert f"{inp}:5: not valid JSON" in _error(capsys, model_dir, inp, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "line, message",
    [
        ({"request": {"temperature": 0, "max_tokens": 4}}, "request has no 'prompt'"),
        ({"request": {"prompt": "w1", "temperature": 0}}, "request has no 'max_tokens'"),
        ({"request": {"prompt": "w1", "temperature": "hot", "max_tokens": 4}}, "'temperature' must be float"),
        ({"request": {"prompt": "w1", "temperature": 0, "max_tokens": 4, "n": 2}}, "n=2"),
        ({"prompt": "w1"}, "no 'request' object"),
    ],
)
def test_a_bad_request_is_named(model_dir, tmp_path, capsys, line, message):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(line) + "\n")
    error = _error(capsys, model_dir, inp, tmp_path / "out.jsonl")
    assert error.startswith(f"run_helm.py: error: {inp}:1: ") and message in error


def test_a_prompt_longer_than_the_context_is_refused(model_dir, tmp_path, capsys):
    inp = _requests(tmp_path / "in.jsonl", lengths=[40, 120])
    error = _error(capsys, model_dir, inp, tmp_path / "out.jsonl")
    assert f"{inp}:2: prompt of 120 tokens + max_tokens 12 exceeds the model's context of 128" in error
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--enable_small_cache", "--heavy_ratio", "1.5"], "--heavy_ratio must lie in [0, 1]"),
        (["--enable_small_cache", "--recent_ratio", "-0.2"], "--recent_ratio must lie in [0, 1]"),
        (["--model_arch", "bloom"], "unsupported architecture 'bloom'; supported: llama, mistral, qwen2, qwen3, opt, "
                                    "gpt_neox"),
        (["--model_arch", "mistral"], "does not match the model's architecture 'llama'"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
    ],
)
def test_bad_flags_are_named(model_dir, tmp_path, capsys, flags, message):
    inp = _requests(tmp_path / "in.jsonl")
    assert message in _error(capsys, model_dir, inp, tmp_path / "out.jsonl", *flags)


def test_unknown_models_and_inputs_are_named(model_dir, tmp_path, capsys):
    inp = _requests(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert "no such GGUF file" in _error(capsys, tmp_path / "nope.gguf", inp, out)
    assert "neither a model folder nor a .gguf file" in _error(capsys, tmp_path / "nope", inp, out)
    assert "not in the local Hugging Face cache" in _error(capsys, "nobody/no-such-model", inp, out)
    assert "no such input file" in _error(capsys, model_dir, tmp_path / "missing.jsonl", out)
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "no requests in file" in _error(capsys, model_dir, tmp_path / "empty.jsonl", out)


def test_an_output_of_other_requests_is_never_overwritten(model_dir, tmp_path, capsys):
    inp, out = _requests(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    assert _run(model_dir, inp, out, "--sample_num", "1") == 0
    before = out.read_text()
    other = _requests(tmp_path / "other.jsonl", lengths=[30, 31])
    assert f"{out}:1: holds a result for a request not at this place" in _error(capsys, model_dir, other, out)
    assert out.read_text() == before


def test_a_prompt_of_no_tokens_is_refused_before_the_weights_load(model_dir, tmp_path, capsys):
    inp = _requests(tmp_path / "in.jsonl", n=2)
    with open(inp, "a") as f:
        f.write(json.dumps({"request": {"prompt": "", "temperature": 0, "max_tokens": 4}}) + "\n")
    assert f"{inp}:3: the prompt encodes to no tokens" in _error(capsys, model_dir, inp, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_a_text_longer_than_a_sliding_window_is_refused(tmp_path, capsys):
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import VOCAB, tiny_tokenizer

    folder = tmp_path / "mistral"
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           sliding_window=40, eos_token_id=1, pad_token_id=0, bos_token_id=0)
    MistralForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    inp = _requests(tmp_path / "in.jsonl", lengths=[20, 60])
    error = _error(capsys, folder, inp, tmp_path / "out.jsonl", "--model_arch", "mistral")
    assert f"{inp}:2: prompt of 60 tokens + max_tokens 12 exceeds the model's sliding attention window of 40" in error


def test_every_registered_policy_runs_through_run_helm(model_dir, tmp_path):
    from h2o.policies import POLICIES

    inp = _requests(tmp_path / "in.jsonl", n=2)
    for name in sorted(POLICIES):
        out = tmp_path / f"{name}.jsonl"
        assert _run(model_dir, inp, out, "--enable_small_cache", "--policy", name) == 0
        assert {line["result"]["kv_cache"]["policy"] for line in _lines(out)} == {name}


def test_serve_takes_the_options_the_command_line_parses(model_dir, tmp_path):
    inp = _requests(tmp_path / "in.jsonl", n=2)
    options = ServeOptions(str(tmp_path / "api.jsonl"), input_path=str(inp), model_name=str(model_dir), no_cuda=True,
                           enable_small_cache=True, policy="h2o-shrink", shrink=0.5)
    argv = ["--input_path", str(inp), "--output_path", str(tmp_path / "api.jsonl"), "--model_name", str(model_dir),
            "--no_cuda", "--enable_small_cache", "--policy", "h2o-shrink", "--shrink", "0.5"]
    assert ServeOptions.from_argv(argv) == options
    assert options.build_policy().shrink == 0.5 and replace(options, enable_small_cache=False).build_policy() is None
    served = serve(options)
    lines = _lines(tmp_path / "api.jsonl")
    assert served.generated == sum(len(line["result"]["choices"][0]["logprobs"]["tokens"]) for line in lines) > 0
    assert _run(model_dir, inp, tmp_path / "cli.jsonl", *argv[6:]) == 0
    assert [line["result"]["choices"] for line in _lines(tmp_path / "cli.jsonl")] == [
        line["result"]["choices"] for line in lines]
    assert serve(options).generated == 0  # all there: nothing served again
    for change, message in (({"batch_size": 0}, "--batch_size must be at least 1, got 0"),
                            ({"output_path": ""}, "--output_path is required"),
                            ({"policy": "h2o"}, "--shrink: only for --policy h2o-shrink, not h2o")):
        with pytest.raises(ValueError, match=message):
            replace(options, **change)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_each_result_holds_its_own_latency_and_when_it_ended(model_dir, tmp_path, engine):
    inp = _requests(tmp_path / "in.jsonl", n=5)
    began = time.time()
    assert _run(model_dir, inp, tmp_path / "out.jsonl", "--enable_small_cache", "--batch_size", "2",
                "--engine", engine) == 0
    ended = time.time()
    results = [line["result"] for line in _lines(tmp_path / "out.jsonl")]
    spans = sorted((r["finished_at"] - r["request_time"], r["finished_at"]) for r in results)
    assert all(began <= start < end <= ended for start, end in spans)
    assert {r["batch_size"] for r in results} == {2}
    slack = 0.05  # the span's two clocks (latency, wall time) are read apart
    # At no moment more requests in flight than the batch holds.
    for start, _ in spans:
        assert sum(1 for s, e in spans if s - slack <= start < e - slack) <= 2
    if engine == "reference":
        # Batches by prompt length (5 prompts of growing length: rows 0-1, 2-3, 4), one after another,
        # each row's latency its batch's wall time.
        times = [r["request_time"] for r in results]
        assert times[0] == times[1] and times[2] == times[3]
        assert spans[2][0] >= spans[1][1] - slack and spans[4][0] >= spans[3][1] - slack
