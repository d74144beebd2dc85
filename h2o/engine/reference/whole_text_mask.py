"""The paper's lm-eval simulation: one forward over a whole text, a heavy-hitter mask inside it.

The H2O paper's `h2o_hf/utils_lm_eval/modify_*.py` (what its `run_lm_eval_harness.py` runs) does
not decode step by step: each layer computes the causal attention of the whole text once, sums
each column's probabilities over every query row ("global statistics", later rows included),
takes the `heavy` columns of largest sum, and recomputes the attention with every row seeing
those columns plus the band of its last `recent` tokens and itself, budgets being
`int(ratio * text length)`. This module is that rule as an attention function registered with
transformers' `AttentionInterface`, over the same arithmetic as `h2o.engine.reference.attention`
(op for op the paper's). The policy supplies the score (`accumulate` over this one pass), the
ranking (`rank`) and the per-layer budgets; a policy with a selection of its own (`select`)
has no whole-text form and is refused.

Batches are left-padded: padding neither votes nor is chosen, and each text has its own budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from h2o.engine.decoding import layer_table
from h2o.engine.reference.attention import _fused_alpha, _hidden, _probabilities, _seen
from h2o.policies import Observation, Policy

ATTENTION = "h2o_whole_text_mask"


@dataclass
class WholeTextMask:
    """One batch's budgets and token layout: `positions` (B, S) with -1 for padding, `valid`
    (B, S), and (layers, B) heavy and recent budgets from each text's real length."""

    policy: Policy
    positions: torch.Tensor
    valid: torch.Tensor
    heavy: torch.Tensor
    recent: torch.Tensor

    @classmethod
    def build(cls, policy: Policy, valid: torch.Tensor, num_layers: int) -> WholeTextMask:
        if not policy.uses_base_selection():
            raise ValueError(f"policy {policy.name!r} selects tokens its own way, which has no whole-text mask; "
                             "use kv_mode=drop")
        lengths = valid.sum(-1).tolist()
        budgets = [policy.layer_budgets(policy.budget(n), num_layers) for n in lengths]
        heavy, recent = layer_table(budgets, valid.device)
        positions = ((valid.cumsum(-1) - 1) * valid - (~valid).long())
        return cls(policy, positions, valid, heavy, recent)


def _observation(policy: Policy, probs: torch.Tensor, key: torch.Tensor, mask: WholeTextMask,
                 slots: torch.Tensor, active: torch.Tensor, groups: int) -> Observation:
    """What the causal pass says of each column: (B, Hkv, S) sums over the real query rows (the
    paper's `torch.sum(softmax, dim=-2)`), then over the query heads sharing a KV head."""
    rows = mask.valid[:, None, None, :, None].to(probs.dtype)
    received = (probs * rows).sum(dim=3).sum(dim=2)
    window = None
    if policy.window_rows:
        last = mask.positions.max(-1, keepdim=True).values
        late = (mask.valid & (mask.positions > last - policy.window_rows))[:, None, None, :, None]
        window = (probs * late.to(probs.dtype)).sum(dim=3).sum(dim=2)
    return Observation(
        received=received,
        newest=probs[:, :, :, -1].sum(dim=2),
        seen=_seen(slots, active, mask.positions, mask.valid, groups),
        key_norms=key.float().norm(dim=-1) if policy.reads_key_norms else None,
        window=window,
    )


def _visible(policy: Policy, observed: Observation, mask: WholeTextMask, layer: int,
             slots: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, q, S): each row's heavy columns (one set per text and KV head) and its band."""
    scores = policy.accumulate(torch.zeros_like(observed.received), observed)
    ranked = policy.rank(scores, observed.seen, slots).masked_fill(~active, float("-inf"))
    heavy, recent = mask.heavy[layer], mask.recent[layer]
    chosen = torch.zeros_like(active)
    k = min(int(heavy.max()), slots.shape[-1])
    if k > 0:
        top_values, top_slots = ranked.topk(k, dim=-1)
        wanted = torch.arange(k, device=slots.device).view(1, 1, -1) < heavy.view(-1, 1, 1)
        chosen.scatter_(-1, top_slots, wanted & (top_values > float("-inf")))
    # The paper's band, tril(diagonal=recent) & triu(diagonal=-recent): the row itself and the
    # `recent` tokens before it (the causal mask hides the ones after).
    band = slots[:, :, None, :] >= (mask.positions[:, None, :, None] - recent.view(-1, 1, 1, 1))
    return (chosen[:, :, None, :] | band) & ~_hidden(slots, active, mask.positions)


def whole_text_mask_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                              **kwargs: object) -> tuple[torch.Tensor, None]:
    """Attention of one layer over a whole text under the paper's lm-eval heavy-hitter mask."""
    mask = kwargs.get("whole_text_mask")
    if not isinstance(mask, WholeTextMask):
        raise RuntimeError("the whole-text mask needs the model call to pass whole_text_mask=<WholeTextMask>")
    b, hq, q_len, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    slots = mask.positions[:, None, :].expand(b, hkv, q_len)
    active = mask.valid[:, None, :].expand(b, hkv, q_len)
    alpha = _fused_alpha(module, scaling, d)
    causal = _probabilities(query, key, _hidden(slots, active, mask.positions), scaling, alpha)
    observed = _observation(mask.policy, causal, key, mask, slots, active, groups)
    visible = _visible(mask.policy, observed, mask, module.layer_idx, slots, active)
    probs = _probabilities(query, key, ~visible, scaling, alpha)
    out = torch.matmul(probs.to(query.dtype).view(b, hkv, groups * q_len, key.shape[2]), value)
    return out.view(b, hq, q_len, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, whole_text_mask_attention)
