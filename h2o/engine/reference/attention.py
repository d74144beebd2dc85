"""Attention functions registered with transformers' `AttentionInterface`.

They attend over the slots an `EvictingCache` layer holds, hand the attention probabilities
each slot received to that layer (`observe`), and leave the rest of the model untouched. The
cache reaches them as the `eviction_cache` keyword, which transformers passes from the model
call down to the attention function.

GQA: a KV head's score is the sum over the query heads that share it, so each KV head keeps
one set of tokens and the cache shrinks by the same ratio as for a multi-head model.

- "h2o_eager" mirrors the paper's arithmetic op for op (divide by sqrt(head_dim), masked
  columns set to the dtype's minimum, softmax in float32), so mask mode matches its tokens.
  The paper's files for its other families scale q.k their own way: OPT's multiplies the query
  before the product, which transformers' OPT does too (it passes scaling 1.0, a no-op here);
  GPT-NeoX's is one `baddbmm` with alpha = 1 / sqrt(head_size) in float32, done the same way
  here for that family (`FUSED_SCALING`).
- "h2o_sdpa" takes the output from `scaled_dot_product_attention` and computes the scores
  beside it.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from h2o.engine.reference.evicting_cache import EvictingCache
from h2o.policies import Observation

# Prefill materializes (batch, heads, rows, slots) probabilities; past this many elements the
# query rows are processed in slices (smaller slices only when needed: results stay bitwise
# identical to the paper's for ordinary prompts).
MAX_SCORE_ELEMENTS = 1 << 28


# Model types whose paper file computes q.k as baddbmm(zeros, q, k^T, alpha=1 / norm_factor), with
# norm_factor = sqrt(head_size) in float32 (GPT-NeoX): the multiply sits inside the product, so
# matmul-then-scale differs from it in the last bits.
FUSED_SCALING = ("gpt_neox",)


def _fused_alpha(module, scaling: float, head_dim: int) -> float | None:
    """The paper's baddbmm alpha for this layer's family, or None for LLaMA's division."""
    if getattr(getattr(module, "config", None), "model_type", None) not in FUSED_SCALING:
        return None
    if not math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6):
        return None
    return float(torch.tensor(1.0) / torch.sqrt(torch.tensor(head_dim, dtype=torch.float32)))


def _probabilities(
    query: torch.Tensor, key: torch.Tensor, hidden: torch.Tensor, scaling: float, alpha: float | None = None
) -> torch.Tensor:
    """(B, Hkv, G, q, S) float32 softmax probabilities, with the paper's operation order."""
    b, hkv, s, d = key.shape
    groups = query.shape[1] // hkv
    q_len = query.shape[2]
    grouped = query.reshape(b, hkv, groups * q_len, d)
    if alpha is not None:
        rows = grouped.reshape(b * hkv, groups * q_len, d)
        logits = torch.baddbmm(rows.new_zeros(b * hkv, groups * q_len, s), rows,
                               key.reshape(b * hkv, s, d).transpose(1, 2), beta=1.0, alpha=alpha)
        logits = logits.view(b, hkv, groups * q_len, s)
    else:
        logits = torch.matmul(grouped, key.transpose(2, 3))
        if math.isclose(scaling, d**-0.5, rel_tol=1e-12):
            logits.div_(math.sqrt(d))
        else:
            logits.mul_(scaling)
    logits = logits.view(b, hkv, groups, q_len, s)
    logits.masked_fill_(hidden[:, :, None], torch.finfo(logits.dtype).min)
    return F.softmax(logits, dim=-1, dtype=torch.float32)


def _hidden(slot_positions: torch.Tensor, active: torch.Tensor, query_positions: torch.Tensor) -> torch.Tensor:
    """(B, H, q, S): the slots each query row may not attend to (inactive, or in its future)."""
    return ~active[:, :, None, :] | (slot_positions[:, :, None, :] > query_positions[:, None, :, None])


def _seen(slot_positions: torch.Tensor, active: torch.Tensor, query_positions: torch.Tensor,
          row_valid: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, S): how many (real query row, query head) pairs could attend to each slot, i.e.
    an active slot's count of real rows at or after its position (no (q, S) tensor needed)."""
    rows = torch.where(row_valid, query_positions, -1).sort(dim=-1).values  # padding sorts first
    later = rows.shape[-1] - torch.searchsorted(rows, slot_positions.flatten(1).to(rows.dtype), side="left")
    return (later.view_as(slot_positions) * active * groups).float()


