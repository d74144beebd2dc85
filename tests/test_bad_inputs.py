"""What a newcomer's typos get from run_helm.py: one line naming the flag or file:line, exit 2 (1 for
out of memory, with advice), before any weights load, and nothing left behind."""

import json
import logging

import pytest
import torch

from conftest import save_tiny_model
from h2o import models
from h2o.serve import cli
from test_run_helm import _requests, _run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), context=128)


def _refused(capsys, model_dir, inp, out, *flags, status=2):
    capsys.readouterr()
    assert _run(model_dir, inp, out, *flags) == status
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and message[0].startswith("run_helm.py: error: ")
    return message[0]


def _left(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if the weights are loaded: the error must come before."""
    def load(*args, **kwargs):
        raise AssertionError("the weights were loaded")
    monkeypatch.setattr(models, "load_model", load)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "gpu0"], "--device gpu0: not a device; use cpu, cuda or cuda:N"),
        (["--heavy_ratio", "1.5"], "--heavy_ratio must lie in [0, 1], got 1.5"),
        (["--recent_ratio", "-3"], "--recent_ratio must lie in [0, 1], got -3.0"),
        (["--fp16", "--dtype", "bfloat16"], "--fp16 and --dtype bfloat16 ask for two dtypes: give one"),
    ],
)
def test_a_bad_flag_is_refused_before_the_weights_load(model_dir, tmp_path, capsys, no_weights, flags, message):
    inp = _requests(tmp_path / "in.jsonl")
    out = tmp_path / "out" / "results.jsonl"
    assert message in _refused(capsys, model_dir, inp, out, *flags)
    assert _left(tmp_path) == ["in.jsonl"]


def test_an_output_path_that_is_a_directory_is_refused_and_no_lock_is_left(model_dir, tmp_path, capsys, no_weights):
    inp = _requests(tmp_path / "in.jsonl")
    (tmp_path / "out").mkdir()
    message = _refused(capsys, model_dir, inp, tmp_path / "out")
    assert f"--output_path {tmp_path / 'out'} is a directory" in message
    assert _left(tmp_path) == ["in.jsonl", "out"]


def test_an_error_before_any_result_leaves_no_new_folder(model_dir, tmp_path, capsys, no_weights):
    inp = _requests(tmp_path / "in.jsonl")
    # The model's architecture is known only once the output is open: its folders go again.
    assert "does not match" in _refused(capsys, model_dir, inp, tmp_path / "a" / "b" / "out.jsonl",
                                        "--model_arch", "mistral")
    assert _left(tmp_path) == ["in.jsonl"]


def test_max_tokens_zero_names_the_condition_that_failed(model_dir, tmp_path, capsys):
    inp = _requests(tmp_path / "in.jsonl", n=1, max_tokens=0)
    message = _refused(capsys, model_dir, inp, tmp_path / "out.jsonl")
    assert message.endswith(f"{inp}:1: need max_tokens >= 1, got 0")


def test_ratios_without_a_small_cache_are_named_as_unused(model_dir, tmp_path, caplog):
    inp = _requests(tmp_path / "in.jsonl", n=1)
    with caplog.at_level(logging.WARNING, logger="run_helm"):
        assert _run(model_dir, inp, tmp_path / "out.jsonl", "--heavy_ratio", "0.3") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--heavy_ratio: no effect without --enable_small_cache (this run keeps the full cache)"]
    assert json.loads((tmp_path / "out.jsonl").read_text())["result"]["kv_cache"]["policy"] == "full"


def test_out_of_memory_is_one_line_with_advice(model_dir, tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB")
    monkeypatch.setattr(models, "load_model", load)
    inp = _requests(tmp_path / "in.jsonl")
    message = _refused(capsys, model_dir, inp, tmp_path / "out.jsonl", status=1)
    assert "out of GPU memory; try --fp16, a smaller --batch_size or --device_map auto" in message
    assert _left(tmp_path) == ["in.jsonl"]


def test_cache_dir_is_where_a_hub_id_is_looked_up(model_dir, tmp_path, capsys):
    # A hub cache laid out as huggingface_hub lays it out, holding the tiny model as one snapshot.
    snapshot = tmp_path / "hub" / "models--tiny--llama" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(model_dir, target_is_directory=True)
    (tmp_path / "hub" / "models--tiny--llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--llama" / "refs" / "main").write_text("0" * 40)
    inp = _requests(tmp_path / "in.jsonl", n=1)
    assert "not in the local Hugging Face cache" in _refused(capsys, "tiny/llama", inp, tmp_path / "a.jsonl")
    assert cli.main(["--input_path", str(inp), "--output_path", str(tmp_path / "b.jsonl"), "--model_name",
                     "tiny/llama", "--cache_dir", str(tmp_path / "hub"), "--no_cuda"]) == 0
