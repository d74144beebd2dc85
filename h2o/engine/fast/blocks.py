"""Paged KV memory's bookkeeping: a pool of fixed-size blocks and the tables that map slots to them.

Instead of a rectangle of rows x capacity slots per layer, sized by the largest budget,
keys and values live in blocks of `block_size` slots, [kv_heads, block_size, head_dim] each for
keys and for values (positions, active flags and scores beside them, [kv_heads, block_size]).
One pool serves all layers; a row (one sequence of the batch) takes in each layer the blocks its
slot count there needs (per-layer budgets differ) and gives them back when it finishes, so a
short prompt holds a short prompt's memory. As vLLM's block manager, without prefix sharing:
eviction makes every row's slots its own.

Slot s of a row in a layer is offset s % block_size of the block at s // block_size of that
row's entry in the (layers, rows, max_blocks) block table. Block 0 is the null block (as vLLM's):
never handed out, it fills table entries past a row's blocks, so that every entry is a block
(a gather reads it harmlessly, a scatter writes into it harmlessly) and no operation needs a
data-dependent shape (a CUDA graph can replay them).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from h2o.policies import Budget

NULL_BLOCK = 0
# Per (KV head, slot) beside its key and value: position (int32), active (bool), score and
# views (float32).
SLOT_METADATA_BYTES = 4 + 1 + 4 + 4


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than asked for."""


class BlockPool:
    """Hands out block ids 1 .. num_blocks - 1 (0 is the null block); a block has one owner at a time."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = deque(range(1, num_blocks))
        self._owned: set[int] = set()

    @property
    def free_count(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """`n` free blocks, now owned by the caller."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} of {self.num_blocks - 1} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._owned.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give `blocks` back; all or none (a block not handed out, or listed twice, is refused)."""
        twice = sorted(b for b in set(blocks) if blocks.count(b) > 1)
        if twice:
            raise ValueError(f"blocks listed twice in one free: {twice}")
        stray = [b for b in blocks if b not in self._owned]
        if stray:
            raise ValueError(f"blocks {stray} are not handed out by this pool (freed twice, or not its own)")
        self._owned.difference_update(blocks)
        self._free.extend(blocks)


def row_slots(layer_budgets: list[Budget]) -> list[int]:
    """Slots a row needs in each layer: its heavy hitters and recent window, and one more (the
    token written before the step's eviction, or the one leaving the window)."""
    return [b.total + 1 for b in layer_budgets]


def _check_block_size(block_size: int) -> None:
    # A power of two: the kernels tile a block with `tl.arange`.
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")


def layer_blocks(slots_per_layer: list[int], block_size: int) -> list[int]:
    """Blocks a row needs in each layer, for its slot count there."""
    _check_block_size(block_size)
    return [math.ceil(s / block_size) for s in slots_per_layer]


def blocks_for(slots_per_layer: list[int], block_size: int) -> int:
    """Blocks a row takes from the pool: its blocks of every layer."""
    return sum(layer_blocks(slots_per_layer, block_size))


def block_bytes(kv_heads: int, block_size: int, head_dim: int, element_size: int) -> int:
    """Device bytes of one block: keys and values (`element_size` bytes each), and the slots' metadata."""
    return kv_heads * block_size * (2 * head_dim * element_size + SLOT_METADATA_BYTES)


def pool_size(free: int, total: int, gpu_memory_fraction: float, bytes_per_block: int, reserve: int,
              request_blocks: int) -> int:
    """Blocks the pool may hold (the null block among them): what `gpu_memory_fraction` of the
    card's `total` bytes leaves once the memory already in use (total - free: weights, other
    processes) and a `reserve` for activations are counted out. `free`, `total`: as
    torch.cuda.mem_get_info gives them. `request_blocks`: one request's blocks, which must fit."""
    if not 0.0 < gpu_memory_fraction <= 1.0:
        raise ValueError(f"--gpu_memory_fraction must lie in (0, 1], got {gpu_memory_fraction}")
    in_use = total - free
    room = int(total * gpu_memory_fraction) - in_use - reserve
    blocks = max(0, room) // bytes_per_block
    if blocks - 1 < request_blocks:
        gib = 1 << 30
        raise ValueError(
            f"--gpu_memory_fraction {gpu_memory_fraction}: {total * gpu_memory_fraction / gib:.2f} GiB of the card's "
            f"{total / gib:.2f} GiB, less {in_use / gib:.2f} GiB in use and {reserve / gib:.2f} GiB reserved, holds "
            f"{max(0, blocks - 1)} blocks of {bytes_per_block} bytes; one request needs {request_blocks}"
        )
    return blocks


