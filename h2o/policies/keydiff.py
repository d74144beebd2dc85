"""KeyDiff (Park et al., 2025): keep the keys least like the cache's mean key."""

import torch
import torch.nn.functional as F

from h2o.policies.base import Observation, Policy, later_wins_ties


def key_similarity(observed: Observation) -> torch.Tensor:
    """(B, H, S): each slot's key's cosine similarity to the anchor, the mean of the unit keys of
    the slots this pass's queries could see (only those: drop and mask mode alike)."""
    seen = observed.seen > 0
    units = F.normalize(observed.keys, dim=-1) * seen[..., None]
    anchor = units.sum(2, keepdim=True) / seen.sum(-1, keepdim=True).clamp(min=1)[..., None]
    return F.cosine_similarity(observed.keys, anchor, dim=-1)


class KeyDiff(Policy):
    """Heavy hitters by how far a key points from the others: the anchor is the mean of the
    attended slots' unit keys (per sequence and KV head), and a key of lower cosine similarity to
    it ranks higher; no attention scores. Recomputed every pass over the slots the query could
    see, so the anchor follows the cache as it changes; budgets split as H2O's (the same bytes).
    The score, 2 - cosine, lies in [1, 3]; a slot no query could see this pass scores 0, so that
    an evicted slot of mask mode never comes back."""

    name = "keydiff"
    parks_leaving_token = False
    reads_keys = True

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        return torch.where(observed.seen > 0, 2.0 - key_similarity(observed), 0.0)

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A token repeated in the first layer has one key up to RoPE: near ties go to the later one.
        return later_wins_ties(scores, positions)
