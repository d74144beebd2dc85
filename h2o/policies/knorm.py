"""Knorm (Devoto et al., 2024): keep the keys of lowest L2 norm, which draw the most attention."""

import torch

from h2o.policies.base import Observation, Policy, later_wins_ties


class KNorm(Policy):
    """Heavy hitters by the smallest key norm instead of accumulated attention, plus the recent
    window (ties to the later token); the budgets split as H2O's, so that both hold the same KV
    bytes at every budget.
    The score, 1 / (1 + norm), is positive and falls with the norm; a slot no query could see
    this pass (evicted in mask mode) scores 0, so that it never comes back."""

    name = "knorm"
    parks_leaving_token = False
    reads_key_norms = True

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        return torch.where(observed.seen > 0, 1.0 / (1.0 + observed.key_norms), 0.0)

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # A token repeated has one key norm in the first layer (RoPE keeps norms): ties are common.
        return later_wins_ties(scores, positions)
