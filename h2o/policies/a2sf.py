"""A2SF (Jo and Shin, 2024): H2O's accumulated attention with a forgetting factor."""

import torch

from h2o.policies.base import Observation, Policy


class A2SF(Policy):
    """Heavy hitters by attention accumulated with a forgetting factor: every query's attention
    counts `forgetting_factor ** k`, k the queries after it, so old attention fades and a token
    must keep being attended to stay. Within a pass the row weights do it (a prompt row k rows
    before the last counts factor ** k); between passes the running score is multiplied by the
    factor before the new attention is added. Factor 1 is H2O; the authors' code defaults to 0.1
    (their experiments try 0.1 to 0.5). Budgets and the parked leaving token as H2O's."""

    name = "a2sf"
    knob = "forgetting_factor"

    def __init__(self, heavy_ratio: float, recent_ratio: float, forgetting_factor: float = 0.1) -> None:
        super().__init__(heavy_ratio, recent_ratio)
        if not 0.0 < forgetting_factor <= 1.0:
            raise ValueError(f"--forgetting_factor must lie in (0, 1], got {forgetting_factor}")
        self.forgetting_factor = forgetting_factor

    def row_weights(self, ages: torch.Tensor) -> torch.Tensor:
        return torch.pow(self.forgetting_factor, ages.float())

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        return self.forgetting_factor * scores + observed.received
