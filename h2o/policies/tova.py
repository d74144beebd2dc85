"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most; no memory of the past."""

import torch

from h2o.policies.base import Budget, Observation, Policy


class TOVA(Policy):
    """Scores are the newest query's attention alone (summed over the heads sharing a KV head).
    The two ratios give the total budget; only the newest token is kept by position."""

    name = "tova"
    parks_leaving_token = False

    def budget(self, prompt_len: int) -> Budget:
        total = max(1, int((self.heavy_ratio + self.recent_ratio) * prompt_len))
        return Budget(heavy=total - 1, recent=1)

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        return observed.newest
