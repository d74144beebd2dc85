"""h2o.engine.fast.blocks: the block pool, the per-row block counts, the pool's size, the block table."""

from __future__ import annotations

import random

import pytest
import torch

from h2o.engine.fast.blocks import (
    NULL_BLOCK, BlockPool, BlockTable, OutOfBlocks, allocate_row, block_bytes, blocks_for, gather, layer_blocks,
    pool_size, row_slots, scatter,
)
from h2o.policies import Budget, make_policy

GiB = 1 << 30


def test_allocate_and_free_round_trips_leak_nothing():
    pool = BlockPool(9)
    assert pool.free_count == 8 and pool.can_allocate(8) and not pool.can_allocate(9)
    first, second = pool.allocate(3), pool.allocate(5)
    assert NULL_BLOCK not in first + second and len(set(first + second)) == 8
    assert pool.free_count == 0 and not pool.can_allocate(1) and pool.can_allocate(0)
    with pytest.raises(OutOfBlocks, match="asked for 1 blocks, 0 of 8 are free"):
        pool.allocate(1)
    pool.free(first)
    assert pool.free_count == 3
    pool.free(second)
    assert pool.free_count == 8
    assert sorted(pool.allocate(8)) == list(range(1, 9))


def test_free_refuses_a_double_free_a_foreign_block_and_changes_nothing_then():
    pool = BlockPool(6)
    held = pool.allocate(3)
    pool.free(held[:1])
    for bad in ([held[0]], [held[1], held[0]], [NULL_BLOCK], [99], [held[1], held[1]]):
        with pytest.raises(ValueError, match="not handed out|listed twice"):
            pool.free(bad)
    assert pool.free_count == 3  # the refused frees gave nothing back, not even their good blocks
    pool.free(held[1:])
    assert pool.free_count == 5
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1)


def test_no_block_is_shared_by_live_rows_over_admissions_and_releases():
    layers, rows, block_size = 3, 5, 4
    rng = random.Random(0)
    pool = BlockPool(40)
    table = BlockTable(layers, rows, max_blocks=6, block_size=block_size)
    storage = table.table.data_ptr()
    live: dict[int, list[list[int]]] = {}
    refused = 0
    for _ in range(300):
        row = rng.randrange(rows)
        if row in live:
            freed = table.release(row)
            assert sorted(freed) == sorted(b for blocks in live.pop(row) for b in blocks)
            assert table.release(row) == []  # a second release gives nothing
            pool.free(freed)
        else:
            slots = [rng.randint(1, 6 * block_size) for _ in range(layers)]
            try:
                blocks = allocate_row(pool, slots, block_size)
            except OutOfBlocks:
                refused += 1
                continue
            assert [len(b) for b in blocks] == layer_blocks(slots, block_size)
            table.assign(row, blocks)
            live[row] = blocks
        held = [b for r in live for blocks in live[r] for b in blocks]
        assert len(held) == len(set(held)) and NULL_BLOCK not in held
        assert pool.free_count + len(held) == 39
        # The device table says the same: each live row's entries are its blocks, then the null block.
        on_device = table.table.cpu()
        for r in range(rows):
            for layer in range(layers):
                mine = live[r][layer] if r in live else []
                assert on_device[layer, r].tolist() == mine + [NULL_BLOCK] * (6 - len(mine))
    assert refused > 0 and table.table.data_ptr() == storage  # the pool ran dry at times; updated in place
    for row in list(live):
        pool.free(table.release(row))
    assert pool.free_count == 39 and bool((table.table == NULL_BLOCK).all())


def test_the_table_refuses_a_row_that_holds_blocks_or_too_many():
    table = BlockTable(2, 2, max_blocks=3, block_size=16)
    table.assign(0, [[1, 2], [3]])
    with pytest.raises(ValueError, match="release it first"):
        table.assign(0, [[4], [5]])
    with pytest.raises(ValueError, match="needs 4 blocks, the table has room for 3"):
        table.assign(1, [[4, 5, 6, 7], [8]])
    with pytest.raises(ValueError, match="for 1 layers, the table has 2"):
        table.assign(1, [[4]])
    with pytest.raises(ValueError, match="power of two"):
        BlockTable(2, 2, max_blocks=3, block_size=12)


def _row_blocks(policy, prompt: int, layers: int, block_size: int) -> int:
    return blocks_for(row_slots(policy.layer_budgets(policy.budget(prompt), layers)), block_size)


def test_blocks_for_the_budgets_of_each_kind():
    # h2o 10% + 10% of 100 tokens: 10 + 10 + 1 = 21 slots a layer, 2 blocks of 16 each.
    assert _row_blocks(make_policy("h2o", 0.1, 0.1), 100, 4, 16) == 8
    assert _row_blocks(make_policy("h2o", 0.1, 0.1), 100, 4, 1) == 84
    assert _row_blocks(make_policy("h2o", 0.1, 0.1), 100, 4, 32) == 4
    # local: 0 + 20 + 1 = 21 slots; 32 tokens of 10% + 10%: 3 + 3 + 1 = 7 slots, one block.
    assert _row_blocks(make_policy("h2o", 0.0, 0.2), 100, 4, 16) == 8
    assert _row_blocks(make_policy("h2o", 0.1, 0.1), 32, 4, 16) == 4
    # pyramidkv over 4 layers, 20 heavy on average: 39, 26, 14 and 1 (80 in all), each + 20 + 1:
    # 60, 47, 35 and 22 slots, so 4 + 3 + 3 + 2 blocks of 16.
    pyramid = make_policy("pyramidkv", 0.1, 0.1)
    assert [b.heavy for b in pyramid.layer_budgets(pyramid.budget(200), 4)] == [39, 26, 14, 1]
    assert _row_blocks(pyramid, 200, 4, 16) == 12
    # The full cache: a window of prompt + max_tokens (as the fast engine budgets it), every layer.
    full = [Budget(heavy=0, recent=100 + 28)] * 4
    assert row_slots(full) == [129] * 4 and blocks_for(row_slots(full), 16) == 4 * 9
    assert blocks_for([16, 17, 1], 16) == 1 + 2 + 1 and blocks_for([], 16) == 0


