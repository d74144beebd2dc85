"""AdaKV (Feng et al., 2024): a layer's heavy budget shared among its heads by where the attention is."""

import torch

from h2o.policies.base import Selection
from h2o.policies.snapkv import SnapKV


class AdaKV(SnapKV):
    """SnapKV's scores, but a layer's KV heads share one heavy budget (heads x heavy): each head
    first keeps its `floor` share (alpha of its own budget) of its best tokens, then the rest of
    the layer's budget goes to the best remaining tokens of any head. A head whose attention
    gathers on few tokens gives its room to one that spreads it; the layer holds the same bytes
    as H2O's. Its own selection rule: the reference engine runs it."""

    name = "adakv"
    alpha = 0.2

    def select(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor, n_tokens: torch.Tensor,
               heavy: torch.Tensor, recent: torch.Tensor, max_heavy: int | None = None) -> Selection:
        batch, heads, slots = positions.shape
        t, r = n_tokens.view(-1, 1, 1), recent.view(-1, 1, 1)
        present = positions >= 0
        over_budget = t > heavy.view(-1, 1, 1) + r
        window = present & (positions >= t + 1 - r)
        candidate = present & (positions < t + 1 - r)
        ranked = self.rank(scores, views, positions).masked_fill(~candidate, float("-inf"))
        chosen = torch.zeros_like(present)
        floor = (heavy * self.alpha).long()
        if int(floor.max()) > 0:
            k = min(int(floor.max()), slots)
            top = ranked.topk(k, dim=-1)
            wanted = (torch.arange(k, device=positions.device) < floor.view(-1, 1, 1)) & (top.values > float("-inf"))
            chosen.scatter_(-1, top.indices, wanted)
        shared = heads * (heavy - floor)  # (batch,): what the heads compete for
        if int(shared.max()) > 0:
            flat = ranked.masked_fill(chosen, float("-inf")).view(batch, heads * slots)
            k = min(int(shared.max()), heads * slots)
            top = flat.topk(k, dim=-1)
            wanted = (torch.arange(k, device=positions.device) < shared.view(-1, 1)) & (top.values > float("-inf"))
            # Or, not scatter: the top-k may also list tokens the floor took (at -inf), unwanted here.
            shared_chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top.indices, wanted)
            chosen = chosen | shared_chosen.view(batch, heads, slots)
        active = torch.where(over_budget, window | chosen, present)
        return Selection(active=active, retained=active)
