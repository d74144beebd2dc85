"""Attention functions registered with transformers' `AttentionInterface`.

They attend over the slots an `EvictingCache` layer holds, hand the attention probabilities
each slot received to that layer (`observe`), and leave the rest of the model untouched. The
cache reaches them as the `eviction_cache` keyword, which transformers passes from the model
call down to the attention function.

GQA: a KV head's score is the sum over the query heads that share it, so each KV head keeps
one set of tokens and the cache shrinks by the same ratio as for a multi-head model.

- "h2o_eager" mirrors the paper's arithmetic op for op (divide by sqrt(head_dim), masked
  columns set to the dtype's minimum, softmax in float32), so mask mode matches its tokens.
- "h2o_sdpa" takes the output from `scaled_dot_product_attention` and computes the scores
  beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from h2o.cache import EvictingCache
from h2o.policies import Observation

# Prefill materializes (batch, heads, rows, slots) probabilities; past this many elements the
# query rows are processed in slices (smaller slices only when needed: results stay bitwise
# identical to the paper's for ordinary prompts).
MAX_SCORE_ELEMENTS = 1 << 28


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, visible: torch.Tensor, scaling: float
) -> torch.Tensor:
    """(B, Hkv, G, q, S) softmax probabilities, with the paper's operation order."""
    b, hkv, s, d = key.shape
    groups = query.shape[1] // hkv
    q_len = query.shape[2]
    grouped = query.reshape(b, hkv, groups * q_len, d)
    logits = torch.matmul(grouped, key.transpose(2, 3))
    if math.isclose(scaling, d**-0.5, rel_tol=1e-12):
        logits = logits / math.sqrt(d)
    else:
        logits = logits * scaling
    logits = logits.view(b, hkv, groups, q_len, s)
    logits = logits.masked_fill(~visible[:, :, None], torch.finfo(logits.dtype).min)
    return F.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)


def attend(module, query, key, value, scaling, cache: EvictingCache, use_sdpa: bool):
    """Attention over one `EvictingCache` layer's slots; hands the layer what each slot received."""
    layer = cache.layers[module.layer_idx]
    b, hq, q_len, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    groups = hq // hkv
    positions, row_valid = cache.query_positions.to(query.device), cache.query_valid.to(query.device)

    rows = max(1, min(q_len, MAX_SCORE_ELEMENTS // max(1, b * hq * s)))
    received = torch.zeros(b, hkv, s, dtype=torch.float32, device=query.device)
    seen = torch.zeros_like(received)
    outputs = []
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        visible = layer.visible(positions[:, start:stop])
        probs = _probabilities(query[:, :, start:stop], key, visible, scaling)
        if use_sdpa:
            out = F.scaled_dot_product_attention(
                query[:, :, start:stop],
                key,
                value,
                attn_mask=visible.repeat_interleave(groups, dim=1),
                scale=scaling,
                enable_gqa=groups > 1,
            )
        else:
            out = torch.matmul(probs.reshape(b, hkv, groups * (stop - start), s), value)
            out = out.view(b, hq, stop - start, d)
        outputs.append(out)
        # Padded query rows attend to garbage and must not vote.
        rows_valid = row_valid[:, None, None, start:stop, None]
        probs = probs * rows_valid.to(probs.dtype)
        received += probs.sum(dim=3).sum(dim=2).float()
        seen += (visible & rows_valid[:, :, 0]).sum(dim=2) * groups
    # Left padding puts every sequence's newest token in the last row.
    newest = probs[:, :, :, -1].sum(dim=2).float()
    layer.observe(Observation(received=received, newest=newest, seen=seen))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _checked_cache(kwargs: dict) -> EvictingCache:
    cache = kwargs.get("eviction_cache")
    if not isinstance(cache, EvictingCache):
        raise RuntimeError("h2o attention needs the model call to pass eviction_cache=<EvictingCache>")
    return cache


def eager_eviction_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention over an `EvictingCache` layer (the paper's arithmetic)."""
    return attend(module, query, key, value, scaling, _checked_cache(kwargs), use_sdpa=False)


def sdpa_eviction_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """SDPA output over an `EvictingCache` layer, with the policy's scores computed beside it."""
    return attend(module, query, key, value, scaling, _checked_cache(kwargs), use_sdpa=True)


ATTENTION_IMPLEMENTATIONS = {"eager": "h2o_eager", "sdpa": "h2o_sdpa"}
AttentionInterface.register("h2o_eager", eager_eviction_attention)
AttentionInterface.register("h2o_sdpa", sdpa_eviction_attention)
