"""run_helm.py's memory and precision flags: --gpu_memory_fraction, --batch_size auto, --dtype auto."""

import pytest
import torch
from transformers import LlamaConfig

from h2o import models
from h2o.serve.cli import main
from h2o.serve.options import ServeOptions


def _options(*flags):
    return ServeOptions.from_argv(["--output_path", "out.jsonl", *flags])


def test_defaults_are_auto_and_nine_tenths():
    options = _options()
    assert (options.batch_size, options.gpu_memory_fraction, options.dtype) == (None, 0.9, "auto")
    assert _options("--batch_size", "3").batch_size == 3
    assert _options("--gpu_memory_fraction", "1").gpu_memory_fraction == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--gpu_memory_fraction", "0"], "--gpu_memory_fraction must lie in (0, 1], got 0.0"),
    (["--gpu_memory_fraction", "1.5"], "--gpu_memory_fraction must lie in (0, 1], got 1.5"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
])
def test_bad_values_exit_2_with_one_line_before_any_weights_load(tmp_path, capsys, flags, message):
    # No such model: the flag's error comes first, so nothing was loaded.
    assert main(["--output_path", str(tmp_path / "out.jsonl"), "--model_name", str(tmp_path / "nope"), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_batch_size_is_auto_or_an_integer(capsys):
    with pytest.raises(SystemExit) as exit:
        _options("--batch_size", "many")
    assert exit.value.code == 2 and "auto or an integer, not 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("saved, device, expected", [
    (None, "cuda", "float16"), ("float32", "cuda:1", "float16"), ("bfloat16", "cuda", "bfloat16"),
    (torch.bfloat16, "cuda", "bfloat16"), ("bfloat16", "cpu", "float32"), (None, "cpu", "float32"),
])
def test_dtype_auto_follows_the_device_and_the_checkpoint(saved, device, expected):
    config = LlamaConfig(dtype=saved) if saved is not None else LlamaConfig()
    assert models.resolve_dtype("auto", device, config) == expected
    assert _options().model_dtype(device, config) == expected


def test_an_explicit_dtype_and_fp16_win_over_auto():
    config = LlamaConfig(dtype="bfloat16")
    assert _options("--dtype", "float32").model_dtype("cuda", config) == "float32"
    assert _options("--fp16").model_dtype("cuda", config) == "float16"
    with pytest.raises(ValueError, match="--fp16 and --dtype bfloat16 ask for two dtypes"):
        _options("--fp16", "--dtype", "bfloat16")