def _rope_frequencies(module) -> torch.Tensor | None:
    """The inverse frequencies of the layer's RoPE (its family's own rotary class, built from the
    config), or None for a family without one (OPT)."""
    family = sys.modules[type(module).__module__]
    rotary = getattr(family, type(module).__name__.removesuffix("Attention") + "RotaryEmbedding", None)
    return None if rotary is None else rotary(config=module.config).inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _query_statistics(module, query: torch.Tensor, positions: torch.Tensor, row_valid: torch.Tensor,
                      sinks: int, future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, Hq, D) and covariance (B, Hq, D, D) of each sequence's real query rows past its
    first `sinks` tokens, before RoPE, both rotated by RoPE's rotation averaged over the `future`
    positions after the prompt (Expected Attention's query statistics)."""
    q = query.float()
    inv_freq = _rope_frequencies(module)
    b, d = q.shape[0], q.shape[-1]
    rotation = torch.eye(d, device=q.device).expand(b, d, d).clone()
    if inv_freq is not None:
        inv_freq = inv_freq.to(q.device, torch.float32)
        rot = 2 * inv_freq.numel()  # GPT-NeoX rotates only the first dimensions
        angles = positions.float()[..., None] * inv_freq  # (B, q, rot / 2)
        cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
        # RoPE is a rotation: rotating back by the row's own angle gives the query before RoPE.
        q = torch.cat((q[..., :rot] * cos - _rotate_half(q[..., :rot]) * sin, q[..., rot:]), -1)
        start = positions.masked_fill(~row_valid, -1).max(-1).values + 1  # (B,): the first coming position
        coming = (start[:, None] + torch.arange(future, device=q.device)).float()[..., None] * inv_freq
        mean_cos, mean_sin = coming.cos().mean(1).repeat(1, 2), coming.sin().mean(1).repeat(1, 2)  # (B, rot)
        h = rot // 2
        turn = torch.zeros(rot, rot, device=q.device)  # turn @ x == rotate_half(x)
        turn[:h, h:], turn[h:, :h] = -torch.eye(h, device=q.device), torch.eye(h, device=q.device)
        rotation[:, :rot, :rot] = torch.diag_embed(mean_cos) + torch.diag_embed(mean_sin) @ turn
    counted = (row_valid & (positions >= sinks)).float()[:, None, :, None]  # (B, 1, q, 1)
    n = counted.sum(2).clamp(min=1)
    mean = (q * counted).sum(2) / n
    centered = (q - mean[:, :, None]) * counted
    cov = centered.transpose(2, 3) @ centered / n[..., None]
    mean = torch.einsum("bij,bhj->bhi", rotation, mean)
    cov = rotation[:, None] @ cov @ rotation[:, None].transpose(2, 3)
    return mean, cov


def attend(module, query, key, value, scaling, cache: EvictingCache, use_sdpa: bool):
    """Attention over one `EvictingCache` layer's slots; hands the layer what each slot received."""
    layer = cache.layers[module.layer_idx]
    b, hq, q_len, d = query.shape
    hkv, s = key.shape[1], key.shape[2]
    groups = hq // hkv
    positions, row_valid = cache.query_positions.to(query.device), cache.query_valid.to(query.device)
    slot_positions, active = layer.columns()
    alpha = _fused_alpha(module, scaling, d)

    rows = max(1, min(q_len, MAX_SCORE_ELEMENTS // max(1, b * hq * s)))
    # A policy that scores the prompt by its last queries alone (SnapKV) gets their votes apart.
    window = cache.policy.window_rows if q_len > 1 else 0
    votes = 2 if window else 1
    last = positions.masked_fill(~row_valid, -1).max(-1, keepdim=True).values
    received = torch.zeros(b, hkv, votes, s, dtype=torch.float32, device=query.device)
    outputs = []
    for start in range(0, q_len, rows):
        stop = min(q_len, start + rows)
        hidden = _hidden(slot_positions, active, positions[:, start:stop])
        probs = _probabilities(query[:, :, start:stop], key, hidden, scaling, alpha)
        if use_sdpa:
            out = F.scaled_dot_product_attention(
                query[:, :, start:stop],
                key,
                value,
                attn_mask=~hidden.repeat_interleave(groups, dim=1),
                scale=scaling,
                enable_gqa=groups > 1,
            )
        else:
            out = torch.matmul(probs.to(query.dtype).view(b, hkv, groups * (stop - start), s), value)
            out = out.view(b, hq, stop - start, d)
        outputs.append(out)
        # Padded query rows attend to garbage and must not vote: a weighted sum over the rows.
        voters = [row_valid[:, start:stop].float()]
        if window:
            voters.append(voters[0] * (positions[:, start:stop] > last - window))
        row_weights = cache.policy.row_weights(last - positions[:, start:stop])
        if row_weights is not None:
            voters[0] = voters[0] * row_weights
        weights = torch.stack(voters, 1).repeat(1, 1, groups)[:, None].expand(b, hkv, votes, -1)
        received += torch.matmul(weights, probs.view(b, hkv, groups * (stop - start), s))
    # Left padding puts every sequence's newest token in the last row.
    newest = probs[:, :, :, -1].sum(dim=2)
    seen = _seen(slot_positions, active, positions, row_valid, groups)
    policy = cache.policy
    key_norms = key.float().norm(dim=-1) if policy.reads_key_norms else None
    stats = (None, None)
    if policy.query_stats is not None and q_len > 1:
        stats = _query_statistics(module, query, positions, row_valid, *policy.query_stats)
    layer.observe(Observation(received=received[:, :, 0], newest=newest, seen=seen, key_norms=key_norms,
                              window=received[:, :, 1] if window else None, positions=slot_positions,
                              keys=key.float() if policy.reads_keys else None,
                              values=value.float() if policy.reads_values else None,
                              query_mean=stats[0], query_cov=stats[1]))
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
