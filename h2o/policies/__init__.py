"""Eviction policies by name. Adding one: a module with a `Policy` subclass and a line below."""

from h2o.policies.a2sf import A2SF
from h2o.policies.adakv import AdaKV
from h2o.policies.base import Budget, Observation, Policy, Selection, WithSinks
from h2o.policies.expected_attention import ExpectedAttention
from h2o.policies.h2o import H2O
from h2o.policies.h2o_avg import H2OAverage
from h2o.policies.h2o_shrink import H2OShrink
from h2o.policies.h2o_sink import H2OSink
from h2o.policies.keydiff import KeyDiff
from h2o.policies.knorm import KNorm
from h2o.policies.pyramidkv import PyramidKV
from h2o.policies.sink import Sink
from h2o.policies.snapkv import SnapKV
from h2o.policies.tova import TOVA
from h2o.policies.weighted import AttentionWeighted, H2OKeyNovel, H2OValueNorm, KeyNovel, ValueNormed

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    A2SF, AdaKV, ExpectedAttention, H2O, H2OAverage, H2OKeyNovel, H2OShrink, H2OSink, H2OValueNorm, KeyDiff, KNorm,
    PyramidKV, Sink, SnapKV, TOVA)}


def make_policy(name: str, heavy_ratio: float, recent_ratio: float, **options: object) -> Policy:
    """Build a registered policy; unknown names fail with the list of known ones."""
    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](heavy_ratio, recent_ratio, **options)


__all__ = ["AttentionWeighted", "Budget", "KeyNovel", "Observation", "POLICIES", "Policy", "Selection", "ValueNormed",
           "WithSinks", "make_policy"]
