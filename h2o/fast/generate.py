"""Greedy batched generation over a `FastCache`: prefill in slices, then one captured decode step
replayed until the end."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from h2o.fast.cache import ATTENTION, FastCache
from h2o.policies import Policy

# How often (in steps) the decode loop looks whether every row has ended: each look waits for
# the GPU, so it is rare.
EOS_CHECK_EVERY = 16


@dataclass
class FastGeneration:
    """Token ids per prompt (cut before the first end-of-text token), the seconds spent in the
    prefill (first token included) and in the decode steps, and the KV bytes the slots hold."""

    token_ids: list[list[int]]
    prefill_seconds: float
    decode_seconds: float
    kv_bytes: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
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
    """Greedy continuations of `prompts` (token ids, unpadded, any lengths) under `policy`.

    Same tokens as `h2o.generation.generate` with `Eviction(policy, "drop")` and greedy sampling.
    `prefill_rows` sequences are prefilled at a time (left-padded to the longest among them).
    `cuda_graph` (default: on CUDA) captures the decode step once and replays it."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    device = model.device
    batch = len(prompts)
    cache = FastCache(policy, model.config.num_hidden_layers, [len(p) for p in prompts], device, use_kernels)
    model.set_attn_implementation(ATTENTION)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    tokens = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)

    _synchronize(device)
    started = time.perf_counter()
    for start in range(0, batch, prefill_rows):
        rows = slice(start, min(batch, start + prefill_rows))
        chunk = prompts[rows]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        valid = torch.zeros(len(chunk), width, dtype=torch.bool)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            valid[row, width - len(prompt):] = True
        ids, valid = ids.to(device), valid.to(device)
        positions = (valid.cumsum(-1) - 1).clamp(min=0)
        cache.begin_prefill(rows, positions, valid)
        logits = model(input_ids=ids, position_ids=positions, cache=cache, eviction_cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        tokens[rows, 0] = logits.float().argmax(-1)
    _synchronize(device)
    prefilled = time.perf_counter()

    # Static inputs of the decode step: the token just chosen and its position.
    step_ids = tokens[:, :1].clone()
    step_positions = torch.tensor([len(p) for p in prompts], device=device)[:, None]

    def step() -> None:
        cache.begin_decode(step_positions)
        logits = model(input_ids=step_ids, position_ids=step_positions, cache=cache,
                       eviction_cache=cache, use_cache=True).logits[:, -1]
        step_ids.copy_(logits.float().argmax(-1, keepdim=True))
        step_positions.add_(1)

    graph = None
    eos = torch.tensor(eos_token_ids, device=device)
    for i in range(1, max_new_tokens):
        if graph is not None:
            graph.replay()
        elif cuda_graph and i > 1:
            # Captured after one eager step (which warms up kernels and allocations); capture
            # records without running, so this step still has to be replayed.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
        else:
            step()
        tokens[:, i] = step_ids[:, 0]
        if eos.numel() and i % EOS_CHECK_EVERY == 0 and bool(torch.isin(tokens[:, : i + 1], eos).any(-1).all()):
            break
    _synchronize(device)
    finished = time.perf_counter()

    out = []
    for row in tokens.tolist():
        ends = [j for j, token in enumerate(row) if token in eos_token_ids]
        out.append(row[: ends[0]] if ends else row)
    return FastGeneration(out, prefilled - started, finished - prefilled, cache.kv_bytes())
