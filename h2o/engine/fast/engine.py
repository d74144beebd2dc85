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
of the card leaves once the weights and the activations are counted out (`blocks.pool_size`;
the activations measured, as vLLM's profile run does, on a probe prefill of the longest prompt
and one decode step), on the CPU room for `rows` requests of the largest budget. Out of memory
anyway (another process took some), the engine backs off: a failed prefill's requests wait and
later prefills come in smaller slices and fewer rows; a failed decode chunk sends every row's
request back to wait, to be served again from its prompt (a request's tokens depend on its seed
alone), on half the rows. After `GROW_AFTER` clean steps (twice as many after each back-off)
the prefill's limits double again, up to where they began. Only out of memory for one request
alone is raised.

The block table changes in place, so the graph is captured once (again only after a decode
back-off). A finished row may decode a few tokens past its end before the next check: they are
computed and thrown away, and its state is never read again.

The full cache is the same machinery with no heavy hitters and a window of prompt + max_tokens:
nothing is ever evicted, so full, h2o and local run on the same code.
"""

from __future__ import annotations

import logging
import math
import statistics
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
# The probe prefill's tokens, at most: enough rows of the longest prompt to show the cost per token.
PROBE_TOKENS = 4096
# Of the card's room beside the weights, the share a prefill slice's activations may take; the
# KV pool takes the rest. On a large card slices stop at `prefill_tokens` well before it.
PREFILL_SHARE = 0.2
# Measured activations times this: the caching allocator rounds and fragments.
ACTIVATION_MARGIN = 1.25
# Clean admissions and decode chunks after an out-of-memory back-off before the limits double;
# twice as many after each back-off, so that memory that stays short is not retried forever.
GROW_AFTER = 8

log = logging.getLogger(__name__)


def card_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of `device`'s card as this process may use them: within the cap of
    torch.cuda.set_per_process_memory_fraction, which mem_get_info does not see. None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cap = int(total * torch.cuda.get_per_process_memory_fraction(device))
    return min(free, cap - torch.cuda.memory_reserved(device)), min(total, cap)


def peak_bytes(device: torch.device, work: Callable[[], None]) -> int:
    """Device bytes that `work` holds at its peak beyond what was allocated before it (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    work()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


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
    the tokenizer's). `rows` None: as many as the pool holds requests of the median budget.
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
        self.slice_tokens = self.prefill_tokens
        num_blocks = self._pool_blocks(requests, len(requests) if self.rows is None else self.rows)
        # Auto: as many rows as the pool holds requests of the median need. Every row decodes at
        # every step, busy or not, so rows that only the shortest requests could fill would cost
        # compute for most of the run.
        rows = min(len(requests), self.rows or max(1, (num_blocks - 1) // statistics.median_low(needs)))
        num_blocks = min(num_blocks, 1 + rows * max(needs))  # more than `rows` requests can use is idle
        self.requests = requests
        self._start(rows, requests, num_blocks)
        # Wall seconds in prefills and in decode chunks (each ends with a host sync), and tokens.
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0, "padded_tokens": 0,
                      "chunks": 0, "captures": 0, "backoffs": 0, "rows": rows, "steps": 0,
                      "busy_row_steps": 0}
        self.row_cap, self.full_slice, self.calm, self.grow_after = rows, self.slice_tokens, 0, GROW_AFTER
        pending = deque(sorted(requests, key=lambda r: len(r.prompt)))
        serving: list[_Request | None] = [None] * rows
        done: dict[int, Completion] = {}
        while pending or any(serving):
            free = [row for row, r in enumerate(serving) if r is None]
            # As many of the next requests as free rows (within the cap) and free blocks hold.
            fits, spare = 0, self.cache.pool.free_count
            for request in islice(pending, max(0, self.row_cap - (len(serving) - len(free)))):
                spare -= request.blocks
                if spare < 0:
                    break
                fits += 1
            # Free rows wait for company (a quarter of the rows, or every request left): a
            # prefill of a few prompts would leave the GPU's matrix units idle; with no row
            # serving, nothing would free more.
            if fits and (fits >= max(1, min(len(pending), self.row_cap // ADMIT_EVERY)) or not any(serving)):
                # In input order: where every request fits at once, row i serves request i.
                admitted = sorted((pending.popleft() for _ in range(fits)), key=lambda r: r.index)
                for row, request in zip(free, admitted):
                    serving[row] = request
                try:
                    self._admit(free[: len(admitted)], admitted, serving, done)
                except torch.OutOfMemoryError:
                    if not self._back_off(serving, pending, admitted, prefill=True):
                        raise
                    continue
                self._calm()
                continue  # a request may end at its first token: fill its row again first
            try:
                self._decode(serving, done)
            except torch.OutOfMemoryError:
                if not self._back_off(serving, pending, [r for r in serving if r is not None], prefill=False):
                    raise
                serving = [None] * self.cache.batch
                continue
            self._calm()
        return [done[i] for i in range(len(requests))]

    def _back_off(self, serving: list, pending: deque, waiting: list[_Request], prefill: bool) -> bool:
        """Out of memory in a prefill or a decode step: the `waiting` requests give their rows
        back and wait again (to be served from their prompts). After a prefill, later
        slices are half as long and at most half as many rows take requests; after a decode step
        (whose activations grow with the rows, and are held once its graph is captured) the
        engine goes on with half the rows. False where nothing smaller is left to try: one
        request alone, in a slice or a row of its own."""
        waiting_ids = {id(r) for r in waiting}
        if prefill:
            alone = len(waiting) == 1 and all(r is None or id(r) in waiting_ids for r in serving)
            if alone and self.slice_tokens <= len(waiting[0].prompt):
                return False
        elif self.cache.batch == 1:
            return False
        self.stats["backoffs"] += 1
        self.calm, self.grow_after = 0, 2 * self.grow_after
        for row, request in enumerate(serving):
            if request is not None and id(request) in waiting_ids:
                serving[row] = None
                self.cache.release(row)
                request.transcript = Transcript(self.tokenizer, request.sampling, self.eos)
        pending.extendleft(sorted(waiting, key=lambda r: len(r.prompt), reverse=True))
        if prefill:
            self.slice_tokens = max(1, self.slice_tokens // 2)
            self.row_cap = max(1, self.row_cap // 2)
        else:
            rows = self.cache.batch // 2
            del self.cache, self.graph  # the old rows' memory goes before the new rows take theirs
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not prefill:
            self._start(rows, self.requests, self.num_blocks)
            self.row_cap = min(self.row_cap, rows)
        log.warning("out of memory in %s: %d requests wait again; %d rows, at most %d taking requests, prefill "
                    "slices of %d tokens from now on (the last two grow back after %d clean steps)",
                    "a prefill" if prefill else "a decode step",
                    len(waiting), self.cache.batch, self.row_cap, self.slice_tokens, self.grow_after)
        return True

    def _calm(self) -> None:
        """One clean admission or decode chunk: after `grow_after` of them the limits double, up
        to where they began."""
        self.calm += 1
        if self.calm >= self.grow_after and (self.row_cap < self.cache.batch or self.slice_tokens < self.full_slice):
            self.row_cap = min(self.cache.batch, 2 * self.row_cap)
            self.slice_tokens = min(self.full_slice, 2 * self.slice_tokens)
            self.calm = 0

    def _pool_blocks(self, requests: list[_Request], rows: int) -> int:
        """Blocks of the pool (the null block among them): on CUDA what `gpu_memory_fraction`
        of the card leaves (within a per-process cap, which mem_get_info does not see) beside
        the activations of a prefill slice and of the decoding rows, else room for `rows`
        requests of the largest. Sets `slice_tokens`, a prefill slice's tokens."""
        needs = [r.blocks for r in requests]
        if card_memory(self.device) is None:
            return 1 + rows * max(needs)
        longest = max(len(r.prompt) for r in requests)
        per_token, per_row = (ACTIVATION_MARGIN * b for b in self._activations(requests, longest))
        free, total = card_memory(self.device)  # after the probe: its kernels' workspaces are in use
        room = int(total * self.gpu_memory_fraction) - (total - free)
        # A request's prompt is never split: a slice holds the longest at least.
        self.slice_tokens = max(longest, min(self.prefill_tokens, int(PREFILL_SHARE * room / max(per_token, 1))))
        kv_heads, head_dim = kv_heads_and_size(self.model.config)
        per_block = blocks.block_bytes(kv_heads, self.block_size, head_dim, self.model.dtype.itemsize)
        # A decoding row's activations, charged to the blocks of the smallest request.
        per_block += math.ceil(per_row / min(needs))
        return blocks.pool_size(free, total, self.gpu_memory_fraction, per_block, int(self.slice_tokens * per_token),
                                max(needs))

    def _activations(self, requests: list[_Request], longest: int) -> tuple[float, float]:
        """Device bytes beyond the weights and the pool per prefill token and per decoding row,
        measured on a prefill of a few rows of the longest prompt, then one decode step and its
        choice, each row with the smallest request's budget."""
        rows = max(1, min(len(requests), PROBE_TOKENS // longest))
        small = min(requests, key=lambda r: r.blocks)
        cache = FastCache(self.cache_policy, self.model.config.num_hidden_layers, [], self.device, self.use_kernels,
                          budgets=[small.budget] * rows, has_heavy=any(r.budget.heavy > 0 for r in requests))
        sampler = Sampler(rows, self.device, max(r.sampling.top_logprobs for r in requests),
                          any(r.sampling.top_k > 0 or r.sampling.top_p < 1 for r in requests))
        sampler.assign(list(range(rows)), [small.sampling] * rows)
        ids = torch.full((rows, longest), self.pad, dtype=torch.long, device=self.device)
        positions = torch.arange(longest, device=self.device).repeat(rows, 1)
        step = positions[:, -1:] + 1

        def prefill() -> None:
            cache.begin_prefill(slice(0, rows), positions, torch.ones_like(ids, dtype=torch.bool), True)
            self.model(input_ids=ids, position_ids=positions, cache=cache, eviction_cache=cache, use_cache=True,
                       logits_to_keep=1)

        def decode() -> None:
            cache.begin_decode(step)
            logits = self.model(input_ids=ids[:, :1], position_ids=step, cache=cache, eviction_cache=cache,
                                use_cache=True).logits[:, -1]
            sampler.choose(logits, torch.ones(rows, dtype=torch.long, device=self.device))

        self.model.set_attn_implementation(ATTENTION)
        prefill_bytes = peak_bytes(self.device, prefill) - sum(t.nbytes for t in cache.blocks.values())
        decode_bytes = peak_bytes(self.device, decode)
        del cache, sampler
        torch.cuda.empty_cache()
        return max(0, prefill_bytes) / (rows * longest), max(0, decode_bytes) / rows

    def _start(self, rows: int, requests: list[_Request], num_blocks: int) -> None:
        self.num_blocks = num_blocks
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
        """Groups of (length-sorted) requests whose padded prefill fits `slice_tokens`."""
        groups, group = [], []
        for i, request in enumerate(requests):
            if group and (len(group) + 1) * len(request.prompt) > self.slice_tokens:
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
        self.stats["steps"] += self.steps_per_check
        self.stats["busy_row_steps"] += self.steps_per_check * sum(r is not None for r in serving)
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
