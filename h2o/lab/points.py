"""What the lab measures: points, each a policy at a KV budget (and its knob's value), the names
the sweep and the analysis take in --policies, and the JSON files their records go to."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from h2o import policies
from h2o.engine.reference.generation import Eviction
from h2o.serve.options import ServeOptions
from h2o.serve.results import write_whole

BUDGETS = (0.04, 0.10, 0.20, 0.40)
# The paper's baseline: H2O with no heavy hitters, the recent window alone. Not a registered
# policy of its own; `Point` is where it becomes one.
LOCAL = "local"
# Every policy a point may hold, in the sweep's default order: the paper's two first, then the registry's.
POLICIES = ("h2o", LOCAL, *(name for name in policies.POLICIES if name != "h2o"))


@dataclass(frozen=True)
class Point:
    policy: str  # a name of POLICIES, or "full"
    budget: float  # share of the prompt kept; 1.0 for the full cache
    knob: float | None = None  # the policy's `knob` option; None: the policy's default

    @property
    def label(self) -> str:
        """The policy as the report names it: `h2o-shrink:0.5` for a knob's value."""
        return self.policy if self.knob is None else f"{self.policy}:{self.knob:g}"

    @property
    def name(self) -> str:
        return "full" if self.policy == "full" else f"{self.label.replace(':', '_')}-{round(self.budget * 100):02d}"

    @property
    def registered(self) -> str:
        """The registered policy that serves this point (local is h2o's)."""
        return "h2o" if self.policy == LOCAL else self.policy

    def options(self) -> dict[str, float]:
        return {} if self.knob is None else {policies.POLICIES[self.registered].knob: self.knob}

    def ratios(self) -> tuple[float, float]:
        """(heavy, recent): a policy on the paper's heavy + recent budget (H2O and its variants)
        splits it half and half, as the paper; local is all recent; a policy with a budget of its
        own (sink, tova) reads only the total."""
        if self.policy != LOCAL and policies.POLICIES[self.registered].budget is policies.Policy.budget:
            return self.budget / 2, self.budget / 2
        return 0.0, self.budget

    def serve_options(self, base: ServeOptions) -> ServeOptions:
        """`base` (where the run reads and writes, the model) with this point's cache: the full
        cache, or the policy at its budget; a knob is run_helm.py's flag of that name."""
        if self.policy == "full":
            return replace(base, enable_small_cache=False)
        heavy, recent = self.ratios()
        return replace(base, enable_small_cache=True, policy=self.registered, heavy_ratio=heavy, recent_ratio=recent,
                       **self.options())

    def eviction(self) -> Eviction:
        heavy, recent = self.ratios()
        return Eviction(policies.make_policy(self.registered, heavy, recent, **self.options()), "drop")


def policy_spec(spec: str) -> tuple[str, float | None]:
    """`NAME` or `NAME:VALUE` (VALUE for the policy's knob) from --policies."""
    name, _, value = spec.partition(":")
    known = name in POLICIES
    if not known or (value and not policies.POLICIES[Point(name, 1.0).registered].knob):
        why = "unknown policy" if not known else f"{name} has no knob to set"
        raise ValueError(f"--policies {spec}: {why}")
    try:
        return name, float(value) if value else None
    except ValueError:
        raise ValueError(f"--policies {spec}: {value!r} is not a number") from None


def points(specs: list[str] | tuple[str, ...], budgets: list[float] | tuple[float, ...]) -> list[Point]:
    """The full cache, then every spec (`policy_spec`) at each budget, budget by budget."""
    return [Point("full", 1.0)] + [Point(name, b, knob) for b in budgets for name, knob in map(policy_spec, specs)]


def parse_budgets(text: str) -> tuple[float, ...]:
    """--budgets: comma-separated shares of the prompt."""
    return tuple(float(x) for x in text.split(","))


def parse_policies(text: str) -> tuple[str, ...]:
    """--policies: comma-separated specs (`policy_spec`)."""
    return tuple(text.split(","))


def write_json(path: Path, data: object) -> None:
    """A record (a point, the settings, the analysis) whole or absent, never half written."""
    write_whole(path, json.dumps(data, indent=1))
