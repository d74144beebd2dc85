"""Greedy, fixed-length generation of token ids on the fast engine (`FastEngine`): what the
benchmarks time and the tests compare, with no tokenizer needed."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from h2o.engine.fast.engine import STEPS_PER_CHECK, FastEngine
from h2o.engine.sampling import Sampling
from h2o.policies import Policy


class TokenIdsOnly:
    """What `FastEngine` reads of a tokenizer, for callers that have token ids alone (a model
    with random weights has no tokenizer): the padding id, no end-of-text token and no text."""

    eos_token_id = None

    def __init__(self, pad_token_id: int = 0) -> None:
        self.pad_token_id = pad_token_id

    def decode(self, ids: list[int]) -> str:
        return ""


@dataclass
class FastGeneration:
    """Token ids per prompt (cut before the first end-of-text token), the seconds spent in the
    prefill (first token included) and in the decode steps, and the bytes of the key and value
    slots."""

    token_ids: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    kv_bytes: int


def generate_fast(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    policy: Policy,
    *,
    prefill_rows: int = 8,
    eos_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    cuda_graph: bool | None = None,
    use_kernels: bool | None = None,
) -> FastGeneration:
    """Greedy continuations of `prompts` (token ids, unpadded, any lengths) under `policy`, every
    prompt in a row of its own; only `eos_token_ids` end a continuation.

    Same tokens as `h2o.engine.reference.generation.generate` with `Eviction(policy, "drop")` and greedy sampling.
    A prefill forward takes at most `prefill_rows` times the longest prompt's tokens (shortest
    prompts first, left-padded to the longest among them). `cuda_graph` (default: on CUDA)
    replays captured decode steps."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    graph = model.device.type == "cuda" if cuda_graph is None else cuda_graph
    # The decode steps in as few host checks of equal length as STEPS_PER_CHECK allows (fewer
    # steps than checks are computed past the end); with a CUDA graph in at least two, so that
    # the graph captured after the first, eager, check is replayed.
    steps = max(1, max_new_tokens - 1)
    checks = max(-(-steps // STEPS_PER_CHECK), 2 if graph and steps > 1 else 1)
    engine = FastEngine(model, TokenIdsOnly(pad_token_id), policy, len(prompts), steps_per_check=-(-steps // checks),
                        prefill_tokens=prefill_rows * max(len(p) for p in prompts), cuda_graph=graph,
                        use_kernels=use_kernels, eos=eos_token_ids)
    done = engine.run(prompts, [Sampling(max_new_tokens=max_new_tokens)] * len(prompts))
    return FastGeneration([c.token_ids for c in done], engine.stats["prefill_s"], engine.stats["decode_s"],
                          engine.cache.kv_bytes())
