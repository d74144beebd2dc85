"""SnapKV (Li et al., 2024): the prompt's eviction scored by the attention of its last queries."""

import torch
import torch.nn.functional as F

from h2o.policies.base import Observation, Policy, later_wins_ties


class SnapKV(Policy):
    """The prompt's heavy hitters by the attention of its last `window_rows` queries (for XSUM,
    the instruction that ends the prompt: what the summary will ask of the article), max-pooled
    over `kernel` neighbouring tokens so that a phrase stays whole, plus the recent window.

    SnapKV itself evicts once, after the prompt, and then keeps every generated token; a cache
    of fixed size must let one token go per step, so here decoding adds each new query's
    attention to the scores, as H2O does: the prompt's ranking is SnapKV's, and what decoding
    attends to can still displace it. The budgets split as H2O's (the same KV bytes)."""

    name = "snapkv"
    parks_leaving_token = False
    window_rows = 32
    kernel = 7

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        if observed.window is None:  # a decode step
            return scores + observed.received
        b, h, s = observed.window.shape
        pooled = F.max_pool1d(observed.window.reshape(b * h, 1, s), self.kernel, stride=1, padding=self.kernel // 2)
        # A slot no query could see (padding) keeps 0, whatever its neighbours.
        return torch.where(observed.seen > 0, pooled.view(b, h, s), 0.0)

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Max-pooling spreads one value over its neighbours: ties are the rule, not the exception.
        return later_wins_ties(scores, positions)
