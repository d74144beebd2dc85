"""Expected Attention (Devoto et al., 2025): the attention a key can expect from future queries."""

import math

import torch

from h2o.policies.base import Observation, Policy, later_wins_ties


class ExpectedAttention(Policy):
    """The prompt's heavy hitters by the attention the coming queries can be expected to pay each
    key, times its value's L2 norm. The queries are modelled as Gaussian: the mean mu and
    covariance S of the prompt's queries before RoPE (past its first `sinks` tokens), both turned
    by RoPE's rotation averaged over the next `future` positions (`Observation.query_mean`,
    `.query_cov`). For a Gaussian q, E[exp(q.k / sqrt(d))] = exp(mu.k / sqrt(d) + k'Sk / 2d), so
    a key's expected attention is the softmax of that exponent over the sequence's keys,
    averaged over the query heads sharing its KV head; the score is (that + epsilon) x ||v||_2,
    epsilon keeping a tiny attention from zeroing a large value. The first `sinks` tokens always
    stay (they take no part in the softmax), as kvpress's ExpectedAttentionPress.

    A cache of fixed size must let one token go every decode step: there each new query's
    attention times the value's norm is added to the scores (the realized attention of a future
    query, on the expected one's scale: both sum the KV head's query heads), as SnapKV's prompt
    ranking is extended here. Budgets split as H2O's (the same bytes)."""

    name = "expected-attention"
    parks_leaving_token = False
    reads_values = True
    reads_keys = True
    knob = "epsilon"
    sinks = 4
    future = 512
    query_stats = (sinks, future)
    # Above any score a slot can reach by attention (each query row adds at most one per query
    # head, times a value's norm), and exact for single positions in float32.
    SINK_SCORE = 2.0**24

    def __init__(self, heavy_ratio: float, recent_ratio: float, epsilon: float = 0.01) -> None:
        super().__init__(heavy_ratio, recent_ratio)
        if not epsilon >= 0:
            raise ValueError(f"--epsilon must be >= 0, got {epsilon}")
        self.epsilon = epsilon

    def expected(self, observed: Observation) -> torch.Tensor:
        """(B, H, S): each slot's expected attention summed over its query heads, over the slots
        the prompt's queries could see that are not sinks; 0 elsewhere."""
        keys, mean, cov = observed.keys, observed.query_mean, observed.query_cov
        b, h, s, d = keys.shape
        groups = mean.shape[1] // h
        grouped = keys[:, :, None].expand(b, h, groups, s, d)  # every query head's view of its KV head's keys
        mean, cov = mean.view(b, h, groups, d), cov.view(b, h, groups, d, d)
        exponent = (grouped @ mean[..., None]).squeeze(-1) / math.sqrt(d)
        exponent = exponent + ((grouped @ cov) * grouped).sum(-1) / (2 * d)
        counted = (observed.seen > 0) & (observed.positions >= self.sinks)
        exponent = exponent.masked_fill(~counted[:, :, None], float("-inf"))
        return exponent.softmax(-1).nan_to_num().sum(2)

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        norms = observed.values.norm(dim=-1)
        if observed.query_mean is None:  # a decode step
            return scores + observed.received * norms
        groups = observed.query_mean.shape[1] // scores.shape[1]
        expected = self.expected(observed)
        # The sum over a KV head's query heads of (mean + epsilon): kvpress's mean, times the group.
        return torch.where(observed.seen > 0, (expected + groups * self.epsilon) * norms, 0.0)

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return later_wins_ties(torch.where(positions < self.sinks, self.SINK_SCORE - positions, scores), positions)
