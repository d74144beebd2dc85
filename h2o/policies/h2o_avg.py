"""The paper's ablation: heavy hitters by *average* attention instead of accumulated attention."""

import torch

from h2o.policies.base import Policy


class H2OAverage(Policy):
    """Rank by attention received per (query row, head) that could see the token. The paper
    reports this does worse: it forgets that early tokens keep being attended."""

    name = "h2o-avg"

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return scores / views.clamp(min=1)
