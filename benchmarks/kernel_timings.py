"""The Triton kernels of `h2o.engine.fast` on one GPU: checked against torch first, then timed over a
grid of tuning knobs; and where a prefill slice's time goes (4 layers of the LLaMA-7B shape).

    python benchmarks/kernel_timings.py
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable

import torch

from h2o.engine.fast import generate_fast, kernels
from h2o.policies import make_policy


def timed(fn: Callable[[], object], reps: int = 30) -> float:
    """Median milliseconds of `fn` over CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def steady_state(batch: int, heads: int, heavy: int, recent: int, dim: int, seen: int) -> dict:
    """Slots as a decode step finds them once over budget: `heavy` older tokens, the token that
    left the window a step ago (not attended), the window and the new token, in random slot order."""
    slots = heavy + recent + 1
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * heads):
        older = torch.randperm(seen - 1 - recent, generator=g)[:heavy]
        row = torch.cat([older, torch.tensor([seen - 1 - recent]), torch.arange(seen - recent, seen)])
        rows.append(row[torch.randperm(slots, generator=g)])
    positions = torch.stack(rows).view(batch, heads, slots).int().cuda()
    return {
        "keys": torch.randn(batch, heads, slots, dim, device="cuda", dtype=torch.float16),
        "values": torch.randn(batch, heads, slots, dim, device="cuda", dtype=torch.float16),
        "positions": positions,
        "active": positions != seen - 1 - recent,
        "scores": torch.rand(batch, heads, slots, device="cuda") * (positions < seen - 1).float(),
        "n_tokens": torch.full((batch,), seen, device="cuda"),
        "heavy": torch.full((batch,), heavy, device="cuda"),
        "recent": torch.full((batch,), recent, device="cuda"),
    }


def check_decode(query: torch.Tensor, state: dict, scaling: float, **knobs: int) -> tuple[float, bool]:
    """Relative error of the output, and whether every evicted slot is torch's argmin."""
    s = {k: v.clone() for k, v in state.items()}
    out = kernels.decode_step(query, s["keys"], s["values"], s["positions"], s["active"], s["scores"],
                              s["n_tokens"], s["heavy"], s["recent"], scaling, True, **knobs)
    b, hkv, slots, d = state["keys"].shape
    grouped = query.view(b, hkv, -1, d).float()
    logits = grouped @ state["keys"].float().transpose(2, 3) * scaling
    probs = logits.masked_fill(~state["active"][:, :, None], float("-inf")).softmax(-1)
    expected = (probs @ state["values"].float()).view_as(out)
    scores = state["scores"] + probs.sum(2)
    t = state["n_tokens"].view(-1, 1, 1)
    candidate = (state["positions"] >= 0) & (state["positions"] < t - state["recent"].view(-1, 1, 1))
    victim = scores.masked_fill(~candidate, float("inf")).argmin(-1, keepdim=True)
    evicted = s["positions"].gather(-1, victim) == -1
    error = ((out.float() - expected).norm() / expected.norm()).item()
    return error, bool(evicted.all()) and int((s["positions"] == -1).sum()) == b * hkv


def decode(batch: int = 256, heads: int = 32, groups: int = 1, dim: int = 128) -> None:
    state = steady_state(batch, heads, 204, 204, dim, 2058)
    query = torch.randn(batch, heads * groups, 1, dim, device="cuda", dtype=torch.float16)
    scaling = dim**-0.5
    kv_bytes = state["keys"].nbytes + state["values"].nbytes
    print(f"decode step, batch {batch}, {heads} KV heads x {groups}, {state['keys'].shape[2]} slots: "
          f"{kv_bytes / 1e9:.2f} GB of keys and values")
    print("| block | warps | rel. error | evictions ok | ms | GB/s |\n|---|---|---|---|---|---|")
    for block, warps in itertools.product((16, 32, 64, 128), (1, 2, 4, 8)):
        error, ok = check_decode(query, state, scaling, block=block, warps=warps)
        s = {k: v.clone() for k, v in state.items()}
        ms = timed(lambda: kernels.decode_step(query, s["keys"], s["values"], s["positions"], s["active"],
                                               s["scores"], s["n_tokens"], s["heavy"], s["recent"], scaling,
                                               True, block=block, warps=warps))
        print(f"| {block} | {warps} | {error:.1e} | {ok} | {ms:.3f} | {kv_bytes / ms / 1e6:,.0f} |", flush=True)


def prefill(batch: int = 8, heads: int = 32, n: int = 2048, dim: int = 128) -> None:
    q = torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.float16)
    k = torch.randn(batch, heads, n, dim, device="cuda", dtype=torch.float16)
    scaling = dim**-0.5
    logits = (q[:1].float() @ k[:1].float().transpose(2, 3)) * scaling
    causal = torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1)
    expected = logits.masked_fill(causal, float("-inf")).softmax(-1).sum(2)
    del logits
    print(f"\nprefill scores, batch {batch}, {heads} heads, {n} tokens")
    print("| block m | block n | warps | stages | max rel. error | ms per sequence |\n|---|---|---|---|---|---|")
    for bm, bn, warps, stages in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 64, 8, 2),
                                  (128, 64, 8, 3), (64, 128, 4, 2), (128, 128, 8, 2), (128, 128, 8, 3)]:
        knobs = dict(block_m=bm, block_n=bn, warps=warps, stages=stages)
        try:
            got = kernels.prefill_scores(q, k, scaling, **knobs)[:1]
            error = ((got - expected).abs() / expected.abs().clamp(min=1e-3)).max().item()
            ms = timed(lambda: kernels.prefill_scores(q, k, scaling, **knobs), reps=10) / batch
        except Exception as e:  # a configuration may not fit the shared memory
            print(f"| {bm} | {bn} | {warps} | {stages} | {type(e).__name__} | |")
            continue
        print(f"| {bm} | {bn} | {warps} | {stages} | {error:.1e} | {ms:.3f} |", flush=True)


def prefill_profile(layers: int = 4, rows: int = 8, n: int = 2048) -> None:
    """Where a prefill slice's time goes, on `layers` layers of the LLaMA-7B shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    prompts = torch.randint(100, 30000, (rows, n)).tolist()
    # One new token: the prefill alone, all rows in one slice.
    for name, ratios in (("h2o", (0.1, 0.1)), ("local", (0.0, 0.2))):
        generate_fast(model, prompts, 1, make_policy("h2o", *ratios), prefill_rows=rows)
        ms = timed(lambda: generate_fast(model, prompts, 1, make_policy("h2o", *ratios), prefill_rows=rows), reps=5)
        print(f"\nprefill, {name}: {ms / rows / layers * 32:.1f} ms per sequence of {n} tokens, scaled to 32 layers")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        generate_fast(model, prompts, 1, make_policy("h2o", 0.1, 0.1), prefill_rows=rows)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=22))


if __name__ == "__main__":
    print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", kernels.triton.__version__)
    decode()
    decode(batch=64, heads=8, groups=4)
    prefill()
    prefill_profile()
