"""How far a small KV cache moves the model from the full cache, on the same text.

Along the full cache's greedy continuation (teacher-forced), compare the next-token
distributions: KL(full || small) and whether the small cache's greedy token is the same. Neither
needs a reference summary, and both separate policies with far fewer articles than ROUGE.
Prompts go in batches of similar lengths (`by_length`, `in_batches`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine import Sampling
from h2o.engine.reference.generation import Decoder, Eviction, generate
from h2o.serve import helm_io


@dataclass(frozen=True)
class Fidelity:
    """Per continuation token: KL(full || small) in nats, and whether the greedy tokens agree."""

    kl: list[float]
    agree: list[bool]

    @property
    def mean_kl(self) -> float:
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def agreement(self) -> float:
        return sum(self.agree) / len(self.agree) if self.agree else 1.0


def _teacher_forced(
    model: PreTrainedModel, prompts: list[list[int]], continuations: list[list[int]], eviction: Eviction | None
) -> list[torch.Tensor]:
    """Next-token log-probabilities along each continuation, (len(continuation), vocab) per
    prompt, with every prompt in one batch (rows past their continuation are fed padding)."""
    decoder = Decoder(model, prompts, eviction)
    steps = [decoder.prefill()]
    for t in range(max(len(c) for c in continuations) - 1):
        forced = torch.tensor([c[t] if t < len(c) - 1 else 0 for c in continuations])
        steps.append(decoder.step(forced))
    logprobs = torch.stack(steps, dim=1).log_softmax(-1)
    return [logprobs[row, : len(c)] for row, c in enumerate(continuations)]


@torch.inference_mode()
def full_reference(
    model: PreTrainedModel, prompts: list[list[int]], continuations: list[list[int]]
) -> list[torch.Tensor]:
    """The full cache's log-probabilities along the continuations, to compare several caches with."""
    return _teacher_forced(model, prompts, continuations, None)


@torch.inference_mode()
def against_full(
    model: PreTrainedModel,
    prompts: list[list[int]],
    continuations: list[list[int]],
    eviction: Eviction,
    reference: list[torch.Tensor] | None = None,
) -> list[Fidelity]:
    """Teacher-force each continuation (the full cache's greedy tokens) through both caches, one
    batch for all prompts; `reference` (from `full_reference`) saves recomputing the full cache."""
    if len(prompts) != len(continuations):
        raise ValueError("one continuation per prompt")
    kept = [row for row, c in enumerate(continuations) if c]
    results = [Fidelity([], []) for _ in prompts]
    if not kept:
        return results
    pick = lambda items: [items[row] for row in kept]  # noqa: E731
    if reference is None:
        reference = full_reference(model, pick(prompts), pick(continuations))
    else:
        reference = pick(reference)
    compressed = _teacher_forced(model, pick(prompts), pick(continuations), eviction)
    for row, full, small in zip(kept, reference, compressed):
        kl = (full.exp() * (full - small)).sum(-1).clamp(min=0)
        agree = small.argmax(-1) == torch.tensor(continuations[row], device=small.device)
        results[row] = Fidelity(kl.tolist(), agree.tolist())
    return results


def by_length(prompts: list[list[int]], size: int) -> list[list[int]]:
    """The prompts' indices in batches of `size`, shortest first: batches of similar lengths waste
    little on padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def in_batches(batches: list[list[int]], compute: Callable[[list[int]], list]) -> list:
    """`compute(rows)` for each batch of article indices; the results back in article order."""
    results = [None] * sum(len(rows) for rows in batches)
    for rows in batches:
        for i, value in zip(rows, compute(rows)):
            results[i] = value
    return results


def greedy_continuations(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, requests: list[helm_io.Request],
                         prompts: list[list[int]], batches: list[list[int]]) -> list[list[int]]:
    """The full cache's greedy token ids for each prompt, up to the request's length and stops."""
    return in_batches(batches, lambda rows: [c.token_ids for c in generate(
        model, tokenizer, [prompts[i] for i in rows],
        [Sampling(max_new_tokens=requests[i].max_tokens, stop=requests[i].stop) for i in rows])])
