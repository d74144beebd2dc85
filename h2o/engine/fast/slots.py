"""A static-shape eviction cache: heavy + recent + 1 slots per (layer, sequence, KV head), in blocks.

Why it can be static: once a sequence is over budget, every decode step adds one token and the
paper's selection removes exactly one (the lowest-ranked of the heavy set plus the token that
left the recent window a step earlier), so the number of held tokens never changes. The new
token's key and value go into the freed slot, with its absolute position beside it (keys are
cached after RoPE and attention does not depend on slot order). Every step then has the same
shapes and touches the same memory, which a CUDA graph can capture.

The slots live in one pool of fixed-size blocks shared by all layers (`h2o.engine.fast.blocks`),
sized once: a row holds in each layer the blocks its own budget there needs, taken when its
request starts and given back when it ends. The block table changes in place, so a captured
CUDA graph stays valid across admissions.

Prefill goes a slice of the batch at a time: a slice's full-length keys and values exist for
one layer at a time, are scored by the reference attention (`h2o.engine.reference.attention`) and compacted into
the slots by the policy's own `select` before the next layer runs.

Two ways to compute a step, same decisions:
- torch: the reference attention over a dense view of the rows' slots, gathered through the
  block table (the paper's eager arithmetic), then the eviction as a masked argmin, written
  back through the table. Any policy that keeps `Policy.select`.
- kernels (Triton; H2O's own scoring only): SDPA plus `kernels.prefill_scores` for the
  prefill, and `kernels.decode_step_paged` (attention, scoring and eviction fused, reading
  the blocks in place) per decode step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from h2o.engine.decoding import keep_retained, layer_table
from h2o.engine.fast import kernels
from h2o.engine.fast.blocks import (BlockPool, BlockTable, OutOfBlocks, allocate_row, blocks_for, gather, layer_blocks,
                                   row_slots, scatter)
# The torch path reuses the reference attention on purpose: the paper's arithmetic, op for op.
from h2o.engine.reference.attention import attend
from h2o.policies import Budget, Observation, Policy

# Slots per block: on an H200 the paged decode kernel times as the dense one at 32, up to 15%
# slower at 16.
BLOCK_SIZE = 32


class FastCache(Cache):
    """Slots for one batch of sequences, budgets fixed by their prompt lengths.

    `num_blocks` None: a pool just large enough for the rows' budgets, every row holding its
    blocks from the start. Given: a pool of that many blocks (the null block among them), rows
    holding none until `assign`, a table `max_blocks` wide (a layer's blocks of the largest row).
    `use_kernels`: the Triton kernels (default: wherever they can run and the policy is H2O's
    scoring: running sum of attention, highest kept, leaving token parked for a step)."""

    def __init__(
        self,
        policy: Policy,
        num_layers: int,
        prompt_lengths: list[int],
        device: torch.device | str = "cpu",
        use_kernels: bool | None = None,
        *,
        budgets: list[Budget] | None = None,
        has_heavy: bool | None = None,
        num_blocks: int | None = None,
        max_blocks: int | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if not policy.uses_base_selection():
            raise ValueError(f"the fast path implements Policy.select; {type(policy).__name__} overrides it")
        device = torch.device(device)
        self.kernels_asked = use_kernels
        h2o_scoring = (type(policy).accumulate is Policy.accumulate and type(policy).rank is Policy.rank
                       and policy.parks_leaving_token)
        if use_kernels is None:
            use_kernels = kernels.available(device) and h2o_scoring
        elif use_kernels and not (kernels.available(device) and h2o_scoring):
            raise ValueError("the Triton kernels need Triton on this device and H2O's own scoring")
        self.policy = policy
        self.use_kernels = use_kernels
        # `budgets` overrides the policy's (the full cache: no heavy hitters, a window as long as
        # prompt + max_tokens).
        self.budgets = budgets if budgets is not None else [policy.budget(n) for n in prompt_lengths]
        self.batch, self.num_layers = len(self.budgets), num_layers
        # Each row's budget in each layer; (layers, batch) tensors of them.
        self.layer_budgets = [policy.layer_budgets(b, num_layers) for b in self.budgets]
        self.block_size = block_size
        needs = [row_slots(per_layer) for per_layer in self.layer_budgets]
        if max_blocks is None:
            max_blocks = max(max(layer_blocks(need, block_size)) for need in needs)
        self.table = BlockTable(num_layers, self.batch, max_blocks, block_size, device)
        self.slots = max_blocks * block_size  # a row's slots in a dense view, its blocks' and the null block's
        owned = num_blocks is None
        self.pool = BlockPool(1 + sum(blocks_for(need, block_size) for need in needs) if owned else num_blocks)
        if owned:
            for row, need in enumerate(needs):
                self.table.assign(row, allocate_row(self.pool, need, block_size))
        self.blocks: dict[str, torch.Tensor] = {}  # the pool's tensors, made at the first keys
        self.heavy, self.recent = layer_table(self.layer_budgets, device)
        # No heavy hitters anywhere: scores are never read, so the kernels never compute them.
        # Rows that will be re-assigned later say so with `has_heavy`.
        self.has_heavy = bool(self.heavy.gt(0).any()) if has_heavy is None else has_heavy
        # `views` only matter to a policy whose ranking may read them.
        self.tracks_views = type(policy).rank is not Policy.rank
        # A policy that lets the leaving token compete at once may have two candidates too many
        # on the step a sequence first goes over budget (never more).
        self.evictions_per_step = 1 if policy.parks_leaving_token else 2
        self.n_tokens = torch.zeros(self.batch, dtype=torch.long, device=device)
        # Slots in use lie below min(tokens seen, heavy + recent + 1) of each layer: a new token
        # takes the first free slot, and the prefill packs what it keeps at the front. The kernel
        # reads no further, so never past a row's own blocks. (layers, batch).
        self.limits = torch.zeros_like(self.heavy)
        self.rows: slice | None = None
        self.query_positions = torch.zeros(self.batch, 0, dtype=torch.long, device=device)
        self.query_valid = torch.zeros(self.batch, 0, dtype=torch.bool, device=device)
        self._one_valid = torch.ones(self.batch, 1, dtype=torch.bool, device=device)
        self.unpadded = False
        super().__init__(layers=[FastLayer(self, i) for i in range(num_layers)])

    def assign(self, rows: list[int], budgets: list[Budget]) -> None:
        """Batch rows `rows` (holding no blocks) take new sequences with these budgets and their
        blocks (their prompts come next, by `begin_prefill`); OutOfBlocks where the pool has too
        few free, with no row changed."""
        layered = [self.policy.layer_budgets(b, self.num_layers) for b in budgets]
        slots = [row_slots(per_layer) for per_layer in layered]
        needed = sum(blocks_for(need, self.block_size) for need in slots)
        if not self.pool.can_allocate(needed):
            raise OutOfBlocks(f"{len(rows)} sequences need {needed} blocks, {self.pool.free_count} are free")
        for row, budget, per_layer, need in zip(rows, budgets, layered, slots):
            self.budgets[row], self.layer_budgets[row] = budget, per_layer
            self.table.assign(row, allocate_row(self.pool, need, self.block_size))
        index = torch.tensor(rows, device=self.heavy.device)
        self.heavy[:, index], self.recent[:, index] = layer_table(layered, self.heavy.device)

    def release(self, row: int) -> None:
        """Batch row `row`'s sequence ended: its blocks go back to the pool."""
        self.pool.free(self.table.release(row))

    def begin_prefill(self, rows: slice | list[int], positions: torch.Tensor, valid: torch.Tensor,
                      unpadded: bool | None = None) -> None:
        """The next forward is the prompts of batch rows `rows`: (rows, n) positions, and which
        tokens are real (left padding is not; `unpadded` says there is none, where the caller
        knows it without reading `valid` back from the device)."""
        if isinstance(rows, list):
            contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
            self.max_heavy = max(b.heavy for r in rows for b in self.layer_budgets[r])
            rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=self.heavy.device)
        else:
            self.max_heavy = max(b.heavy for per_layer in self.layer_budgets[rows] for b in per_layer)
        self.rows = rows
        self.query_positions = positions
        self.query_valid = valid
        self.unpadded = bool(valid.all()) if unpadded is None else unpadded
        self.n_tokens[rows] = valid.sum(-1)

    def begin_decode(self, positions: torch.Tensor) -> None:
        """The next forward is one new token for every row, at (B, 1) `positions`. Tensor
        operations only, so that a CUDA graph can replay it."""
        self.rows = None
        self.query_positions = positions
        self.query_valid = self._one_valid
        self.n_tokens.copy_(positions[:, -1] + 1)
        torch.minimum(self.n_tokens, self.heavy + self.recent + 1, out=self.limits)

    def kv_bytes(self) -> int:
        """Bytes of the pool's key and value blocks."""
        return sum(self.blocks[name].nbytes for name in ("keys", "values") if name in self.blocks)

    def _make_pool(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, heads, size = self.pool.num_blocks, key_states.shape[1], self.block_size
        device = key_states.device
        # Zeros, not empty: a masked slot's probability is exactly 0, but 0 * NaN garbage is not.
        self.blocks = {
            "keys": key_states.new_zeros(n, heads, size, key_states.shape[-1]),
            "values": value_states.new_zeros(n, heads, size, value_states.shape[-1]),
            "positions": torch.full((n, heads, size), -1, dtype=torch.int32, device=device),
            "active": torch.zeros(n, heads, size, dtype=torch.bool, device=device),
            "scores": torch.zeros(n, heads, size, dtype=torch.float32, device=device),
            "views": torch.zeros(n, heads, size, dtype=torch.float32, device=device),
        }


class FastLayer(CacheLayerMixin):
    """One decoder layer's slots, in the owner's block pool through its row of the block table.
    During a torch-path pass, `dense`: keys/values (B, H, S, D); positions (int32, -1 = free),
    active (attended by the next query), scores and views (float32): (B, H, S), gathered from
    the blocks and written back once the pass has evicted."""

    is_sliding = False

    def __init__(self, owner: FastCache, layer_idx: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.owner.use_kernels and not kernels.fits(key_states.shape[-1]):
            # Known at the first layer's first keys, before any attention: the torch path serves.
            if self.owner.kernels_asked:
                raise ValueError(f"the Triton kernels take head sizes 16, 32, 64, ...; not {key_states.shape[-1]}")
            self.owner.use_kernels = False
        self.device = key_states.device
        if not self.owner.blocks:
            self.owner._make_pool(key_states, value_states)
        self.is_initialized = True

    def _tables(self) -> torch.Tensor:
        """(B, max_blocks) block table rows of this pass's sequences in this layer."""
        table = self.owner.table.table[self.layer_idx]
        return table if self.owner.rows is None else table[self.owner.rows]

    def view(self) -> dict[str, torch.Tensor]:
        """Every row's slots as dense (B, H, S, ...) tensors: keys, values, positions, active,
        scores, views (a free slot, where a row has no block: position -1, inactive, zeros)."""
        tables, fills = self.owner.table.table[self.layer_idx], {"positions": -1, "active": False}
        return {name: gather(pool, tables, self.owner.slots, fills.get(name, 0))
                for name, pool in self.owner.blocks.items()}

    def _write_back(self, names: tuple[str, ...]) -> None:
        """The dense view's `names`, every slot, into the blocks (a slot past a row's blocks
        lands in the null block)."""
        tables, dense = self._tables(), self.dense
        b, h, s = dense["positions"].shape
        slots = torch.arange(s, device=tables.device).expand(b, h, s)
        for name in names:
            scatter(self.owner.blocks[name], tables, slots, dense[name])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        heads = key_states.shape[1]
        if owner.rows is not None:
            # Prefill: attend over the slice's own tokens; `observe` compacts them once scored.
            n = key_states.shape[2]
            self.prompt = (key_states, value_states,
                           owner.query_positions.masked_fill(~owner.query_valid, -1)[:, None].expand(-1, heads, n),
                           owner.query_valid[:, None].expand(-1, heads, n))
            return key_states, value_states
        # A free slot (position -1) always exists: at most heavy + recent are held between steps.
        tables, blocks = self._tables(), owner.blocks
        position = owner.query_positions[:, None, -1:].expand(-1, heads, 1).to(torch.int32)
        if owner.use_kernels:  # the kernel reads the blocks in place
            slot = gather(blocks["positions"], tables, owner.slots, -1).argmin(-1, keepdim=True)
            scatter(blocks["positions"], tables, slot, position)
            scatter(blocks["active"], tables, slot, torch.ones_like(slot, dtype=torch.bool))
        else:
            # The torch path attends over a dense view; its positions and active flags go back to
            # the blocks with the eviction (`observe`), its keys and values only here.
            dense = self.dense = self.view()
            slot = dense["positions"].argmin(-1, keepdim=True)
            index = slot[..., None].expand(-1, -1, 1, key_states.shape[-1])
            dense["keys"].scatter_(2, index, key_states)
            dense["values"].scatter_(2, index, value_states)
            dense["positions"].scatter_(2, slot, position)
            dense["active"].scatter_(2, slot, True)
        scatter(blocks["keys"], tables, slot, key_states)
        scatter(blocks["values"], tables, slot, value_states)
        if owner.use_kernels:
            return key_states, value_states
        return self.dense["keys"], self.dense["values"]

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, S) positions and active flags of the slots the current pass attends over."""
        if self.owner.rows is not None:
            _, _, positions, active = self.prompt
            return positions, active
        return self.dense["positions"], self.dense["active"]

    def observe(self, observed: Observation) -> None:
        """What the reference attention saw this pass: fill the slots (prefill) or evict (decode)."""
        policy = self.owner.policy
        if self.owner.rows is not None:
            scores = policy.accumulate(torch.zeros_like(observed.received), observed)
            self._fill(scores, observed.seen)
        else:
            self._evict(policy.accumulate(self.dense["scores"], observed), observed.seen)
            self._write_back(("positions", "active", "scores", "views"))
            del self.dense

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
        """Kernel path of a slice's prefill: SDPA output, H2O scores without the attention matrix."""
        owner = self.owner
        groups = query.shape[1] // key.shape[1]
        starts = None
        if owner.unpadded:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=groups > 1)
        else:
            # Left padding: real rows see no padding, a padding row sees itself (a row that sees
            # nothing would be NaN, and NaN keys poison the next layer's padding columns).
            starts = (~owner.query_valid).sum(-1)
            n = query.shape[2]
            column = torch.arange(n, device=query.device)
            causal = column[None, :] <= column[:, None]
            visible = causal & ((column >= starts[:, None, None]) | torch.eye(n, dtype=torch.bool, device=query.device))
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None], scale=scaling,
                                                 enable_gqa=groups > 1)
        if owner.has_heavy:
            scores = kernels.prefill_scores(query, key, scaling, starts=starts)
        else:
            scores = torch.zeros(key.shape[:3], dtype=torch.float32, device=key.device)
        self._fill(scores, None)
        return out

    def _fill(self, scores: torch.Tensor, views: torch.Tensor | None) -> None:
        """Keep what the policy retains of the slice's prompt tokens, in position order, in the
        rows' blocks; their other slots are free (the blocks may hold an earlier row's)."""
        owner, rows = self.owner, self.owner.rows
        key, value, positions, _ = self.prompt
        del self.prompt
        views = views if views is not None else torch.zeros_like(scores)
        chosen = owner.policy.select(scores, views, positions, owner.n_tokens[rows],
                                     owner.heavy[self.layer_idx, rows], owner.recent[self.layer_idx, rows],
                                     owner.max_heavy)
        width = min(positions.shape[-1], owner.slots)
        keys, values, kept_positions, active, kept_scores, kept_views = keep_retained(
            chosen.retained, width, key, value, positions, chosen.active, scores * chosen.retained, views
        )
        free = owner.slots - width

        def padded(kept: torch.Tensor, fill: float | int | bool) -> torch.Tensor:
            return F.pad(kept, (0, free), value=fill) if free else kept

        self.dense = {"positions": padded(kept_positions.to(torch.int32), -1), "active": padded(active, False),
                      "scores": padded(kept_scores, 0.0), "views": padded(kept_views, 0.0)}
        self._write_back(("positions", "active", "scores", "views"))
        del self.dense
        tables = self._tables()
        slots = torch.arange(width, device=tables.device).expand(*keys.shape[:3])
        scatter(owner.blocks["keys"], tables, slots, keys)
        scatter(owner.blocks["values"], tables, slots, values)

    def _evict(self, scores: torch.Tensor, seen: torch.Tensor) -> None:
        """`Policy.select` for one decode step on the dense view, without a host sync: the
        lowest-ranked candidates while more than `heavy` remain (at most `evictions_per_step`)."""
        owner, dense = self.owner, self.dense
        positions = dense["positions"]
        heavy = owner.heavy[self.layer_idx]
        roles = owner.policy.slot_roles(positions, owner.n_tokens, heavy, owner.recent[self.layer_idx])
        present, over, candidate = roles.present, roles.over_budget, roles.candidate
        heavy = heavy.view(-1, 1, 1)
        views = dense["views"] + seen if owner.tracks_views else dense["views"]
        # Without heavy hitters the window alone stays.
        drop = present & over & (heavy == 0) & ~roles.window
        if owner.has_heavy:
            ranked = owner.policy.rank(scores, views, positions).masked_fill(~candidate, float("inf"))
            for _ in range(owner.evictions_per_step):
                victim = ranked.argmin(-1, keepdim=True)
                excess = candidate.sum(-1, keepdim=True) > heavy
                hit = candidate.gather(-1, victim) & over & excess & (heavy > 0)
                dropped = torch.zeros_like(drop).scatter_(-1, victim, hit)
                drop = drop | dropped
                candidate = candidate & ~dropped
                ranked = ranked.masked_fill(dropped, float("inf"))
        keep = present & ~drop
        dense["positions"] = positions.masked_fill(~keep, -1)
        dense["scores"] = scores * keep
        dense["views"] = views * keep
        dense["active"] = keep & ~(roles.leaving & over)

    def decode(self, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Kernel path of a decode step: attention, scoring and eviction in one kernel, on the blocks."""
        owner, blocks, i = self.owner, self.owner.blocks, self.layer_idx
        return kernels.decode_step_paged(
            query, blocks["keys"], blocks["values"], blocks["positions"], blocks["active"], blocks["scores"],
            owner.table.table[i], owner.n_tokens, owner.heavy[i], owner.recent[i], scaling, owner.has_heavy,
            limits=owner.limits[i],
        )

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized else self.owner.slots

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.owner.slots


def fast_eviction_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention over a `FastCache` layer: the prefill of a slice, or one decode step. The
    attention mask is unused: the cache's positions say what each query may see."""
    cache = kwargs.get("eviction_cache")
    if not isinstance(cache, FastCache):
        raise RuntimeError("h2o_fast attention needs the model call to pass eviction_cache=<FastCache>")
    layer = cache.layers[module.layer_idx]
    prefill = cache.rows is not None
    if not cache.use_kernels:
        return attend(module, query, key, value, scaling, cache, use_sdpa=False)
    out = layer.prefill(query, key, value, scaling) if prefill else layer.decode(query, scaling)
    return out.transpose(1, 2).contiguous(), None


ATTENTION = "h2o_fast"
AttentionInterface.register(ATTENTION, fast_eviction_attention)
