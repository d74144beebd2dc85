"""What every engine offers serving: `run(prompts, sampling, on_done) -> completions`, and `stats`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from h2o.engine.sampling import Sampling
from h2o.engine.transcript import Completion

EngineName = Literal["reference", "fast"]
OnDone = Callable[[int, Completion], None]


class Engine(Protocol):
    """`run` serves every prompt and hands each completion to `on_done(index, completion)` as soon
    as it exists (`completion.seconds`: that request's latency); `stats` holds the run's seconds
    in prefill and decode (`prefill_s`, `decode_s`) and engine-specific counts."""

    stats: dict[str, float]

    def run(self, prompts: list[list[int]], sampling: list[Sampling], on_done: OnDone | None = None) -> list[Completion]:
        ...


@dataclass(frozen=True)
class EngineOptions:
    """How an engine serves: `batch_size` sequences at once (the fast engine: at most; None: as
    many as its KV pool holds); the reference engine's KV mode (`kv_mode`, mask or drop) and
    attention kernel (`attention`); the fast engine's CUDA graph (None: on CUDA) and the share
    of the GPU's memory its KV pool may fill up to (`gpu_memory_fraction`)."""

    batch_size: int | None = 1
    kv_mode: str = "drop"
    attention: str = "eager"
    cuda_graph: bool | None = None
    gpu_memory_fraction: float = 0.9

