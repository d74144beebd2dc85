"""Attention scorers whose attention is weighted per token: by the L1 norm of its value (VATP,
Guo et al., 2024; CriticalKV, Feng et al., 2025), or by how unlike the mean key its key is (ours)."""

from dataclasses import replace

import torch

from h2o.policies.base import Observation, Policy
from h2o.policies.h2o import H2O
from h2o.policies.keydiff import key_similarity


class AttentionWeighted(Policy):
    """Mixed in before an attention scorer (`class X(ValueNormed, TOVA)`): every attention mass the
    scorer reads (all rows', the newest row's, the last rows') is multiplied by its slot's
    `weights` before the scorer accumulates it. For a scorer that sums attention (H2O, A2SF, TOVA)
    a weight constant over the passes gives score x weight exactly; SnapKV's pooling then pools
    the products."""

    def weights(self, observed: Observation) -> torch.Tensor:
        """(B, H, S): what each slot's attention is multiplied by this pass."""
        raise NotImplementedError

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        w = self.weights(observed)
        window = None if observed.window is None else observed.window * w
        weighted = replace(observed, received=observed.received * w, newest=observed.newest * w, window=window)
        return super().accumulate(scores, weighted)


class ValueNormed(AttentionWeighted):
    """Attention times the L1 norm of the token's value: a token's share of an attention output is
    its attention times its value, so a token attended to but carrying a small value adds little.
    L1, as VATP: the bound on each coordinate of what the token adds to the output, and VATP's
    choice."""

    reads_values = True

    def weights(self, observed: Observation) -> torch.Tensor:
        return observed.values.abs().sum(-1)


class KeyNovel(AttentionWeighted):
    """Attention times 1 - cos(key, mean unit key), KeyDiff's distance: a pass's attention counts
    in full for a token whose key stands apart from the cache's, and hardly at all for one of many
    alike (RULER's repeated noise; boilerplate)."""

    reads_keys = True

    def weights(self, observed: Observation) -> torch.Tensor:
        return 1.0 - key_similarity(observed)


class H2OValueNorm(ValueNormed, H2O):
    """H2O's accumulated attention times the value's L1 norm (VATP on H2O); as H2O otherwise."""

    name = "h2o-vnorm"


class H2OKeyNovel(KeyNovel, H2O):
    """H2O's attention accumulated with each pass weighted by the key's distance from the mean key
    (ours): H2O's heavy hitters where keys differ, KeyDiff's outliers where attention is alike."""

    name = "h2o-keydiff"
