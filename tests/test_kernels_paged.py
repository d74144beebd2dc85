"""kernels.decode_step_paged against kernels.decode_step, under Triton's interpreter.

The dense step's inputs (test_kernels_interpreted's scenarios: over and under budget, heavy
hitters on and off, with and without limits) are written into block pools through a block
table of shuffled, non-contiguous block ids, small blocks so that rows cross block edges (10
slots in blocks of 4 or 8, limits inside a block). Both kernels run in one child process
(TRITON_INTERPRET=1); the paged one must give the dense one's output, and leave in its blocks,
read back through the table, the dense one's positions, active flags and scores. Table entries
past a limited row's blocks point at the null block, and spare blocks belong to no row: both
hold NaN keys and live-looking slots, which would show if read, and must stay as they were.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton (requirements.txt installs it)", allow_module_level=True)

from h2o.engine.fast.blocks import NULL_BLOCK, BlockTable, gather, scatter  # noqa: E402
from test_kernels_interpreted import (  # noqa: E402
    _RUN_KERNELS, SCENARIOS, _decode_inputs, _interpreted, _tolerance,
)

HEAD_DIM = 16
SPARE_BLOCKS = 3
# A free slot, as FastCache's rectangle holds one: what a gather reads where a row has no block.
FREE = {"keys": 0.0, "values": 0.0, "positions": -1, "active": False, "scores": 0.0}
# What the null block and the spare blocks hold: keys NaN, slots that look held and attended.
GARBAGE = {"keys": float("nan"), "values": float("nan"), "positions": 7, "active": True, "scores": 99.0}
PER_SLOT = ("keys", "values", "positions", "active", "scores")
PAGED_CASES = [
    pytest.param(dtype, groups, page, scenario, id=f"{dtype}-{groups}q-per-kv-blocks{page}-{scenario}")
    for dtype in ("float32", "float16") for groups in (1, 3) for page in (4, 8) for scenario in SCENARIOS
]


def _paged_inputs(dense: tuple, options: dict, page: int, seed: int) -> tuple[tuple, list[int]]:
    """The dense step's inputs in block pools: decode_step_paged's arguments, and how many of
    each row's slots have blocks."""
    query, keys, values, positions, active, scores, n_tokens, heavy, recent, scaling, has_heavy = dense
    b, hkv, slots, _ = keys.shape
    max_blocks = math.ceil(slots / page)
    # A limited row has blocks for the slots below its limit alone; the rest of its table is the null block.
    limits = options.get("limits", torch.full((b,), slots))
    held = [math.ceil(int(limit) / page) for limit in limits]
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(sum(held) + SPARE_BLOCKS, generator=g) + 1).tolist()
    table = BlockTable(1, b, max_blocks, page)
    for row, n in enumerate(held):
        table.assign(row, [ids[sum(held[:row]): sum(held[:row]) + n]])
    tables = table.table[0]
    pools = {}
    for name, tensor in zip(PER_SLOT, (keys, values, positions, active, scores)):
        rest = tensor.shape[3:]
        pools[name] = torch.full((1 + len(ids), hkv, page, *rest), GARBAGE[name], dtype=tensor.dtype)
        # Past the dense slots, a row's last block holds free slots.
        free = torch.full((b, hkv, max_blocks * page - slots, *rest), FREE[name], dtype=tensor.dtype)
        scatter(pools[name], tables, torch.arange(max_blocks * page).expand(b, hkv, -1), torch.cat([tensor, free], 2))
        pools[name][NULL_BLOCK] = GARBAGE[name]  # what the slots without a block wrote
    args = (query, pools["keys"], pools["values"], pools["positions"], pools["active"], pools["scores"], tables,
            n_tokens, heavy, recent, scaling, has_heavy)
    return args, [n * page for n in held]


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    cases = [p.values for p in PAGED_CASES]
    inputs = []
    for i, (dtype, groups, page, scenario) in enumerate(cases):
        dense, options = _decode_inputs(dtype, groups, HEAD_DIM, scenario, seed=i)
        paged, with_blocks = _paged_inputs(dense, options, page, seed=i)
        inputs.append((dense, paged, options, with_blocks))
    calls = [call for dense, paged, options, _ in inputs
             for call in (("decode_step", dense, options), ("decode_step_paged", paged, options))]
    results = _interpreted(_RUN_KERNELS, calls, tmp_path_factory.mktemp("paged"))
    return {case: (*case_inputs, results[2 * i], results[2 * i + 1])
            for i, (case, case_inputs) in enumerate(zip(cases, inputs))}


@pytest.mark.parametrize("dtype, groups, page, scenario", PAGED_CASES)
def test_decode_step_paged_is_decode_step_through_the_table(stepped, dtype, groups, page, scenario):
    dense, paged, options, with_blocks, (dense_out, dense_after), (paged_out, paged_after) = stepped[
        dtype, groups, page, scenario]
    tables = paged[6]
    b, hkv, slots, _ = dense[1].shape
    # The setting: shuffled blocks, rows that cross block edges, and a step that changes something.
    assert any(row != sorted(row) or row != list(range(row[0], row[0] + len(row)))
               for row in tables.tolist()) and slots % page != 0
    assert not torch.equal(dense_after[3], dense[3]) or not torch.equal(dense_after[4], dense[4])

    torch.testing.assert_close(paged_out, dense_out, **_tolerance(dense_out.dtype))
    has_block = (torch.arange(slots) < torch.tensor(with_blocks).view(-1, 1, 1)).expand(-1, hkv, -1)
    for index, name in zip((3, 4, 5), ("positions", "active", "scores")):
        got = gather(paged_after[index], tables, slots, FREE[name])
        want = torch.where(has_block, dense_after[index], FREE[name])
        if name == "scores":
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(got, want), name

    # The null block and the spare ones: as they were (the kernel reads and writes rows' blocks alone).
    untouched = sorted(set(range(paged[1].shape[0])) - set(tables.flatten().tolist())) + [NULL_BLOCK]
    for index in (3, 4, 5):
        assert torch.equal(paged_after[index][untouched], paged[index][untouched])
    assert bool(paged_after[1][untouched].isnan().all())
