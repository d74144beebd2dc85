"""Triton kernels for the fast path: one fused decode step per layer, and prefill scores.

`decode_step`: for every (sequence, KV head) one program reads the slots' keys and values once,
computes the attention output of the query heads that share the KV head, adds the attention
each slot received to its running score, and evicts for the next step (the lowest-scored heavy
candidate, or for a cache without heavy hitters whatever left the recent window). The torch
path needs two batched matmuls and about twenty small kernels per layer, each a pass over the
slots; this reads them once (a 7B decode step at batch 256 on an H100: 37 ms against 55 ms,
benchmarks/NOTES.md).

`decode_step_paged`: the same step over slots that live in blocks of a pool shared by all
rows (h2o.engine.fast.blocks), each row reading through its block table; the same kernel,
with the slot-to-address step swapped.

`prefill_scores`: the attention each key receives from all later queries of a causal prompt,
summed over the query rows, without materializing the (rows x keys) probabilities: one pass
finds each row's log-sum-exp, a second sums exp(logit - lse) down each key's column.

Both run on CUDA, or on the CPU under TRITON_INTERPRET=1 (Triton's interpreter, slow but handy
for working on them without a GPU).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernels can run on `device`."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def fits(head_dim: int) -> bool:
    """Whether the kernels take this head size: a power of two, at least 16 (`tl.arange` and
    `tl.dot` over it). Pythia-2.8B's 80 and GPT-NeoX-20B's 96 are not."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:

    @triton.jit
    def _at(row, Table, stride_tb, b, kv_head, start, lane, HKV, PAGE: tl.constexpr, PAGED: tl.constexpr):
        # Where slots start + lane of this (sequence, KV head) lie in the per-slot tensors (their
        # keys and values at D times that), as a scalar base and 32-bit offsets from it. Dense:
        # from `row`, its first slot. Paged: from the tile's place in its block (a tile stays in
        # one block: BS divides PAGE).
        if PAGED:
            block = tl.load(Table + b * stride_tb + start // PAGE).to(tl.int64)
            return (block * HKV + kv_head) * PAGE + start % PAGE, lane
        else:
            return row, start + lane

    @triton.jit
    def _decode_kernel(
        Q, K, V, Pos, Act, Sc, T, Heavy, Recent, Limit, Out, Logits, Table,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_tb,
        S, HKV, scale,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, HAS_HEAVY: tl.constexpr,
        PAGE: tl.constexpr, PAGED: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HKV
        kv_head = pid % HKV
        g = tl.arange(0, GP)
        d = tl.arange(0, D)
        lane = tl.arange(0, BS)
        g_ok = g < G
        q = tl.load(Q + b * stride_qb + (kv_head * G + g)[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None], other=0.0).to(tl.float32)
        row = pid.to(tl.int64) * S
        scratch = Logits + row * GP
        # This sequence's slots in use all lie below its limit: the rest are free and skipped.
        used = tl.minimum(tl.load(Limit + b).to(tl.int32), S)

        # Pass 1: logits of every slot (kept in a small scratch row), and a running max and sum
        # per lane of the tile: no reduction across lanes inside the loop.
        m = tl.full([GP, BS], -1.0e30, tl.float32)
        total = tl.zeros([GP, BS], tl.float32)
        for start in range(0, used, BS):
            s = start + lane
            s_ok = s < used
            base, offset = _at(row, Table, stride_tb, b, kv_head, start, lane, HKV, PAGE, PAGED)
            k = tl.load(K + base * D + offset[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0).to(tl.float32)
            logit = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
            visible = tl.load(Act + base + offset, mask=s_ok, other=0) != 0
            logit = tl.where(visible[None, :], logit, float("-inf"))
            tl.store(scratch + g[:, None] * S + s[None, :], logit, mask=s_ok[None, :])
            m_new = tl.maximum(m, logit)
            total = total * tl.exp(m - m_new) + tl.exp(logit - m_new)
            m = m_new
        m_row = tl.max(m, axis=1)
        inv = 1.0 / tl.sum(total * tl.exp(m - m_row[:, None]), axis=1)

        # Pass 2: probabilities, output, scores, and the evictions; again per lane until the end.
        t = tl.load(T + b)
        heavy = tl.load(Heavy + b)
        recent = tl.load(Recent + b)
        over = t > heavy + recent
        acc = tl.zeros([GP, BS, D], tl.float32)
        best = tl.full([BS], float("inf"), tl.float32)
        best_slot = tl.zeros([BS], tl.int32)
        for start in range(0, used, BS):
            s = start + lane
            s_ok = s < used
            base, offset = _at(row, Table, stride_tb, b, kv_head, start, lane, HKV, PAGE, PAGED)
            logit = tl.load(scratch + g[:, None] * S + s[None, :], mask=s_ok[None, :], other=float("-inf"))
            p = tl.exp(logit - m_row[:, None]) * inv[:, None]
            p = tl.where(g_ok[:, None], p, 0.0)
            v = tl.load(V + base * D + offset[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0).to(tl.float32)
            acc += p[:, :, None] * v[None, :, :]
            pos = tl.load(Pos + base + offset, mask=s_ok, other=-1)
            present = pos >= 0
            # Without heavy hitters the cache keeps the window alone: drop what left it.
            drop = present & over & (heavy == 0) & (pos <= t - recent)
            keep = present & (drop == 0)
            leaving = over & (heavy > 0) & (pos == t - recent)
            tl.store(Pos + base + offset, tl.where(keep, pos, -1), mask=s_ok)
            tl.store(Act + base + offset, (keep & (leaving == 0)).to(tl.uint8), mask=s_ok)
            if HAS_HEAVY:
                score = tl.load(Sc + base + offset, mask=s_ok, other=0.0) + tl.sum(p, axis=0)
                score = tl.where(keep, score, 0.0)
                tl.store(Sc + base + offset, score, mask=s_ok)
                ranked = tl.where(present & (pos < t - recent), score, float("inf"))
                lower = ranked < best  # strict: a lane keeps its earliest slot among equals
                best = tl.where(lower, ranked, best)
                best_slot = tl.where(lower, s, best_slot)
        tl.store(Out + b * stride_ob + (kv_head * G + g)[:, None] * stride_oh + d[None, :],
                 tl.sum(acc, axis=1).to(Out.dtype.element_ty), mask=g_ok[:, None])
        if HAS_HEAVY:
            # Once over budget, exactly one heavy candidate too many: the lowest-scored goes
            # (the first slot among equals, as torch's argmin).
            low = tl.min(best, axis=0)
            slot = tl.min(tl.where(best == low, best_slot, S), axis=0)  # some lane holds `low`: below S
            evict = over & (heavy > 0) & (low < float("inf"))
            base, offset = _at(row, Table, stride_tb, b, kv_head, slot, 0, HKV, PAGE, PAGED)
            tl.store(Pos + base + offset, -1, mask=evict)
            tl.store(Act + base + offset, 0, mask=evict)
            tl.store(Sc + base + offset, 0.0, mask=evict)

    @triton.jit
    def _prompt_logits(q, k, scale):
        # IEEE products, as the reference's float32 matmul: Triton's default for float32 operands,
        # TF32, drops 13 mantissa bits of each on a GPU's tensor cores, errors of 1e-3 that reorder
        # close heavy-hitter scores. Half-precision operands multiply exactly either way.
        return tl.dot(q, tl.trans(k), input_precision="ieee") * scale

    @triton.jit
    def _row_lse_kernel(
        Q, K, Lse, Start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        N, HQ, scale, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        b = pid_bh // HQ
        h = pid_bh % HQ
        start_b = tl.load(Start + b)
        first_row = tl.program_id(1) * BM
        rows = first_row + tl.arange(0, BM)
        d = tl.arange(0, D)
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + d[None, :],
                    mask=rows[:, None] < N, other=0.0)
        k_base = K + b * stride_kb + (h // G) * stride_kh
        m = tl.full([BM], -1.0e30, tl.float32)
        total = tl.zeros([BM], tl.float32)
        for start in range(0, first_row + BM, BN):
            cols = start + tl.arange(0, BN)
            k = tl.load(k_base + cols[:, None] * stride_kn + d[None, :], mask=cols[:, None] < N, other=0.0)
            logit = _prompt_logits(q, k, scale)
            # Left padding: a real row sees no padding; a padding row sees itself (never NaN).
            seen = (cols[None, :] <= rows[:, None]) & (cols[None, :] < N)
            seen = seen & ((cols[None, :] >= start_b) | (cols[None, :] == rows[:, None]))
            logit = tl.where(seen, logit, float("-inf"))
            m_new = tl.maximum(m, tl.max(logit, axis=1))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), axis=1)
            m = m_new
        tl.store(Lse + pid_bh.to(tl.int64) * N + rows, m + tl.log(total), mask=rows < N)

    @triton.jit
    def _column_sum_kernel(
        Q, K, Lse, Received, Start, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        N, HQ, scale, G: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        b = pid_bh // HQ
        h = pid_bh % HQ
        start_b = tl.load(Start + b)
        first_col = tl.program_id(1) * BN
        cols = first_col + tl.arange(0, BN)
        d = tl.arange(0, D)
        k = tl.load(K + b * stride_kb + (h // G) * stride_kh + cols[:, None] * stride_kn + d[None, :],
                    mask=cols[:, None] < N, other=0.0)
        q_base = Q + b * stride_qb + h * stride_qh
        lse_base = Lse + pid_bh.to(tl.int64) * N
        acc = tl.zeros([BN], tl.float32)
        for start in range((first_col // BM) * BM, N, BM):
            rows = start + tl.arange(0, BM)
            q = tl.load(q_base + rows[:, None] * stride_qn + d[None, :], mask=rows[:, None] < N, other=0.0)
            lse = tl.load(lse_base + rows, mask=rows < N, other=0.0)
            p = tl.exp(_prompt_logits(q, k, scale) - lse[:, None])
            # Padding rows do not vote, padding columns receive nothing.
            p = tl.where((cols[None, :] <= rows[:, None]) & (rows[:, None] < N) & (rows[:, None] >= start_b)
                         & (cols[None, :] >= start_b), p, 0.0)
            acc += tl.sum(p, axis=0)
        tl.store(Received + pid_bh.to(tl.int64) * N + cols, acc, mask=cols < N)


# Tuning of the kernels on an H100 (benchmarks/kernel_timings.py, benchmarks/NOTES.md).
DECODE_BLOCK, DECODE_WARPS = 32, 1
PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_WARPS, PREFILL_STAGES = 64, 64, 4, 2


def _decode(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
            active: torch.Tensor, scores: torch.Tensor, tables: torch.Tensor | None, slots: int,
            n_tokens: torch.Tensor, heavy: torch.Tensor, recent: torch.Tensor, scaling: float, has_heavy: bool,
            block: int, warps: int, limits: torch.Tensor | None) -> torch.Tensor:
    """One launch of the decode kernel, dense (`tables` None) or paged, over `slots` slots a row."""
    b, hq, _, d = query.shape
    hkv = keys.shape[1]
    groups = hq // hkv
    padded = triton.next_power_of_2(groups)
    if query.stride(-1) != 1:
        query = query.contiguous()
    if limits is None:
        limits = torch.full((b,), slots, dtype=torch.long, device=query.device)
    out = query.new_empty(b, hq, 1, d)
    logits = torch.empty(b * hkv * padded * slots, dtype=torch.float32, device=query.device)
    # The (groups, slots, head_dim) accumulator lives in registers: fewer slots per tile for more groups.
    block = max(1, block // padded)
    page = 1  # dense: unused, and constant so that a new capacity compiles nothing
    if tables is not None:
        page = keys.shape[2]
        block = min(block, page)  # a tile within one block: its slots are contiguous
    _decode_kernel[(b * hkv,)](
        query, keys, values, positions, active.view(torch.uint8), scores, n_tokens, heavy, recent, limits, out,
        logits, positions if tables is None else tables,  # dense: the table pointer is never read
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), 0 if tables is None else tables.stride(0),
        slots, hkv, scaling,
        G=groups, GP=padded, D=d, BS=block, HAS_HEAVY=has_heavy, PAGE=page, PAGED=tables is not None,
        num_warps=warps,
    )
    return out


def decode_step(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    active: torch.Tensor,
    scores: torch.Tensor,
    n_tokens: torch.Tensor,
    heavy: torch.Tensor,
    recent: torch.Tensor,
    scaling: float,
    has_heavy: bool,
    block: int = DECODE_BLOCK,
    warps: int = DECODE_WARPS,
    limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (B, Hq, 1, D) of one decode step; updates positions, active and scores in
    place for the next step. keys/values: (B, Hkv, S, D) contiguous; positions int32, active bool,
    scores float32, all (B, Hkv, S); n_tokens, heavy, recent: (B,). `limits` (B,), where given:
    each sequence's slots in use all lie below it (default: all S slots are read). `block`
    (slots per tile, for one query head per KV head) and `warps` are tuning knobs."""
    return _decode(query, keys, values, positions, active, scores, None, keys.shape[2], n_tokens, heavy, recent,
                   scaling, has_heavy, block, warps, limits)


def decode_step_paged(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    active: torch.Tensor,
    scores: torch.Tensor,
    tables: torch.Tensor,
    n_tokens: torch.Tensor,
    heavy: torch.Tensor,
    recent: torch.Tensor,
    scaling: float,
    has_heavy: bool,
    block: int = DECODE_BLOCK,
    warps: int = DECODE_WARPS,
    limits: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode_step` over slots that live in blocks (h2o.engine.fast.blocks): keys/values pools
    (num_blocks, Hkv, block_size, D) contiguous; positions, active, scores (num_blocks, Hkv,
    block_size); `tables` (B, max_blocks) int32 with contiguous rows, this layer's block table
    rows of the batch: slot s of row i is offset s % block_size of block tables[i, s // block_size].
    A row has max_blocks * block_size slots; `limits` (B,), where given, bound the slots read
    (default: all), and table entries past them are never read. block_size: a power of two.
    `block` and `warps` as decode_step's, but a tile holds one block's slots at most: on an H200
    (CUDA graphs, LLaMA-7B shapes) blocks of 32 time as the dense step, blocks of 16 up to 15%
    slower with one query head per KV head (half the tile)."""
    return _decode(query, keys, values, positions, active, scores, tables, tables.shape[1] * keys.shape[2],
                   n_tokens, heavy, recent, scaling, has_heavy, block, warps, limits)


def prefill_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
    warps: int = PREFILL_WARPS,
    stages: int = PREFILL_STAGES,
    starts: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hkv, N) attention received by each key of a causal prompt, summed over the query rows
    and the query heads sharing the KV head. query (B, Hq, N, D), key (B, Hkv, N, D); `starts`
    (B,): each row's first real token, after its left padding (default: none). Padding neither
    votes nor receives. Blocks (query rows, keys), warps and pipeline stages are tuning knobs."""
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        query, key = query.contiguous(), key.contiguous()
    b, hq, n, d = query.shape
    hkv = key.shape[1]
    if starts is None:
        starts = torch.zeros(b, dtype=torch.int32, device=query.device)
    starts = starts.to(torch.int32)
    lse = torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    received = torch.empty(b, hq, n, dtype=torch.float32, device=query.device)
    strides = (*query.stride()[:3], *key.stride()[:3])
    options = dict(G=hq // hkv, D=d, BM=block_m, BN=block_n, num_warps=warps, num_stages=stages)
    _row_lse_kernel[(b * hq, triton.cdiv(n, block_m))](query, key, lse, starts, *strides, n, hq, scaling,
                                                       **options)
    _column_sum_kernel[(b * hq, triton.cdiv(n, block_n))](query, key, lse, received, starts, *strides, n, hq,
                                                          scaling, **options)
    return received.view(b, hkv, hq // hkv, n).sum(2)
