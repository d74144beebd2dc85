"""Long runs lose nothing: each fault provoked for real (SIGKILL, a second process, SIGTERM and
SIGINT, a full disk, out of memory, bad bytes), then the output checked and the run resumed to
the results of a run that never failed."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

from conftest import ROOT, random_prompts
from h2o.serve import helm_io, results
from h2o.serve.cli import main

N = 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("requests") / "in.jsonl"
    lengths = [random.Random(i).randint(30, 90) for i in range(N)]
    with open(path, "w") as f:
        for i, prompt in enumerate(random_prompts(lengths, seed=4)):
            request = {"prompt": " ".join(f"w{t - 2}" for t in prompt), "temperature": 0.5,
                       "max_tokens": 20 + i % 29, "stop": [], "top_p": 1, "n": 1}
            f.write(json.dumps({"request": request}) + "\n")
    return path


def _flags(tiny_model_dir, inputs, output, *extra):
    return ["--input_path", str(inputs), "--output_path", str(output), "--model_name", str(tiny_model_dir),
            "--no_cuda", "--enable_small_cache", "--batch_size", "2", *extra]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, inputs, tmp_path_factory):
    output = tmp_path_factory.mktemp("whole") / "out.jsonl"
    assert main(_flags(tiny_model_dir, inputs, output)) == 0
    return _texts(output)


def _texts(path):
    return [json.loads(line)["result"]["choices"][0]["text"] for line in open(path)]


def _whole_lines(path):
    """Every line of the file, each a complete JSON object, the last one ended (no torn line)."""
    if not path.exists():
        return []
    *lines, tail = path.read_bytes().split(b"\n")
    assert tail == b"", f"{path} ends in a torn line: {tail[:60]!r}"
    return [json.loads(line) for line in lines]


def _start(tiny_model_dir, inputs, output):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "run_helm.py"), *_flags(tiny_model_dir, inputs, output)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saved(output):
    pending = output.with_name(output.name + ".pending")
    lines = lambda p: p.read_bytes().count(b"\n") if p.exists() else 0  # noqa: E731
    return lines(output) + lines(pending)


def _wait_for(process, output, count, timeout=120):
    deadline = time.monotonic() + timeout
    while _saved(output) < count:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigkill_loses_only_the_requests_in_flight(tiny_model_dir, inputs, uninterrupted, tmp_path, caplog):
    output = tmp_path / "out.jsonl"
    process = _start(tiny_model_dir, inputs, output)
    _wait_for(process, output, 6)
    process.kill()
    process.wait()
    saved = _saved(output)
    assert saved < N  # killed mid-run
    # The rerun keeps what was saved (a line torn by the kill at most is lost) and completes.
    with caplog.at_level("INFO"):
        assert main(_flags(tiny_model_dir, inputs, output)) == 0
    resumed = int(caplog.text.split("resuming: ")[1].split(" of ")[0])
    assert resumed >= saved - 1
    assert _texts(output) == uninterrupted
    assert not output.with_name("out.jsonl.pending").exists()
    assert not output.with_name("out.jsonl.lock").exists()


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_leave_a_valid_output(tiny_model_dir, inputs, uninterrupted, tmp_path, signum, code):
    output = tmp_path / "out.jsonl"
    process = _start(tiny_model_dir, inputs, output)
    _wait_for(process, output, 4)
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code
    message = [line for line in err.splitlines() if line.startswith("run_helm.py:")]
    assert len(message) == 1 and "interrupted" in message[0] and "rerun the same command to resume" in message[0]
    done = len(_whole_lines(output))
    assert f"{done} of {N} results in {output}" in message[0]
    assert main(_flags(tiny_model_dir, inputs, output)) == 0
    assert _texts(output) == uninterrupted


def test_a_second_run_on_the_same_output_stops_at_once(tiny_model_dir, inputs, uninterrupted, tmp_path, capsys):
    output = tmp_path / "out.jsonl"
    first = _start(tiny_model_dir, inputs, output)
    _wait_for(first, output, 1)
    capsys.readouterr()
    assert main(_flags(tiny_model_dir, inputs, output)) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"run_helm.py: error: {output}: another run (pid {first.pid}) is writing it; wait for it "
                     "to end or use another --output_path")
    first.kill()
    first.wait()
    # The lock died with its process.
    assert main(_flags(tiny_model_dir, inputs, output)) == 0
    assert _texts(output) == uninterrupted


def test_a_full_disk_leaves_whole_lines_and_says_what_is_safe(tiny_model_dir, inputs, uninterrupted, tmp_path,
                                                               monkeypatch, capsys):
    output = tmp_path / "out.jsonl"
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 5:
            real_write(fd, bytes(data)[:10])  # part of the line reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(results.os, "write", write)
    capsys.readouterr()
    assert main(_flags(tiny_model_dir, inputs, output)) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("run_helm.py:")]
    assert len(error) == 1 and "no space left on the device" in error[0]
    assert "rerun the same command to resume" in error[0]
    for path in (output, output.with_name("out.jsonl.pending")):
        _whole_lines(path)
    monkeypatch.setattr(results.os, "write", real_write)
    assert main(_flags(tiny_model_dir, inputs, output)) == 0
    assert _texts(output) == uninterrupted


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_out_of_memory_backs_off_and_goes_on(tiny_model_dir, inputs, tmp_path, monkeypatch, caplog, engine):
    forward = transformers.LlamaForCausalLM.forward
    calls = []

    def limited(self, input_ids=None, **kwargs):
        calls.append(input_ids.shape[0])
        if input_ids.shape[0] > 2 and len(calls) > 30:  # some results are out before it strikes
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, input_ids=input_ids, **kwargs)

    expected = tmp_path / "at2.jsonl"
    assert main(_flags(tiny_model_dir, inputs, expected, "--batch_size", "2", "--engine", engine)) == 0
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", limited)
    output = tmp_path / "out.jsonl"
    with caplog.at_level("INFO"):
        assert main(_flags(tiny_model_dir, inputs, output, "--batch_size", "8", "--engine", engine)) == 0
    if engine == "reference":
        assert caplog.text.count("out of memory at batch") == 2  # 8 -> 4 -> 2, each said once
        assert "going on at batch 2" in caplog.text
    else:  # the engine backs off by itself, each time in one line, and the run goes on
        assert "out of memory at batch" not in caplog.text
        assert caplog.text.count("out of memory in a ") >= 2 and "; 2 rows, at most" in caplog.text
    assert _texts(output) == _texts(expected)


def test_an_undecodable_line_is_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"request": {"prompt": "w1", "temperature": 0, "max_tokens": 2}}\n\xff\xfe\n')
    with pytest.raises(helm_io.InputError, match=rf"^{path}:2: not valid UTF-8"):
        helm_io.read_requests(path)


def _fuzzed_lines(rng):
    valid = json.dumps({"request": {"prompt": "w1 w2", "temperature": 0.3, "max_tokens": 4, "stop": ["###"],
                                    "top_p": 1, "n": 1, "top_k_per_token": 1}})
    result = json.dumps({"request": {"prompt": "w1"}, "result": {"choices": [{"text": "w3", "logprobs": {
        "tokens": ["w3"], "token_logprobs": [-1.0]}}]}})
    pieces = ['{"request": ', "[", "]", "{", "}", '"prompt"', ":", ",", "null", "true", "-1", "1e999", '"',
              "\\u0000", "\\ud800", "[" * 50, "{\"a\":" * 40, "NaN", "Infinity", '"n": 2', '"stop": [1]',
              '"logprobs": []', '"choices": {}', '"tokens": "x"', "[]", "{}", '"x"', "[1]", '[{"text": 1']
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        base = rng.choice([valid, result])
        if kind < 0.3:
            cut = rng.randrange(len(base))
            line = (base[:cut] + rng.choice(pieces) + base[cut + rng.randint(0, 5):]).encode()
        elif kind < 0.5:
            line = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        elif kind < 0.7:
            line = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))).encode()
        else:
            targets = ['"w1 w2"', "0.3", "4", '["###"]', "1", '"w3"', "-1.0", '["w3"]', "[-1.0]",
                       '{"tokens": ["w3"], "token_logprobs": [-1.0]}', '[{"text": "w3"', '{"prompt": "w1"}',
                       '{"choices": [{"text"']
            line = base.replace(rng.choice([t for t in targets if t in base]), rng.choice(pieces), 1).encode()
        yield line.replace(b"\n", b" ")


def test_fuzzed_files_get_a_file_and_line_error_never_a_traceback(tmp_path):
    from lab_helm.results import ResultsError, load

    rng = random.Random(1234)
    path = tmp_path / "fuzz.jsonl"
    for _ in range(2000):
        path.write_bytes(b"\n".join(_fuzzed_lines(rng)) + b"\n")
        try:
            requests = helm_io.read_requests(path)
        except helm_io.InputError as error:
            assert str(error).startswith(f"{path}")
            assert "\n" not in str(error)
        else:
            try:
                results.unfinished(path, requests)
            except helm_io.InputError as error:
                assert "\n" not in str(error)
        try:
            load(path)
        except ResultsError as error:
            assert "\n" not in str(error)


def test_our_run_killed_in_helm_run_is_redone_never_summarized_half_done(tmp_path):
    import helm_support

    if helm_support.net_cut() is None:
        pytest.skip("cannot cut the network (unshare -n)")
    rows = [(r, helm_support.fake_result(helm_support.lead(a["document"]))) for r, a in zip(helm_support.requests(3), helm_support.articles(3))]
    results_file = helm_support.write_results(tmp_path / "lead.jsonl", rows)
    out = tmp_path / "benchmark_output"
    command, env = helm_support.our_run_command(output_path=out, env={"jsonl": str(results_file)})
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    log = out / "logs" / "lead.helm-run.log"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.stat().st_size > 0):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # helm-run and all, mid-run
    process.wait()
    assert not (out / "runs" / "lead" / "runs.json").exists()  # never summarized
    done = helm_support.our_run(env={"jsonl": str(results_file)}, output_path=out)
    assert done.returncode == 0, done.stdout + done.stderr
    predictions = [text for _, result in rows for text in [result["choices"][0]["text"]]]
    references = [a["summary"] for a in helm_support.articles(3)]
    assert helm_support.stat_mean(out, "lead", "rouge_2") == pytest.approx(
        helm_support.expected_rouge(predictions, references, "rouge2"), abs=1e-12)
    assert (out / "runs" / "lead" / "runs.json").exists()
