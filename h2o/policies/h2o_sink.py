"""H2O with attention sinks: the first tokens are always heavy hitters, whatever their score."""

import torch

from h2o.policies.base import WithSinks


class H2OSink(WithSinks):
    """H2O whose heavy set always holds the first `sink_size` tokens (StreamingLLM's sinks), the
    rest chosen by accumulated attention; with no heavy budget there are no sinks. Asks whether
    H2O loses by letting the sinks go."""

    name = "h2o-sink"

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The sinks come out of the heavy budget and always win its top-k (empty slots, at -1,
        # are never candidates), the earliest first when the budget holds fewer than all of them.
        # 2**24 is above any accumulated score (each query row adds at most one per query head)
        # and still counts single positions exactly in float32.
        sink_rank = 2.0**24 - positions.to(scores.dtype)
        return torch.where(positions < self.sink_size, sink_rank, scores)
