"""The mechanism: a transformers `Cache` whose layers keep only the slots a `Policy` retains.

Each layer stores, per sequence and KV head, a row of slots: key, value, the token's absolute
position (-1 for an empty slot), whether the next query may attend to it, and its running score.

- mode "mask" reproduces the paper's simulation: every token stays in memory and evicted ones
  are masked out of attention, so nothing gets smaller.
- mode "drop" frees evicted slots for real: a KV head holds at most heavy + recent + 1 tokens
  (the +1 is the token that just left the recent window: the paper masks it for one step and
  may then pick it as a heavy hitter, so it must stay in memory).

Slots stay in position order in both modes, so drop mode does the same arithmetic as mask mode
on fewer columns. Attention comes in through `observe`, called by the attention function in
`h2o.engine.reference.attention` once it has computed the step's attention probabilities.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from h2o.engine.decoding import keep_retained, layer_table
from h2o.policies import Observation, Policy

KVMode = Literal["mask", "drop"]
KV_MODES: tuple[str, ...] = ("mask", "drop")


class EvictingCache(Cache):
    """A `Cache` for one batch of sequences with per-sequence budgets fixed by their prompts."""

    def __init__(
        self,
        policy: Policy,
        mode: KVMode,
        num_layers: int,
        prompt_lengths: list[int],
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in KV_MODES:
            raise ValueError(f"--kv_mode must be one of {KV_MODES}, got {mode!r}")
        self.policy = policy
        self.mode = mode
        self.budgets = [policy.budget(n) for n in prompt_lengths]
        # (layers, batch): each layer's heavy and recent budget per sequence.
        self.heavy, self.recent = layer_table([policy.layer_budgets(b, num_layers) for b in self.budgets], device)
        batch = len(prompt_lengths)
        self.n_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.query_positions = torch.zeros(batch, 0, dtype=torch.long, device=device)
        self.query_valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        # (head, slot) pairs each layer holds per sequence, and the peak of their sum over layers.
        self._held = torch.zeros(num_layers, batch, dtype=torch.long, device=device)
        self.peak_slots = torch.zeros(batch, dtype=torch.long, device=device)
        self.bytes_per_slot = 0
        super().__init__(layers=[EvictingLayer(self, i) for i in range(num_layers)])

    def begin(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Describe the tokens of the next forward pass: (batch, q) positions and which are real
        (left padding is not). Must be called before each forward."""
        self.query_positions = positions
        self.query_valid = valid
        self.n_tokens = self.n_tokens + valid.sum(-1)

    def account(self, layer_idx: int, positions: torch.Tensor, bytes_per_slot: int) -> None:
        self.bytes_per_slot = bytes_per_slot
        self._held[layer_idx] = (positions >= 0).sum(dim=(1, 2)).to(self._held.device)
        self.peak_slots = torch.maximum(self.peak_slots, self._held.sum(0))

    def peak_bytes(self) -> list[int]:
        """KV bytes held at the peak, per sequence (batch padding not counted)."""
        return [int(s) * self.bytes_per_slot for s in self.peak_slots.tolist()]


class EvictingLayer(CacheLayerMixin):
    """One decoder layer's slots. Shapes: keys/values (B, H, S, D); positions/active/scores (B, H, S)."""

    is_sliding = False

    def __init__(self, owner: EvictingCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, d)
        self.positions = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.active = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self.scores = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        self.views = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        heads, q = key_states.shape[1], key_states.shape[2]
        # With a device_map, layers live on several devices; the batch's bookkeeping on the first.
        valid = self.owner.query_valid.to(self.device)
        positions = self.owner.query_positions.to(self.device).masked_fill(~valid, -1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.positions = torch.cat([self.positions, positions[:, None].expand(-1, heads, q)], dim=-1)
        self.active = torch.cat([self.active, valid[:, None].expand(-1, heads, q)], dim=-1)
        fresh = self.scores.new_zeros(self.scores.shape[0], heads, q)
        self.scores = torch.cat([self.scores, fresh], dim=-1)
        self.views = torch.cat([self.views, fresh], dim=-1)
        self._account()
        return self.keys, self.values

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S) positions and active flags of the slots the current pass attends over."""
        return self.positions, self.active

    def observe(self, observed: Observation) -> None:
        """Take what this pass's attention says of each slot, and evict for the next pass."""
        owner = self.owner
        scores = owner.policy.accumulate(self.scores, observed)
        self.views = self.views + observed.seen
        here = self.device
        chosen = owner.policy.select(
            scores, self.views, self.positions, owner.n_tokens.to(here), owner.heavy[self.layer_idx].to(here),
            owner.recent[self.layer_idx].to(here)
        )
        self.scores = scores * chosen.retained
        self.active = chosen.active
        if owner.mode == "drop":
            self._keep(chosen.retained)

    def _keep(self, retained: torch.Tensor) -> None:
        # As wide as the row that keeps most; shorter rows end in empty slots.
        width = int(retained.sum(-1).max())
        self.keys, self.values, self.positions, self.active, self.scores, self.views = keep_retained(
            retained, width, self.keys, self.values, self.positions, self.active, self.scores, self.views
        )
        self._account()

    def _account(self) -> None:
        per_slot = 2 * self.keys.shape[-1] * self.keys.element_size()
        self.owner.account(self.layer_idx, self.positions, per_slot)

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1