def allocate_row(pool: BlockPool, slots_per_layer: list[int], block_size: int) -> list[list[int]]:
    """A row's blocks of each layer, taken from `pool` at once (all or, raising OutOfBlocks, none)."""
    counts = layer_blocks(slots_per_layer, block_size)
    blocks = iter(pool.allocate(sum(counts)))
    return [[next(blocks) for _ in range(n)] for n in counts]


class BlockTable:
    """Each (layer, row)'s blocks, on the device: `table`, int32 (layers, rows, max_blocks),
    entries past a row's blocks the null block. Updated in place, so that a captured CUDA graph
    that reads it stays valid."""

    def __init__(self, layers: int, rows: int, max_blocks: int, block_size: int,
                 device: torch.device | str = "cpu") -> None:
        _check_block_size(block_size)
        self.block_size = block_size
        self.table = torch.full((layers, rows, max_blocks), NULL_BLOCK, dtype=torch.int32, device=device)
        self._held: list[list[list[int]] | None] = [None] * rows

    def assign(self, row: int, blocks_per_layer: list[list[int]]) -> None:
        """`row` takes these blocks, one list per layer (slot s: block s // block_size of its layer's list)."""
        layers, _, max_blocks = self.table.shape
        if self._held[row] is not None:
            raise ValueError(f"row {row} holds blocks: release it first")
        if len(blocks_per_layer) != layers:
            raise ValueError(f"blocks for {len(blocks_per_layer)} layers, the table has {layers}")
        if max(map(len, blocks_per_layer), default=0) > max_blocks:
            raise ValueError(f"a layer of row {row} needs {max(map(len, blocks_per_layer))} blocks, "
                             f"the table has room for {max_blocks}")
        entries = torch.full((layers, max_blocks), NULL_BLOCK, dtype=torch.int32)
        for layer, blocks in enumerate(blocks_per_layer):
            entries[layer, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        self.table[:, row].copy_(entries)
        self._held[row] = [list(blocks) for blocks in blocks_per_layer]

    def release(self, row: int) -> list[int]:
        """`row` gives up its blocks; returns them (all layers'), for `BlockPool.free`."""
        held = self._held[row]
        self._held[row] = None
        self.table[:, row].fill_(NULL_BLOCK)
        return [] if held is None else [b for blocks in held for b in blocks]

    def slot_index(self, layer: int, rows: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of each of `slots` (long, (B, ...)) of `rows` (B,) in `layer`: int64,
        shaped as `slots`; the null block where a row has no block there."""
        return locate(self.table[layer, rows], slots, self.block_size)


def locate(tables: torch.Tensor, slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of `slots` (B, ...) through `tables` (B, max_blocks), one layer's rows of
    a block table."""
    flat = slots.reshape(slots.shape[0], -1)
    block = tables.long().gather(1, flat // block_size)
    return block.view_as(slots), slots % block_size


def gather(pool: torch.Tensor, tables: torch.Tensor, slots: int, fill: float | int | bool) -> torch.Tensor:
    """The dense (B, H, slots, ...) view, as FastCache's torch path reads it, of a pool
    (num_blocks, H, block_size, ...) through `tables` (B, max_blocks); slots where a row has no
    block read `fill` (a free slot: position -1, inactive, score 0)."""
    b, heads, block_size = tables.shape[0], pool.shape[1], pool.shape[2]
    index = torch.arange(slots, device=pool.device).expand(b, heads, slots)
    block, offset = locate(tables, index, block_size)
    view = pool[block, torch.arange(heads, device=pool.device).view(1, -1, 1), offset]
    missing = (block == NULL_BLOCK).view(*block.shape, *([1] * (pool.dim() - 3)))
    return view.masked_fill(missing, fill)


def scatter(pool: torch.Tensor, tables: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Write `values` (B, H, K, ...) into `slots` (B, H, K) of each (row, head), through `tables`
    (B, max_blocks), in place. A slot where a row has no block lands in the null block."""
    block, offset = locate(tables, slots, pool.shape[2])
    heads = torch.arange(pool.shape[1], device=pool.device).view(1, -1, 1).expand_as(slots)
    pool[block, heads, offset] = values.to(pool.dtype)
