"""The reference engine behind the `Engine` interface: requests sorted by prompt length (batches of
similar lengths waste less on padding), each batch generated in lock step by `generate`."""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.interface import EngineOptions, OnDone
from h2o.engine.reference.generation import Eviction, generate
from h2o.engine.sampling import Sampling
from h2o.engine.transcript import Completion
from h2o.policies import Policy


class ReferenceEngine:
    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, policy: Policy | None,
                 options: EngineOptions) -> None:
        if options.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, options.batch_size
        self.eviction = Eviction(policy, options.kv_mode, options.attention) if policy is not None else None
        self.stats: dict[str, float] = {}

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], sampling: list[Sampling], on_done: OnDone | None = None) -> list[Completion]:
        """Completions in input order. A request's latency is its batch's wall time: its result
        exists when the batch ends."""
        if len(prompts) != len(sampling):
            raise ValueError("one Sampling per prompt")
        done: dict[int, Completion] = {}
        by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(by_length), self.batch_size):
            rows = by_length[start : start + self.batch_size]
            began = time.perf_counter()
            completions = generate(self.model, self.tokenizer, [prompts[i] for i in rows], [sampling[i] for i in rows],
                                   self.eviction, self.stats)
            seconds = time.perf_counter() - began
            for i, completion in zip(rows, completions):
                completion.seconds = seconds
                done[i] = completion
                if on_done is not None:
                    on_done(i, completion)
        return [done[i] for i in range(len(prompts))]