def test_pool_size_counts_weights_and_the_reserve_against_the_fraction():
    per_block = block_bytes(kv_heads=8, block_size=16, head_dim=128, element_size=2)
    assert per_block == 8 * 16 * (2 * 128 * 2 + 13)
    # 90% of 80 GiB is 72; 20 GiB are in use (weights) and 2 reserved: 50 GiB of blocks.
    assert pool_size(60 * GiB, 80 * GiB, 0.9, per_block, 2 * GiB, 10) == 50 * GiB // per_block
    assert pool_size(80 * GiB, 80 * GiB, 1.0, per_block, 0, 10) == 80 * GiB // per_block
    # The null block counts among them: 11 blocks hold a 10-block request, 10 do not.
    assert pool_size(11 * per_block, 11 * per_block, 1.0, per_block, 0, 10) == 11
    with pytest.raises(ValueError, match=r"holds 9 blocks of 67200 bytes; one request needs 10"):
        pool_size(10 * per_block, 10 * per_block, 1.0, per_block, 0, 10)


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.01, 2.0])
def test_pool_size_refuses_a_fraction_outside_0_to_1(fraction):
    with pytest.raises(ValueError, match=r"^--gpu_memory_fraction must lie in \(0, 1\], got"):
        pool_size(80 * GiB, 80 * GiB, fraction, 1024, 0, 1)


def test_pool_size_names_the_sizes_when_the_weights_take_the_share():
    # 50% of 80 GiB is 40, and 50 GiB are already in use.
    with pytest.raises(ValueError) as error:
        pool_size(30 * GiB, 80 * GiB, 0.5, 4096, GiB, 3)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--gpu_memory_fraction 0.5: 40.00 GiB of the card's 80.00 GiB")
    assert "less 50.00 GiB in use and 1.00 GiB reserved, holds 0 blocks of 4096 bytes; one request needs 3" in message


def test_slot_index_maps_a_slot_to_its_block_and_offset():
    table = BlockTable(2, 3, max_blocks=3, block_size=4)
    table.assign(2, [[7, 3], [5, 9, 1]])
    table.assign(0, [[2], [4]])
    slots = torch.tensor([[0, 3, 4, 7, 8], [1, 4, 9, 11, 0]])
    block, offset = table.slot_index(1, torch.tensor([2, 0]), slots)
    assert block.tolist() == [[5, 5, 9, 9, 1], [4, NULL_BLOCK, NULL_BLOCK, NULL_BLOCK, 4]]
    assert offset.tolist() == [[0, 3, 0, 3, 0], [1, 0, 1, 3, 0]]


def test_scatter_then_gather_gives_the_dense_view_back():
    heads, block_size, dim, slots = 2, 4, 3, 10
    table = BlockTable(1, 3, max_blocks=3, block_size=block_size)
    table.assign(0, [[5, 2, 7]])  # 12 slots: all 10
    table.assign(2, [[3, 1]])  # 8 slots: 8 and 9 have no block
    rows = torch.tensor([2, 0])
    tables = table.table[0, rows]
    g = torch.Generator().manual_seed(0)
    keys = torch.full((8, heads, block_size, dim), float("nan"))
    positions = torch.full((8, heads, block_size), -7, dtype=torch.int32)
    dense_keys = torch.randn(2, heads, slots, dim, generator=g)
    dense_positions = torch.randint(0, 50, (2, heads, slots), generator=g, dtype=torch.int32)
    every = torch.arange(slots).expand(2, heads, slots)
    scatter(keys, tables, every, dense_keys)
    scatter(positions, tables, every, dense_positions)
    has_block = (torch.arange(slots) < torch.tensor([8, 10]).view(-1, 1, 1)).expand(-1, heads, -1)
    got_keys = gather(keys, tables, slots, 0.0)
    got_positions = gather(positions, tables, slots, -1)
    assert torch.equal(got_keys[has_block], dense_keys[has_block])
    assert torch.equal(got_positions, torch.where(has_block, dense_positions, -1))
    assert bool((got_keys[~has_block] == 0).all())
    # Blocks of no row are untouched; slot 9 of row 2 (offset 1 of the missing third block)
    # went to the null block alone.
    assert bool(keys[[4, 6]].isnan().all()) and bool((positions[[4, 6]] == -7).all())
    assert torch.equal(positions[NULL_BLOCK, :, :2], dense_positions[0, :, 8:])
    # One slot per (row, head), as a decode step writes its new token.
    slot = torch.tensor([[9, 0], [2, 5]])[..., None]
    new = torch.randn(2, heads, 1, dim, generator=g)
    scatter(keys, tables, slot, new)
    after = gather(keys, tables, slots, 0.0)
    assert torch.equal(after[1, 0, 2], new[1, 0, 0]) and torch.equal(after[1, 1, 5], new[1, 1, 0])
    assert torch.equal(after[0, 1, 0], new[0, 1, 0]) and torch.equal(after[0, 0, 9], torch.zeros(dim))
    changed = (after != got_keys).any(-1)
    assert changed.sum() == 3  # the three slots with blocks, nothing else
