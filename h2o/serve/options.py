"""What a served run is asked to do: every flag of run_helm.py as a typed field of `ServeOptions`,
parsed and checked in one place."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from transformers import PretrainedConfig

from h2o import models
from h2o.engine.reference.attention import ATTENTION_IMPLEMENTATIONS
from h2o.engine.reference.evicting_cache import KV_MODES
from h2o.policies import POLICIES, Policy, WithSinks, make_policy
from h2o.policies.base import check_ratios
from h2o.serve import distributed

log = logging.getLogger("run_helm")
CHAT_TEMPLATE = ("auto", "on", "off")
ENGINES = ("auto", "reference", "fast")
# The policies' knobs (`Policy.knob`), each a flag and a field of its name.
KNOBS = ("shrink", "forgetting_factor", "epsilon")


def parser() -> argparse.ArgumentParser:
    """run_helm.py's flags: each sets the `ServeOptions` field of its name, and defaults to it."""
    p = argparse.ArgumentParser(description="The command line behind run_helm.py: HELM requests through a model "
                                            "with a full or small KV cache.")
    # The paper's flags, same names and defaults.
    p.add_argument("--input_path", default=ServeOptions.input_path, help="HELM requests, one JSON a line")
    p.add_argument("--output_path", default="", help="results jsonl (appended; reruns resume)")
    p.add_argument("--model_name", default=ServeOptions.model_name,
                   help="hub id (local cache), model folder or .gguf file; default: embedded SmolLM2")
    p.add_argument("--model_arch", default=ServeOptions.model_arch, help=f"one of {', '.join(models.SUPPORTED_ARCHS)}")
    p.add_argument("--cache_dir", default=None, help="Hugging Face cache folder for hub ids")
    p.add_argument("--enable_small_cache", action="store_true", help="evict with --policy; else full cache")
    p.add_argument("--heavy_ratio", type=float, default=ServeOptions.heavy_ratio,
                   help="heavy-hitter budget / prompt length")
    p.add_argument("--recent_ratio", type=float, default=ServeOptions.recent_ratio,
                   help="recent-window budget / prompt length")
    p.add_argument("--sample_num", type=int, default=ServeOptions.sample_num, help="use the first N requests")
    p.add_argument("--k", type=int, default=ServeOptions.k, help="top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=ServeOptions.seed)
    p.add_argument("--no_cuda", action="store_true", help="never use a GPU")
    p.add_argument("--fp16", action="store_true", help="same as --dtype float16")
    # Ours.
    p.add_argument("--kv_mode", choices=KV_MODES, default=ServeOptions.kv_mode,
                   help="drop: evict for real; mask: the paper's simulation (masks, keeps memory)")
    p.add_argument("--policy", choices=sorted(POLICIES), default=ServeOptions.policy,
                   help="which tokens a small cache keeps (h2o is the paper's)")
    p.add_argument("--sink_size", type=int, default=ServeOptions.sink_size,
                   help="first tokens kept by --policy sink and h2o-sink")
    p.add_argument("--shrink", type=float, default=None,
                   help="--policy h2o-shrink: a token's attention per later query, shrunk by this share "
                        "of the tokens seen (default 0.25)")
    p.add_argument("--forgetting_factor", type=float, default=None,
                   help="--policy a2sf: each later query multiplies a token's accumulated attention by this, "
                        "in (0, 1] (default 0.1; 1 is h2o)")
    p.add_argument("--epsilon", type=float, default=None,
                   help="--policy expected-attention: added to the expected attention before it is weighted "
                        "by the value's norm, >= 0 (default 0.01)")
    p.add_argument("--engine", choices=ENGINES, default=ServeOptions.engine,
                   help="fast: static slots, continuous batching, CUDA graphs; reference: the readable "
                        "oracle (mask mode, --attention); auto: fast wherever it can serve")
    p.add_argument("--attention", choices=sorted(ATTENTION_IMPLEMENTATIONS), default=ServeOptions.attention,
                   help="attention kernel of the reference engine under the small cache")
    p.add_argument("--batch_size", type=batch_size, default="auto",
                   help="at most this many sequences decoded at once (the fast engine refills a row as soon as "
                        "it ends); auto: on a GPU as many as the fast engine's KV pool holds, else 1")
    p.add_argument("--gpu_memory_fraction", type=float, default=ServeOptions.gpu_memory_fraction,
                   help="share of the GPU's memory that weights, activations and the fast engine's KV pool may take")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(models.DTYPES) + ["auto"], default=ServeOptions.dtype,
                   help="auto: float16 on CUDA (bfloat16 where the checkpoint says so), float32 on the CPU")
    p.add_argument("--tensor_parallel", nargs="?", type=int, const=distributed.Ranks.from_env().world, metavar="K",
                   help="under torchrun: shard the model over K ranks (default: all) by transformers' tensor-parallel "
                        "plan, each rank holding the cache of its own KV heads; N ranks hold N/K copies of the "
                        "model, which split the requests as data parallel does")
    p.add_argument("--device_map", default=None,
                   help="accelerate's placement across devices, e.g. auto (a model too large for one GPU)")
    p.add_argument("--chat_template", choices=CHAT_TEMPLATE, default=ServeOptions.chat_template,
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    return p


def batch_size(text: str) -> int | None:
    """--batch_size: an int, or None for auto."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"auto or an integer, not {text!r}") from None


@dataclass(frozen=True)
class ServeOptions:
    """One served run, checked when made (a bad value raises ValueError naming its flag). The
    defaults are run_helm.py's; `output_path` has none."""

    output_path: str
    input_path: str = "data/xsum.jsonl"
    model_name: str = models.DEFAULT_MODEL
    model_arch: str = "llama"
    cache_dir: str | None = None
    enable_small_cache: bool = False  # False: the full cache, whatever the policy flags say
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1
    sample_num: int = 1000
    k: int = 0
    seed: int = 42
    no_cuda: bool = False
    fp16: bool = False
    kv_mode: str = "drop"  # one of KV_MODES
    policy: str = "h2o"  # a name in h2o.policies.POLICIES
    sink_size: int = 4
    shrink: float | None = None  # None: h2o-shrink's default
    forgetting_factor: float | None = None  # None: a2sf's default
    epsilon: float | None = None  # None: expected-attention's default
    engine: str = "auto"  # one of ENGINES
    attention: str = "eager"
    batch_size: int | None = None  # None: auto
    gpu_memory_fraction: float = 0.9
    device: str | None = None
    dtype: str = "auto"
    tensor_parallel: int | None = None  # ranks per model copy; None: no tensor parallel
    device_map: str | None = None
    chat_template: str = "auto"  # one of CHAT_TEMPLATE

    @classmethod
    def from_argv(cls, argv: list[str] | None = None) -> ServeOptions:
        """run_helm.py's command line (None: sys.argv); a malformed one exits as argparse does."""
        return cls(**vars(parser().parse_args(argv)))

    def __post_init__(self) -> None:
        if not self.output_path:
            raise ValueError("--output_path is required")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"--gpu_memory_fraction must lie in (0, 1], got {self.gpu_memory_fraction}")
        if self.sample_num < 1:
            raise ValueError(f"--sample_num must be at least 1, got {self.sample_num}")
        if self.k < 0:
            raise ValueError(f"--k must be >= 0, got {self.k}")
        if self.tensor_parallel is not None:
            world = distributed.Ranks.from_env().world
            if self.device_map:
                raise ValueError("--tensor_parallel and --device_map each place the model: give one")
            if world < 2:
                raise ValueError("--tensor_parallel: start run_helm.py with torchrun --nproc_per_node N (N >= 2)")
            if not 2 <= self.tensor_parallel <= world or world % self.tensor_parallel:
                raise ValueError(f"--tensor_parallel {self.tensor_parallel}: K must be 2 to {world} and divide the "
                                 f"{world} ranks")
        for knob in KNOBS:
            if getattr(self, knob) is not None and getattr(POLICIES.get(self.policy), "knob", "") != knob:
                owner = next(name for name, cls in POLICIES.items() if cls.knob == knob)
                raise ValueError(f"--{knob}: only for --policy {owner}, not {self.policy}")
        if Path(self.output_path).is_dir():
            raise ValueError(f"--output_path {self.output_path} is a directory; give a file in it, "
                             f"e.g. {Path(self.output_path) / 'results.jsonl'}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device {self.device}: not a device; use cpu, cuda or cuda:N") from None
        defaults = {f.name: f.default for f in fields(self)}
        if self.fp16 and self.dtype not in ("float16", defaults["dtype"]):
            raise ValueError(f"--fp16 and --dtype {self.dtype} ask for two dtypes: give one")
        # Checked with or without a small cache: a ratio out of range is a typo either way.
        check_ratios(self.heavy_ratio, self.recent_ratio)
        if not self.enable_small_cache:
            unused = [f"--{name}" for name in ("heavy_ratio", "recent_ratio", *KNOBS)
                      if getattr(self, name) != defaults[name]]
            if unused:
                log.warning("%s: no effect without --enable_small_cache (this run keeps the full cache)",
                            " and ".join(unused))

    def model_dtype(self, device: str, config: PretrainedConfig) -> str:
        """The weights' dtype on `device`: float16 under --fp16, else --dtype as
        `models.resolve_dtype` reads it."""
        return "float16" if self.fp16 else models.resolve_dtype(self.dtype, device, config)

    def build_policy(self) -> Policy | None:
        """The small cache's policy, or None for the full cache; a policy's own checks raise ValueError."""
        if not self.enable_small_cache:
            return None
        # An unknown name gets make_policy's error, which lists the known ones.
        sinks = issubclass(POLICIES.get(self.policy, Policy), WithSinks)
        options: dict[str, object] = {"sink_size": self.sink_size} if sinks else {}
        options.update({knob: getattr(self, knob) for knob in KNOBS if getattr(self, knob) is not None})
        return make_policy(self.policy, self.heavy_ratio, self.recent_ratio, **options)
