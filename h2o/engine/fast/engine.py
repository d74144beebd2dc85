"""The fast engine: HELM requests served on a `FastCache` with continuous batching.

`rows` sequences decode at once. Every `steps_per_check` steps the host reads what the rows
chose (one copy), hands it to each request's `Transcript` (end of text, stop sequences,
max_tokens), and gives the rows that finished to the next requests: their prompts are prefilled
into those rows' slots while the other rows keep theirs, so a batch never waits for its longest
member. Free rows wait until a quarter of the rows is free (or every request left fits): a
prefill of one or two prompts would leave a GPU's matrix units mostly idle.
Between two checks the rows decode without the host: on CUDA those `steps_per_check` steps
(model, eviction and the choice of tokens, `h2o.engine.sampling`) are one captured CUDA graph.

Requests are taken shortest prompt first, so the slots (sized by the largest budget admitted so
far) grow a few times instead of being sized for the longest prompt from the start; the graph is
captured again after each growth. A finished row may decode a few tokens past its end before the
next check: they are computed and thrown away, and its state is never read again.

The full cache is the same machinery with no heavy hitters and a window of prompt + max_tokens:
nothing is ever evicted, so full, h2o and local run on the same code.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.decoding import left_pad
from h2o.engine.fast.slots import ATTENTION, FastCache
from h2o.engine.kv_report import kv_bytes_per_token, kv_report
from h2o.engine.sampling import Choice, Sampler, Sampling
from h2o.engine.transcript import Completion, Transcript, eos_ids
from h2o.policies import Budget, Policy, make_policy

# Tokens per prefill forward (rows x padded length): large enough to keep a GPU's matrix units
# busy on short prompts, small enough that one layer's full-length keys stay modest.
PREFILL_TOKENS = 32768
STEPS_PER_CHECK = 16
ADMIT_EVERY = 4  # admit once this fraction (1 / ADMIT_EVERY) of the rows is free
IDLE = Budget(heavy=0, recent=1)  # a row with no request: holds its newest token only


@dataclass
class _Request:
    index: int
    prompt: list[int]
    sampling: Sampling
    budget: Budget
    transcript: Transcript
    started: float = 0.0


class FastEngine:
    """Serves a list of requests on one model; `run()` returns their completions in input order.
    `policy` None is the full cache. `eos`: the end-of-text token ids (default: the model's and
    the tokenizer's)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        policy: Policy | None,
        rows: int,
        *,
        steps_per_check: int = STEPS_PER_CHECK,
        prefill_tokens: int = PREFILL_TOKENS,
        cuda_graph: bool | None = None,
        use_kernels: bool | None = None,
        eos: Iterable[int] | None = None,
    ) -> None:
        if rows < 1:
            raise ValueError("rows must be at least 1")
        self.model, self.tokenizer, self.policy, self.rows = model, tokenizer, policy, rows
        self.steps_per_check, self.prefill_tokens = steps_per_check, prefill_tokens
        self.device = model.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.use_kernels = use_kernels
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
        requests = [
            _Request(i, p, s, self.budget(p, s), Transcript(self.tokenizer, s, self.eos))
            for i, (p, s) in enumerate(zip(prompts, sampling))
        ]
        rows = min(self.rows, len(requests))
        self._start(rows, requests)
        # Wall seconds in prefills and in decode chunks (each ends with a host sync), and tokens.
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "prompt_tokens": 0, "padded_tokens": 0,
                      "chunks": 0, "captures": 0}
        pending = deque(sorted(requests, key=lambda r: len(r.prompt)))
        serving: list[_Request | None] = [None] * rows
        done: dict[int, Completion] = {}
        while pending or any(serving):
            free = [row for row, r in enumerate(serving) if r is None]
            # Free rows wait for company (a quarter of the rows, or every request left): a
            # prefill of a few prompts would leave the GPU's matrix units idle.
            if pending and len(free) >= max(1, min(len(pending), rows // ADMIT_EVERY)):
                # In input order: where every request fits at once, row i serves request i.
                admitted = sorted((pending.popleft() for _ in free[: len(pending)]), key=lambda r: r.index)
                for row, request in zip(free, admitted):
                    serving[row] = request
                self._admit(free[: len(admitted)], admitted, serving, done)
                continue  # a request may end at its first token: fill its row again first
            self._decode(serving, done)
        return [done[i] for i in range(len(requests))]

    def _start(self, rows: int, requests: list[_Request]) -> None:
        policy = self.policy or make_policy("h2o", 0.0, 1.0)  # never over budget: keeps everything
        has_heavy = any(r.budget.heavy > 0 for r in requests)
        self.cache = FastCache(policy, self.model.config.num_hidden_layers, [], self.device, self.use_kernels,
                               budgets=[IDLE] * rows, has_heavy=has_heavy)
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
        capacity = self.cache.capacity
        self.cache.assign(rows, [r.budget for r in admitted])
        if self.cache.capacity != capacity:
            self.graph, self.eager_chunks = None, 0  # the slots moved: settle, then capture again
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
