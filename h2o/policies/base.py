"""The shared shape of every eviction policy: a per-slot score, a recent window and a top-k.

A policy decides *which* cached tokens stay; it never changes keys or values. It sees per-slot
tensors shaped (batch, kv_heads, slots) and per-sequence budgets shaped (batch,), so the same
code serves mask mode (slots in position order, evicted ones still present) and drop mode
(only retained slots present, in any order). A policy that scores from the keys, the values or
the queries' statistics says so (`reads_keys`, `reads_values`, `query_stats`), and the attention
hands it them.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class Budget:
    """Tokens one sequence may keep per KV head: `heavy` chosen by score, `recent` by position."""

    heavy: int
    recent: int

    @property
    def total(self) -> int:
        return self.heavy + self.recent


@dataclass(frozen=True)
class Selection:
    """What the next step sees. `active`: slots the next query attends to. `retained`: slots that
    must stay in memory, a superset of `active` (a token may sit out one step and come back)."""

    active: torch.Tensor
    retained: torch.Tensor


@dataclass(frozen=True)
class SlotRoles:
    """Where each slot stands in the paper's selection, (B, H, S) booleans but `over_budget`.

    Of the present slots, `window` is kept by position; `leaving` (with `parks_leaving_token` and
    a heavy budget) just left the window, sits out the next step and stays in memory;
    `candidate` competes for the heavy budget. Only a sequence `over_budget`, (B, 1, 1), evicts."""

    present: torch.Tensor
    over_budget: torch.Tensor
    window: torch.Tensor
    leaving: torch.Tensor
    candidate: torch.Tensor


@dataclass(frozen=True)
class Observation:
    """What one forward pass's attention says of each slot; each tensor is (B, H, S)."""

    received: torch.Tensor  # probability mass, summed over query rows and the heads sharing the KV head
    newest: torch.Tensor  # the same from the newest query row alone
    seen: torch.Tensor  # how many (query row, query head) pairs could attend to the slot
    key_norms: torch.Tensor | None = None  # L2 norm of each slot's key (float32), for `reads_key_norms`
    # A prompt pass only, for a policy with `window_rows`: the mass from the last window_rows
    # query rows of each sequence alone.
    window: torch.Tensor | None = None
    positions: torch.Tensor | None = None  # (B, H, S) each slot's token position, -1 for an empty slot
    keys: torch.Tensor | None = None  # (B, H, S, D) float32 keys as cached (after RoPE), for `reads_keys`
    values: torch.Tensor | None = None  # (B, H, S, D) float32 values, for `reads_values`
    # A prompt pass only, for a policy with `query_stats`: the mean (B, Hq, D) and covariance
    # (B, Hq, D, D) of each sequence's queries before RoPE, then rotated by RoPE averaged over
    # the coming positions (no rotation for a model without RoPE).
    query_mean: torch.Tensor | None = None
    query_cov: torch.Tensor | None = None


