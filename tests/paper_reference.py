"""An independent re-statement of the paper's H2O attention (FMInference/H2O,
h2o_hf/utils_hh/modify_llama.py) as an attention function over transformers' full DynamicCache,
for batch size 1 and multi-head models, used only to check mask mode against it.

It keeps the paper's per-layer state (accumulated scores, next-step mask) and applies the same
operations in the same order: budgets from the first pass, scores summed over query rows and
accumulated, the mask for the next step made of the last `recent` columns (the next token's
column among them) plus the top `heavy` scores left of them, and scores zeroed outside the mask
and the last `recent` existing columns.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface, DynamicCache


class PaperState:
    def __init__(self, heavy_ratio: float, recent_ratio: float) -> None:
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.scores = None
        self.next_mask = None

    def step(self, probs: torch.Tensor) -> None:
        current = probs.sum(0).sum(1)  # (heads, keys)
        if self.scores is not None:
            current[:, :-1] += self.scores
        else:
            n = current.shape[-1]
            self.heavy = int(self.heavy_ratio * n)
            self.recent = int(self.recent_ratio * n)
        self.scores = current
        heads, seen = current.shape
        mask = torch.ones(heads, seen + 1, dtype=probs.dtype)
        if seen > self.heavy + self.recent:
            if self.recent != 0:
                mask[:, : -self.recent] = 0
                candidates = self.scores[:, : -self.recent]
            else:
                mask[:, :] = 0
                candidates = self.scores
            if self.heavy != 0:
                keep = candidates.topk(k=self.heavy, dim=-1).indices
                mask = mask.scatter(-1, keep, 1)
        self.next_mask = mask.clone()[None, :, None, :]
        score_mask = mask[:, :-1]
        score_mask[:, -self.recent:] = 1
        self.scores = self.scores * score_mask


STATES: dict[int, PaperState] = {}


def paper_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    state = STATES[module.layer_idx]
    q_len, kv_len = query.shape[2], key.shape[2]
    weights = torch.matmul(query, key.transpose(2, 3)) / math.sqrt(query.shape[-1])
    minimum = torch.tensor(torch.finfo(weights.dtype).min)
    if q_len > 1:  # the prefill's causal mask, as transformers 4.33 built it for batch size 1
        causal = torch.full((q_len, kv_len), minimum.item()).triu(1)
        weights = torch.max(weights + causal, minimum)
    if state.next_mask is not None:
        m = state.next_mask
        weights = weights * m + (1 - m) * minimum
    probs = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    state.step(probs)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


AttentionInterface.register("paper_h2o", paper_attention)


@torch.inference_mode()
def paper_greedy(model, prompt: list[int], new_tokens: int, heavy_ratio: float, recent_ratio: float) -> list[int]:
    """Greedy tokens of the paper's simulation for one prompt."""
    STATES.clear()
    STATES.update({i: PaperState(heavy_ratio, recent_ratio) for i in range(model.config.num_hidden_layers)})
    model.set_attn_implementation("paper_h2o")
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    out = []
    for _ in range(new_tokens):
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids = torch.tensor([[token]])
    return out
