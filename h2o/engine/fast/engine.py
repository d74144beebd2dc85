"""The fast engine: HELM requests served on a `FastCache` with continuous batching.

`rows` sequences decode at once. Every `steps_per_check` steps the host reads what the rows
chose (one copy), hands it to each request's `Transcript` (end of text, stop sequences,
max_tokens), and gives the rows that finished to the next requests: their prompts are prefilled
into those rows' slots while the other rows keep theirs, so a batch never waits for its longest
member. A request starts when a row and the blocks its budget needs (`h2o.engine.fast.blocks`)
are free, and gives both back when it ends. Free rows wait until a quarter of the rows is free
(or every request left fits): a prefill of one or two prompts would leave a GPU's matrix units
mostly idle.
Between two checks the rows decode without the host: on CUDA those `steps_per_check` steps
(model, eviction and the choice of tokens, `h2o.engine.sampling`) are one captured CUDA graph.

The KV memory is one pool of blocks, sized once at `run()`: on CUDA what `gpu_memory_fraction`
of the card leaves (`blocks.pool_size`), on the CPU room for `rows` requests of the largest
budget. The block table changes in place, so the graph is captured once. A finished row may decode a few tokens past its end before the
next check: they are computed and thrown away, and its state is never read again.

The full cache is the same machinery with no heavy hitters and a window of prompt + max_tokens:
nothing is ever evicted, so full, h2o and local run on the same code.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.decoding import left_pad
from h2o.engine.fast import blocks
from h2o.engine.fast.slots import ATTENTION, BLOCK_SIZE, FastCache
from h2o.engine.kv_report import kv_bytes_per_token, kv_heads_and_size, kv_report
from h2o.engine.sampling import Choice, Sampler, Sampling
from h2o.engine.transcript import Completion, Transcript, eos_ids
from h2o.policies import Budget, Policy, make_policy

# Tokens per prefill forward (rows x padded length): large enough to keep a GPU's matrix units
# busy on short prompts, small enough that one layer's full-length keys stay modest.
PREFILL_TOKENS = 32768
STEPS_PER_CHECK = 16
ADMIT_EVERY = 4  # admit once this fraction (1 / ADMIT_EVERY) of the rows is free
IDLE = Budget(heavy=0, recent=1)  # a row with no request: holds no blocks
# Device memory kept out of the pool for the prefill's activations, per prefill token and per
# unit of the model's widest layer (hidden or intermediate size), in bytes of its dtype: a
# slice's hidden states, MLP intermediates, one layer's full-length keys and values.
ACTIVATION_FACTOR = 8


def card_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of `device`'s card as this process may use them: within the cap of
    torch.cuda.set_per_process_memory_fraction, which mem_get_info does not see. None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cap = int(total * torch.cuda.get_per_process_memory_fraction(device))
    return min(free, cap - torch.cuda.memory_reserved(device)), min(total, cap)


@dataclass
class _Request:
    index: int
    prompt: list[int]
    sampling: Sampling
    budget: Budget
    transcript: Transcript
    slots: list[int]  # held in each layer
    blocks: int  # taken from the pool, all layers
    started: float = 0.0


class FastEngine:
    """Serves a list of requests on one model; `run()` returns their completions in input order.
    `policy` None is the full cache. `eos`: the end-of-text token ids (default: the model's and
    the tokenizer's). `rows` None: as many as the pool holds requests of the smallest budget.
    `gpu_memory_fraction`: of the card's memory, what weights, activations and the pool may
    take (CUDA; elsewhere the pool holds `rows` requests of the largest budget)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        policy: Policy | None,
        rows: int | None,
        *,
        steps_per_check: int = STEPS_PER_CHECK,
        prefill_tokens: int = PREFILL_TOKENS,
        cuda_graph: bool | None = None,
        use_kernels: bool | None = None,
        eos: Iterable[int] | None = None,
        gpu_memory_fraction: float = 0.9,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if rows is not None and rows < 1:
            raise ValueError("rows must be at least 1")
        self.model, self.tokenizer, self.policy, self.rows = model, tokenizer, policy, rows
        self.steps_per_check, self.prefill_tokens = steps_per_check, prefill_tokens
        self.device = model.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.use_kernels = use_kernels
        self.gpu_memory_fraction, self.block_size = gpu_memory_fraction, block_size
        # Layer budgets of every row, the full cache's too (never over budget: keeps everything).
        self.cache_policy = policy or make_policy("h2o", 0.0, 1.0)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = eos_ids(model, tokenizer) if eos is None else set(eos)

    @staticmethod
    def serves(policy: Policy) -> bool:
        """Whether the engine implements this policy (any that keeps `Policy.select`)."""
        return policy.uses_base_selection()

    def budget(self, prompt: list[int], sampling: Sampling) -> Budget:
        if self.policy is None:
            return Budget(heavy=0, recent=len(prompt) + sampling.max_new_tokens)
        return self.policy.budget(len(prompt))

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], sampling: list[Sampling],
            on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Completions in input order; `on_done(index, completion)` hears of each as it ends."""
        self.on_done = on_done
        if len(prompts) != len(sampling):
            raise ValueError("one Sampling per prompt")
        requests = []
        for i, (p, s) in enumerate(zip(prompts, sampling)):
            budget = self.budget(p, s)
            slots = blocks.row_slots(self.cache_policy.layer_budgets(budget, self.model.config.num_hidden_layers))
            requests.append(_Request(i, p, s, budget, Transcript(self.tokenizer, s, self.eos), slots,
                                     blocks.blocks_for(slots, self.block_size)))
        needs = [r.blocks for r in requests]
        num_blocks = self._pool_blocks(len(requests) if self.rows is None else self.rows, max(needs))
        rows = min(len(requests), self.rows or (num_blocks - 1) // min(needs))
        num_blocks = min(num_blocks, 1 + rows * max(needs))  # more than `rows` requests can use is idle
        self._start(rows, requests, num_blocks)
        # Wall seconds in prefills and in decode chunks (each ends with a host sync), and tokens.
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0, "padded_tokens": 0,
                      "chunks": 0, "captures": 0}
        pending = deque(sorted(requests, key=lambda r: len(r.prompt)))
        serving: list[_Request | None] = [None] * rows
        done: dict[int, Completion] = {}
        while pending or any(serving):
            free = [row for row, r in enumerate(serving) if r is None]
            # As many of the next requests as free rows and free blocks hold.
            fits, spare = 0, self.cache.pool.free_count
            for request in islice(pending, len(free)):
                spare -= request.blocks
                if spare < 0:
                    break
                fits += 1
            # Free rows wait for company (a quarter of the rows, or every request left): a
            # prefill of a few prompts would leave the GPU's matrix units idle; with no row
            # serving, nothing would free more.
            if fits and (fits >= max(1, min(len(pending), rows // ADMIT_EVERY)) or not any(serving)):
                # In input order: where every request fits at once, row i serves request i.
                admitted = sorted((pending.popleft() for _ in range(fits)), key=lambda r: r.index)
                for row, request in zip(free, admitted):
                    serving[row] = request
                self._admit(free[: len(admitted)], admitted, serving, done)
                continue  # a request may end at its first token: fill its row again first
            self._decode(serving, done)
        return [done[i] for i in range(len(requests))]

    def _pool_blocks(self, rows: int, request_blocks: int) -> int:
        """Blocks of the pool (the null block among them): on CUDA what `gpu_memory_fraction`
        of the card leaves (within a per-process cap, which mem_get_info does not see), else
        room for `rows` requests of `request_blocks`."""
        memory = card_memory(self.device)
        if memory is None:
            return 1 + rows * request_blocks
        free, total = memory
        config = self.model.config
        kv_heads, head_dim = kv_heads_and_size(config)
        size = self.model.dtype.itemsize
        widest = max(config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
        reserve = self.prefill_tokens * widest * size * ACTIVATION_FACTOR
        return blocks.pool_size(free, total, self.gpu_memory_fraction,
                                blocks.block_bytes(kv_heads, self.block_size, head_dim, size), reserve, request_blocks)

    def _start(self, rows: int, requests: list[_Request], num_blocks: int) -> None:
        has_heavy = any(r.budget.heavy > 0 for r in requests)
        max_blocks = max(max(blocks.layer_blocks(r.slots, self.block_size)) for r in requests)
        self.cache = FastCache(self.cache_policy, self.model.config.num_hidden_layers, [], self.device,
                               self.use_kernels, budgets=[IDLE] * rows, has_heavy=has_heavy, num_blocks=num_blocks,
                               max_blocks=max_blocks, block_size=self.block_size)
        self.sampler = Sampler(rows, self.device, max(r.sampling.top_logprobs for r in requests),
                               any(r.sampling.top_k > 0 or r.sampling.top_p < 1 for r in requests))
        self.next_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.steps = torch.zeros(rows, dtype=torch.long, device=self.device)
        c, k = self.steps_per_check, self.sampler.top
        self.history = Choice(
            torch.zeros(rows, c, dtype=torch.long, device=self.device),
            torch.zeros(rows, c, dtype=torch.float32, device=self.device),
            torch.zeros(rows, c, k, dtype=torch.float32, device=self.device),
            torch.zeros(rows, c, k, dtype=torch.long, device=self.device),
        )
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_chunks = 0

    def _admit(self, rows: list[int], admitted: list[_Request], serving: list, done: dict) -> None:
        """Prefill the admitted requests into their rows and take each one's first token."""
        now = began = time.perf_counter()
        for request in admitted:
            request.started = now
        self.cache.assign(rows, [r.budget for r in admitted])
        self.model.set_attn_implementation(ATTENTION)
        order = sorted(range(len(rows)), key=lambda i: len(admitted[i].prompt))
        logits = torch.empty(len(rows), self.model.config.vocab_size, device=self.device)
        # Every host-to-device copy before the first forward: a copy from pageable memory waits
        # for the GPU, and one between two slices would leave it idle while the next is launched.
        slices = []
        for group in self._slices([admitted[i] for i in order]):
            picked = [order[i] for i in group]
            prompts = [admitted[i].prompt for i in picked]
            unpadded = len({len(p) for p in prompts}) == 1
            slices.append(([rows[i] for i in picked], left_pad(prompts, self.pad, self.device), unpadded,
                           torch.tensor(picked, device=self.device)))
        index = torch.tensor(rows, device=self.device)
        lengths = torch.tensor([len(r.prompt) for r in admitted], device=self.device)
        for slice_rows, (ids, valid, positions), unpadded, picked in slices:
            self.stats["padded_tokens"] += ids.numel()
            self.cache.begin_prefill(slice_rows, positions, valid, unpadded)
            out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, eviction_cache=self.cache,
                             use_cache=True, logits_to_keep=1).logits[:, -1]
            logits[picked] = out.float()
        self.sampler.assign(rows, [r.sampling for r in admitted])
        choice = self.sampler.choose(logits, torch.zeros(len(rows), dtype=torch.long, device=self.device), index)
        self.next_ids[index, 0] = choice.tokens
        self.positions[index, 0] = lengths
        self.steps[index] = 1
        tokens, chosen, top_values, top_ids = choice.tolist()
        self.stats["prefill_s"] += time.perf_counter() - began
        self.stats["prompt_tokens"] += sum(len(r.prompt) for r in admitted)
        for i, (row, request) in enumerate(zip(rows, admitted)):
            if request.transcript.add(tokens[i], chosen[i], top_values[i], top_ids[i]):
                self._finish(row, serving, done)

    def _slices(self, requests: list[_Request]) -> list[list[int]]:
        """Groups of (length-sorted) requests whose padded prefill fits `prefill_tokens`."""
        groups, group = [], []
        for i, request in enumerate(requests):
            if group and (len(group) + 1) * len(request.prompt) > self.prefill_tokens:
                groups.append(group)
                group = []
            group.append(i)
        return groups + [group] if group else groups

    def _step(self, column: int) -> None:
        self.cache.begin_decode(self.positions)
        logits = self.model(input_ids=self.next_ids, position_ids=self.positions, cache=self.cache,
                            eviction_cache=self.cache, use_cache=True).logits[:, -1]
        choice = self.sampler.choose(logits, self.steps)
        for kept, new in zip(self.history.tensors(), choice.tensors()):
            kept[:, column] = new
        self.next_ids[:, 0] = choice.tokens
        self.positions.add_(1)
        self.steps.add_(1)

    def _chunk(self) -> None:
        for column in range(self.steps_per_check):
            self._step(column)

    @torch.inference_mode()
    def advance(self) -> None:
        """`steps_per_check` decode steps for every row, left on the device (no host sync): the
        CUDA graph where there is one, else eager. Benchmarks time it on the state a `run` left."""
        self.model.set_attn_implementation(ATTENTION)
        if self.graph is not None:
            self.graph.replay()
        elif self.cuda_graph and self.eager_chunks > 0:
            # One eager chunk since the last (re)allocation compiled the kernels and settled the
            # allocations; capturing runs nothing, so replay at once.
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._chunk()
            self.graph.replay()
            self.stats["captures"] += 1
        else:
            self._chunk()
            self.eager_chunks += 1

    def _decode(self, serving: list, done: dict) -> None:
        """`steps_per_check` steps for every row, then hand each request its tokens."""
        began = time.perf_counter()
        self.advance()
        history = self.history.tolist()
        self.stats["decode_s"] += time.perf_counter() - began
        self.stats["chunks"] += 1
        for row, request in enumerate(serving):
            if request is None:
                continue
            tokens, chosen, top_values, top_ids = (h[row] for h in history)
            for column in range(self.steps_per_check):
                if request.transcript.add(tokens[column], chosen[column], top_values[column], top_ids[column]):
                    self._finish(row, serving, done)
                    break

    def _finish(self, row: int, serving: list, done: dict) -> None:
        request = serving[row]
        serving[row] = None
        self.cache.release(row)
        completion = request.transcript.finish()
        completion.kv_cache = kv_report("fast", self.model, len(request.prompt), len(request.transcript.ids),
                                        policy=self.policy, budget=request.budget, peak_bytes=self._peak_bytes(request))
        completion.seconds = time.perf_counter() - request.started
        done[request.index] = completion
        if self.on_done is not None:
            self.on_done(request.index, completion)

    def _peak_bytes(self, request: _Request) -> int:
        """KV bytes at the row's peak: its own slots in every layer, at the moment one layer
        holds its whole prompt."""
        n, slots, layers = len(request.prompt), request.budget.total + 1, self.model.config.num_hidden_layers
        return (slots * layers + max(0, n - slots)) * kv_bytes_per_token(self.model) // layers
