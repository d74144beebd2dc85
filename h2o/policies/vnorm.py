"""Value-aware scoring (VATP, Guo et al., 2024; CriticalKV, Feng et al., 2025): any attention
scorer's attention weighted by the L1 norm of the value it brings."""

from dataclasses import replace

import torch

from h2o.policies.base import Observation, Policy
from h2o.policies.h2o import H2O


def value_norms(observed: Observation) -> torch.Tensor:
    """(B, H, S): each slot's value's L1 norm, VATP's."""
    return observed.values.abs().sum(-1)


class ValueNormed(Policy):
    """Mixed in before an attention scorer (`class X(ValueNormed, TOVA)`): every attention mass
    the scorer reads (all rows', the newest row's, the last rows') is multiplied by its slot's
    value norm before the scorer accumulates it. A token's share of an attention output is its
    attention times its value, so a token attended to but carrying a small value adds little.
    For a scorer that sums attention (H2O, A2SF, TOVA) this is the paper's product, score x
    norm, exactly; SnapKV's pooling then pools the products. L1, as VATP: the bound on each
    coordinate of what the token adds to the output, and VATP's reported choice."""

    reads_values = True

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        norms = value_norms(observed)
        window = None if observed.window is None else observed.window * norms
        weighted = replace(observed, received=observed.received * norms, newest=observed.newest * norms, window=window)
        return super().accumulate(scores, weighted)


class H2OValueNorm(ValueNormed, H2O):
    """H2O's accumulated attention times the value's L1 norm (VATP on H2O); as H2O otherwise."""

    name = "h2o-vnorm"
