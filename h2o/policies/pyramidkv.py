"""PyramidKV (Cai et al., 2024): SnapKV's scoring with budgets per layer, largest in the lowest."""

from h2o.policies.base import Budget
from h2o.policies.snapkv import SnapKV


class PyramidKV(SnapKV):
    """Heavy budgets falling linearly from the first layer to the last, from 2h - h/beta to
    h/beta, so that the layers hold H2O's h on average (the same KV bytes); the recent window is
    every layer's own. Lower layers spread their attention over more of the prompt (the
    analysis's recall by layer shows it on SmolLM2), upper ones gather it on a few tokens."""

    name = "pyramidkv"
    beta = 20

    def layer_budgets(self, budget: Budget, layers: int) -> list[Budget]:
        if layers == 1 or budget.heavy == 0:
            return [budget] * layers
        low = budget.heavy / self.beta
        high = 2 * budget.heavy - low
        wanted = [high - (high - low) * i / (layers - 1) for i in range(layers)]
        # Whole tokens that add up to layers x heavy: the floors, then one more where most is left.
        heavy = [int(w) for w in wanted]
        for i in sorted(range(layers), key=lambda i: heavy[i] - wanted[i])[: layers * budget.heavy - sum(heavy)]:
            heavy[i] += 1
        return [Budget(h, budget.recent) for h in heavy]
