"""Batch tensors both engines decode with: left-padded prompts, per-layer budget tables, and the
compaction that keeps a cache's retained slots."""

from __future__ import annotations

import torch

from h2o.policies import Budget


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts right-aligned in one (B, width) batch: token ids, which are real tokens, and
    each token's position (padding counts for nothing)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    return ids, valid, (valid.cumsum(-1) - 1).clamp(min=0)


def layer_table(per_layer: list[list[Budget]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(layers, sequences) heavy and recent budgets, from each sequence's list of layer budgets."""
    layers = range(len(per_layer[0])) if per_layer else range(0)
    heavy = torch.tensor([[b[i].heavy for b in per_layer] for i in layers], dtype=torch.long, device=device)
    recent = torch.tensor([[b[i].recent for b in per_layer] for i in layers], dtype=torch.long, device=device)
    return heavy, recent


def keep_retained(
    retained: torch.Tensor,
    width: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    active: torch.Tensor,
    scores: torch.Tensor,
    views: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `retained` slots of each (sequence, KV head) first, in their order, in `width` slots:
    keys and values (B, H, width, D), then positions, active, scores and views (B, H, width).
    A row that keeps fewer ends in empty slots: position -1, inactive, score and views 0."""
    order = torch.argsort((~retained).to(torch.uint8), dim=-1, stable=True)[..., :width]
    filled = torch.arange(width, device=order.device) < retained.sum(-1, keepdim=True)
    index = order[..., None].expand(-1, -1, -1, keys.shape[-1])
    return (
        keys.gather(2, index),
        values.gather(2, index),
        positions.gather(2, order).masked_fill(~filled, -1),
        active.gather(2, order) & filled,
        scores.gather(2, order) * filled,
        views.gather(2, order) * filled,
    )
