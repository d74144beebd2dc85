"""Greedy batched generation over a `FastCache`: prefill in slices, then one decode step that a
CUDA graph captures once and replays until the end."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from h2o.engine.fast.slots import ATTENTION, FastCache
from h2o.engine.reference.generation import left_pad
from h2o.policies import Policy

# How often (in steps) the decode loop looks whether every row has ended: each look waits for
# the GPU, so it is rare.
EOS_CHECK_EVERY = 16


class FastDecoder:
    """Forward passes for one batch: `prefill()` once, then `step()` per new token. After one
    eager step, `capture()` records the step (model, eviction, greedy choice) as a CUDA graph
    and later steps replay it: no Python and no kernel launches on the way."""

    def __init__(
        self,
        model: PreTrainedModel,
        prompts: list[list[int]],
        policy: Policy,
        prefill_rows: int = 8,
        pad_token_id: int = 0,
        use_kernels: bool | None = None,
    ) -> None:
        self.model, self.prompts = model, prompts
        self.prefill_rows, self.pad_token_id = prefill_rows, pad_token_id
        self.device = model.device
        self.cache = FastCache(policy, model.config.num_hidden_layers, [len(p) for p in prompts],
                               self.device, use_kernels)
        # The step's inputs, updated in place: the token just chosen and its position.
        self.next_ids = torch.zeros(len(prompts), 1, dtype=torch.long, device=self.device)
        self.positions = torch.tensor([len(p) for p in prompts], device=self.device)[:, None]
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        """Prefill every prompt, `prefill_rows` at a time; the first new token of each, (B,)."""
        self.model.set_attn_implementation(ATTENTION)
        for start in range(0, len(self.prompts), self.prefill_rows):
            rows = slice(start, min(len(self.prompts), start + self.prefill_rows))
            ids, valid, positions = left_pad(self.prompts[rows], self.pad_token_id, self.device)
            self.cache.begin_prefill(rows, positions, valid)
            logits = self.model(input_ids=ids, position_ids=positions, cache=self.cache,
                                eviction_cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            self.next_ids[rows, 0] = logits.float().argmax(-1)
        return self.next_ids[:, 0]

    def _step(self) -> None:
        self.cache.begin_decode(self.positions)
        logits = self.model(input_ids=self.next_ids, position_ids=self.positions, cache=self.cache,
                            eviction_cache=self.cache, use_cache=True).logits[:, -1]
        self.next_ids.copy_(logits.float().argmax(-1, keepdim=True))
        self.positions.add_(1)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """Feed the tokens just chosen; the next ones, (B,)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.model.set_attn_implementation(ATTENTION)
            self._step()
        return self.next_ids[:, 0]

    @torch.inference_mode()
    def capture(self) -> None:
        """Record the decode step as a CUDA graph. Call after one eager `step()`, which compiles
        the kernels and settles the allocations; capturing runs nothing."""
        self.model.set_attn_implementation(ATTENTION)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph


@dataclass
class FastGeneration:
    """Token ids per prompt (cut before the first end-of-text token), the seconds spent in the
    prefill (first token included) and in the decode steps, and the bytes of the key and value
    slots."""

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

    Same tokens as `h2o.engine.reference.generation.generate` with `Eviction(policy, "drop")` and greedy sampling.
    `prefill_rows` sequences are prefilled at a time (left-padded to the longest among them).
    `cuda_graph` (default: on CUDA) replays a captured decode step."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    decoder = FastDecoder(model, prompts, policy, prefill_rows, pad_token_id, use_kernels)
    device = decoder.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    tokens = torch.zeros(len(prompts), max_new_tokens, dtype=torch.long, device=device)
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)

    _synchronize(device)
    started = time.perf_counter()
    tokens[:, 0] = decoder.prefill()
    _synchronize(device)
    prefilled = time.perf_counter()
    for i in range(1, max_new_tokens):
        if cuda_graph and i == 2:
            decoder.capture()
        tokens[:, i] = decoder.step()
        if eos.numel() and i % EOS_CHECK_EVERY == 0 and bool(torch.isin(tokens[:, : i + 1], eos).any(-1).all()):
            break
    _synchronize(device)
    finished = time.perf_counter()

    out = []
    for row in tokens.tolist():
        ends = [j for j, token in enumerate(row) if token in eos_token_ids]
        out.append(row[: ends[0]] if ends else row)
    return FastGeneration(out, prefilled - started, finished - prefilled, decoder.cache.kv_bytes())