def check_ratios(heavy_ratio: float, recent_ratio: float) -> None:
    """The paper's budget shares, each in [0, 1] and together at most the whole prompt."""
    for flag, value in (("--heavy_ratio", heavy_ratio), ("--recent_ratio", recent_ratio)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must lie in [0, 1], got {value}")
    if heavy_ratio + recent_ratio > 1.0:
        raise ValueError(f"--heavy_ratio + --recent_ratio must be at most 1, got {heavy_ratio + recent_ratio}")


class Policy(ABC):
    """Base class: the paper's recent-window + heavy-hitter selection over a policy's own score.

    Subclasses override `accumulate` (how attention turns into a running score) and/or `rank`
    (what the top-k sorts on). Budgets are fixed from the prompt length, as in the paper.
    """

    name: ClassVar[str]
    # The paper's code masks the token leaving the recent window for one step, then lets it
    # compete as a heavy hitter. Policies from other papers let it compete at once.
    parks_leaving_token: ClassVar[bool] = True
    # Whether `accumulate` reads the keys' norms (the attention computes them only then).
    reads_key_norms: ClassVar[bool] = False
    # Query rows at a prompt's end whose attention `accumulate` reads apart (`Observation.window`).
    window_rows: ClassVar[int] = 0
    # Whether `accumulate` reads the keys or the values themselves (`Observation.keys`, `.values`).
    reads_keys: ClassVar[bool] = False
    reads_values: ClassVar[bool] = False
    # (first tokens left out, coming positions averaged over) for `Observation.query_mean` and
    # `.query_cov`, or None when the policy reads no query statistics.
    query_stats: ClassVar[tuple[int, int] | None] = None
    # The one constructor option a sweep may tune (also run_helm.py's flag of that name), or "".
    knob: ClassVar[str] = ""

    def __init__(self, heavy_ratio: float, recent_ratio: float) -> None:
        check_ratios(heavy_ratio, recent_ratio)
        self.heavy_ratio = heavy_ratio
        self.recent_ratio = recent_ratio

    def budget(self, prompt_len: int) -> Budget:
        # int() truncation as in the paper. The recent window always holds at least the newest
        # token: with 0 the paper's code masks the newest token from itself, which no model expects.
        return Budget(
            heavy=int(self.heavy_ratio * prompt_len),
            recent=max(1, int(self.recent_ratio * prompt_len)),
        )

    def layer_budgets(self, budget: Budget, layers: int) -> list[Budget]:
        """Each layer's share of a sequence's budget (the paper: the same in every layer)."""
        return [budget] * layers

    def held(self, prompt_len: int, layers: int) -> int:
        """Tokens per KV head, summed over the layers, that a sequence's cache holds once over
        budget: every layer's heavy hitters and recent window (a parked token aside). What two
        policies compare at equal memory."""
        return sum(b.total for b in self.layer_budgets(self.budget(prompt_len), layers))

    def accumulate(self, scores: torch.Tensor, observed: Observation) -> torch.Tensor:
        """Running score after one forward pass (H2O: attention summed since the prefill)."""
        return scores + observed.received

    def row_weights(self, ages: torch.Tensor) -> torch.Tensor | None:
        """What each query row's attention counts for in `Observation.received`, from its age (B, q):
        how many rows of its sequence come after it in this pass. None: every row counts once."""
        return None

    def rank(self, scores: torch.Tensor, views: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """What the heavy top-k sorts on (higher is kept); `views` counts the (query row, head)
        pairs that could attend to each slot so far."""
        return scores

    @classmethod
    def uses_base_selection(cls) -> bool:
        """Whether the policy keeps this class's `select` (what the fast engine implements)."""
        return cls.select is Policy.select

    def slot_roles(
        self, positions: torch.Tensor, n_tokens: torch.Tensor, heavy: torch.Tensor, recent: torch.Tensor
    ) -> SlotRoles:
        """The masks `select` chooses from (shapes as in `select`). Tensor operations only, so
        that a CUDA graph can capture them."""
        t = n_tokens.view(-1, 1, 1)
        h = heavy.view(-1, 1, 1)
        r = recent.view(-1, 1, 1)
        present = positions >= 0
        window = present & (positions >= t + 1 - r)
        if self.parks_leaving_token:
            leaving = present & (positions == t - r) & (h > 0)
            candidate = present & (positions < t - r)
        else:
            leaving = torch.zeros_like(present)
            candidate = present & (positions < t + 1 - r)
        return SlotRoles(present=present, over_budget=t > h + r, window=window, leaving=leaving, candidate=candidate)

    def select(
        self,
        scores: torch.Tensor,
        views: torch.Tensor,
        positions: torch.Tensor,
        n_tokens: torch.Tensor,
        heavy: torch.Tensor,
        recent: torch.Tensor,
        max_heavy: int | None = None,
    ) -> Selection:
        """Choose the slots for the next step, after `n_tokens` tokens of each sequence were seen.

        positions: (B, H, S) absolute position of each slot's token, -1 for an empty slot.
        n_tokens, heavy, recent: (B,). The next token joins the recent window, so the window keeps
        the last `recent - 1` seen tokens. With `parks_leaving_token`, the token just leaving the
        window is not attended next step but stays a heavy-hitter candidate: the paper's code,
        column for column. `max_heavy` (the largest of `heavy`, where the caller knows it) saves
        reading it back from the device.
        """
        roles = self.slot_roles(positions, n_tokens, heavy, recent)
        chosen = torch.zeros_like(roles.present)
        k = min(int(heavy.max()) if max_heavy is None else max_heavy, positions.shape[-1])
        if k > 0:
            ranked = self.rank(scores, views, positions).masked_fill(~roles.candidate, float("-inf"))
            top_values, top_slots = ranked.topk(k, dim=-1)
            wanted = torch.arange(k, device=positions.device).view(1, 1, -1) < heavy.view(-1, 1, 1)
            chosen.scatter_(-1, top_slots, wanted & (top_values > float("-inf")))

        active = torch.where(roles.over_budget, roles.window | chosen, roles.present)
        retained = torch.where(roles.over_budget, active | roles.leaving, roles.present)
        return Selection(active=active, retained=retained)


def later_wins_ties(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`scores` as a ranking where exactly equal scores go to the later token, whatever the
    slots' order (so that drop, mask and both engines choose alike). The nudge, 1e-15 a position
    in float64 (a few float64 steps at any score up to a few), is far below float32's steps
    between two different scores."""
    return scores.double() + positions.double() * 1e-15


class WithSinks(Policy):
    """A policy that always keeps the first `sink_size` tokens (`--sink_size`)."""

    def __init__(self, heavy_ratio: float, recent_ratio: float, sink_size: int = 4) -> None:
        super().__init__(heavy_ratio, recent_ratio)
        if sink_size < 0:
            raise ValueError(f"--sink_size must be >= 0, got {sink_size}")
        self.sink_size = sink_size
