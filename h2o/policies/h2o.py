"""H2O (Zhang et al., 2023): keep the tokens with the largest attention accumulated so far."""

from h2o.policies.base import Policy


class H2O(Policy):
    """Heavy hitters by attention summed over every query since the prefill, plus a recent window.
    With heavy_ratio 0 this is the paper's `local` baseline (the recent window alone)."""

    name = "h2o"
