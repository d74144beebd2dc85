"""StreamingLLM (Xiao et al., 2023): the first tokens ("attention sinks") plus the recent window."""

import torch

from h2o.policies.base import Budget, WithSinks


class Sink(WithSinks):
    """Keeps the first `sink_size` tokens and the most recent ones. The two ratios give the total
    budget, as for the other policies; the sinks come out of it."""

    name = "sink"
    parks_leaving_token = False

    def budget(self, prompt_len: int) -> Budget:
        total = int((self.heavy_ratio + self.recent_ratio) * prompt_len)
        sinks = min(self.sink_size, max(0, total - 1))
        return Budget(heavy=sinks, recent=max(1, total - sinks))

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return -positions.to(scores.dtype)  # the earliest tokens win
