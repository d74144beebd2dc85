"""How far a small KV cache moves the model from the full cache, on the same text.

Along the full cache's greedy continuation (teacher-forced), compare the next-token
distributions: KL(full || small) and whether the small cache's greedy token is the same. Neither
needs a reference summary, and both separate policies with far fewer articles than ROUGE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from h2o.generation import Decoder, Eviction


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


@torch.inference_mode()
def against_full(
    model: PreTrainedModel, prompt: list[int], continuation: list[int], eviction: Eviction
) -> Fidelity:
    """Teacher-force `continuation` (the full cache's greedy tokens) through both caches."""
    if not continuation:
        return Fidelity([], [])
    full = Decoder(model, [prompt], None)
    small = Decoder(model, [prompt], eviction)
    full_logits, small_logits = [full.prefill()], [small.prefill()]
    for token in continuation[:-1]:
        forced = torch.tensor([token])
        full_logits.append(full.step(forced))
        small_logits.append(small.step(forced))
    reference = torch.cat(full_logits).log_softmax(-1)
    compressed = torch.cat(small_logits).log_softmax(-1)
    kl = (reference.exp() * (reference - compressed)).sum(-1).clamp(min=0)
    agree = compressed.argmax(-1) == torch.tensor(continuation, device=compressed.device)
    return Fidelity(kl.tolist(), agree.tolist())
