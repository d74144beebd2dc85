"""H2O with shrunk averages: accumulated attention per query, shrunk toward zero for young tokens."""

import torch

from h2o.policies.base import Policy


class H2OShrink(Policy):
    """Heavy hitters by score / (age + shrink x t): the attention a token has received per query
    that came after it (age = t - position, t the tokens seen), as if it had also received
    `shrink x t` queries' worth of no attention. shrink -> infinity ranks as H2O (the sum, which
    favours old tokens: more queries have seen them); shrink = 0 is the plain mean (h2o-avg,
    which overrates the young tokens that few, mostly local, queries have seen). In between, a
    token must hold its share over many queries to outrank an old one. The shrinkage is a share of
    t, so the knob means the same on any prompt's length; age comes from positions, not views,
    so that drop and mask mode (whose evicted slots keep stale counts) rank alike. Budgets split
    as H2O's (the same KV bytes)."""

    name = "h2o-shrink"
    knob = "shrink"

    def __init__(self, heavy_ratio: float, recent_ratio: float, shrink: float = 0.25) -> None:
        super().__init__(heavy_ratio, recent_ratio)
        if not shrink >= 0:
            raise ValueError(f"--shrink must be >= 0, got {shrink}")
        self.shrink = shrink

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The newest token is present in every mode and engine: t is one past its position.
        t = positions.amax(-1, keepdim=True).to(scores.dtype) + 1
        age = t - positions.to(scores.dtype)
        return scores / (age + self.shrink * t)
