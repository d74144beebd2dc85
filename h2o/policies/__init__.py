"""Eviction policies by name. Adding one: a module with a `Policy` subclass and a line below."""

from h2o.policies.adakv import AdaKV
from h2o.policies.base import Budget, Observation, Policy, Selection, WithSinks
from h2o.policies.h2o import H2O
from h2o.policies.h2o_avg import H2OAverage
from h2o.policies.h2o_shrink import H2OShrink
from h2o.policies.h2o_sink import H2OSink
from h2o.policies.knorm import KNorm
from h2o.policies.pyramidkv import PyramidKV
from h2o.policies.sink import Sink
from h2o.policies.snapkv import SnapKV
from h2o.policies.tova import TOVA

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (AdaKV, H2O, H2OAverage, H2OShrink, H2OSink, KNorm, PyramidKV, Sink, SnapKV, TOVA)}


def make_policy(name: str, heavy_ratio: float, recent_ratio: float, **options: object) -> Policy:
    """Build a registered policy; unknown names fail with the list of known ones."""
    if name not in POLICIES:
        raise ValueError(f"--policy: unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](heavy_ratio, recent_ratio, **options)


__all__ = ["Budget", "Observation", "POLICIES", "Policy", "Selection", "WithSinks", "make_policy"]
