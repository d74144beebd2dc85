"""The Triton kernels of h2o.engine.fast.kernels on the CPU, under Triton's interpreter, against torch.

Triton reads TRITON_INTERPRET when it is imported, and h2o.engine.fast.kernels imports it at import
time (so does every test module that imports h2o.engine.fast): the kernels run in a fresh Python
process with TRITON_INTERPRET=1. That process only loads the inputs made here, calls the
kernels and saves what they return and what they updated in place; the torch restatements
and every comparison stay in this module.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, child_env, random_prompts, tiny_llama
from h2o.engine.fast import generate_fast
from h2o.policies import make_policy

if importlib.util.find_spec("triton") is None:
    pytest.skip("needs Triton (requirements.txt installs it)", allow_module_level=True)

# Run in the child: `kernels.<name>(*args, **options)` for each call; the returns, and the
# arguments afterwards (decode_step updates positions, active and scores in place).
_RUN_KERNELS = """
import sys
import torch
from h2o.engine.fast import kernels
assert kernels.available(torch.device("cpu")), "Triton's interpreter is off"
calls = torch.load(sys.argv[1])
results = []
for name, args, options in calls:
    out = getattr(kernels, name)(*args, **options)
    results.append((out, args))
torch.save(results, sys.argv[2])
"""

# Run in the child: generate_fast with the kernels, on the models (config and weights) made here.
_GENERATE = """
import sys
import torch
from conftest import tiny_llama
from h2o.engine.fast import generate_fast, kernels
from h2o.policies import make_policy
assert kernels.available(torch.device("cpu")), "Triton's interpreter is off"
work = torch.load(sys.argv[1])
models = {}
for name, (config, weights) in work["models"].items():
    models[name] = tiny_llama(**config)
    models[name].load_state_dict(weights)
tokens = []
for job in work["jobs"]:
    policy = make_policy("h2o", *job["ratios"])
    result = generate_fast(models[job["model"]], job["prompts"], job["new_tokens"], policy,
                           prefill_rows=job["prefill_rows"], use_kernels=True)
    tokens.append(result.token_ids)
torch.save(tokens, sys.argv[2])
"""


def _interpreted(script: str, work: object, folder) -> object:
    """Run `script` under Triton's interpreter on `work` (saved with torch.save); what it saved."""
    inputs, outputs = folder / "inputs.pt", folder / "outputs.pt"
    torch.save(work, inputs)
    env = child_env(TRITON_INTERPRET="1")  # _GENERATE imports conftest
    done = subprocess.run([sys.executable, "-c", script, str(inputs), str(outputs)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(outputs)


DTYPES = {"float32": torch.float32, "float16": torch.float16}
KV_HEADS = 2


def _tolerance(dtype: torch.dtype) -> dict:
    # float16: the output is rounded to float16 (half an ulp is 5e-4 near 1).
    return dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# decode_step

# Each scenario: a batch of two sequences as (heavy, recent, n_tokens), the slot tile (`block`,
# None: the tuned default), whether the cache has heavy hitters, and whether `limits` are given
# (as FastCache gives them: min(n_tokens, heavy + recent + 1), every slot in use below it).
# Slots: the largest budget + 1. n_tokens <= heavy + recent: under budget (every token held);
# == heavy + recent + 1: the step that first goes over; more: the steady state, where the token
# that left the window a step ago sits out (held, not attended) among the heavy candidates.
SCENARIOS = {
    "h2o-steady-and-under": ([(4, 5, 23), (2, 3, 4)], 8, True, False),
    "h2o-first-over-and-a-row-without-heavy": ([(4, 5, 10), (0, 3, 9)], None, True, False),
    "local-steady-and-first-over": ([(0, 9, 15), (0, 4, 5)], 8, False, False),
    "local-under-and-first-over": ([(0, 6, 4), (0, 9, 10)], None, False, False),
    "h2o-steady-and-under-with-limits": ([(2, 3, 23), (4, 5, 7)], 4, True, True),
    "local-steady-and-under-with-limits": ([(0, 4, 15), (0, 9, 6)], None, False, True),
}
DECODE_CASES = [
    pytest.param(dtype, groups, head_dim, scenario, id=f"{dtype}-{groups}q-per-kv-d{head_dim}-{scenario}")
    for dtype in DTYPES for groups in (1, 2, 3) for head_dim in (64, 128) for scenario in SCENARIOS
]


def _held(heavy: int, recent: int, t: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """Positions a sequence holds at a decode step after `t` tokens (the newest, t - 1, just
    written), as FastCache leaves them: (attended, held but sitting out)."""
    if t <= heavy + recent + 1:  # nothing evicted before this step
        return list(range(t)), []
    if heavy == 0:
        return list(range(t - recent, t)), []
    parked = t - recent - 1
    chosen = torch.randperm(parked, generator=g)[:heavy].tolist()
    return sorted(chosen) + list(range(t - recent, t)), [parked]


def _decode_inputs(dtype: str, groups: int, head_dim: int, scenario: str, seed: int) -> tuple[tuple, dict]:
    rows, block, has_heavy, limited = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(seed)
    b, slots = len(rows), max(h + r for h, r, _ in rows) + 1
    limits = torch.tensor([min(t, h + r + 1) if limited else slots for h, r, t in rows])
    positions = torch.full((b, KV_HEADS, slots), -1, dtype=torch.int32)
    active = torch.zeros(b, KV_HEADS, slots, dtype=torch.bool)
    scores = torch.zeros(b, KV_HEADS, slots)
    for i, (heavy, recent, t) in enumerate(rows):
        for h in range(KV_HEADS):
            attended, parked = _held(heavy, recent, t, g)
            held = attended + parked
            slot = torch.randperm(int(limits[i]), generator=g)[: len(held)]  # tokens in no order
            positions[i, h, slot] = torch.tensor(held, dtype=torch.int32)
            active[i, h, slot[: len(attended)]] = True
            # Running scores far apart (attention adds at most `groups`), so no two candidates
            # tie; the recent window's (the leaving token's too) below the older tokens', as
            # fewer steps added to them.
            rank = torch.randperm(len(held), generator=g)
            in_window = torch.tensor(held) >= t - recent
            rank[in_window] = torch.randperm(int(in_window.sum()), generator=g)
            rank[~in_window] = int(in_window.sum()) + torch.randperm(int((~in_window).sum()), generator=g)
            scores[i, h, slot] = rank.float() * 3.7 + 0.5
    # Free slots hold stale keys and values, never read as such.
    query = (2 * torch.randn(b, KV_HEADS * groups, 1, head_dim, generator=g)).to(DTYPES[dtype])
    keys = torch.randn(b, KV_HEADS, slots, head_dim, generator=g).to(DTYPES[dtype])
    values = torch.randn(b, KV_HEADS, slots, head_dim, generator=g).to(DTYPES[dtype])
    options = {} if block is None else {"block": block}
    if limited:
        # Past the limits, slots are neither read (NaN keys and values would show) nor written.
        beyond = (torch.arange(slots) >= limits.view(-1, 1, 1)).expand(-1, KV_HEADS, -1)
        keys[beyond], values[beyond], scores[beyond] = float("nan"), float("nan"), 99.0
        options["limits"] = limits
    n_tokens, heavy, recent = (torch.tensor([row[j] for row in rows]) for j in (2, 0, 1))
    args = (query, keys, values, positions, active, scores, n_tokens, heavy, recent, head_dim**-0.5, has_heavy)
    return args, options


def _decode_reference(query, keys, values, positions, active, scores, n_tokens, heavy, recent, scaling,
                      has_heavy, limits=None):
    """What decode_step's docstring and FastLayer._evict say one step does: (output, positions,
    active, scores) after it. Slots at or past `limits` are left as they are."""
    b, hq, _, d = query.shape
    groups = hq // keys.shape[1]
    inside = torch.arange(keys.shape[2]) < (keys.shape[2] if limits is None else limits.view(-1, 1, 1))
    before = positions, active, scores
    keys, values = (x.float().masked_fill(~inside[..., None], 0.0) for x in (keys, values))
    q = query.float().view(b, -1, groups, d)
    logits = torch.einsum("bhgd,bhsd->bhgs", q, keys) * scaling
    probs = logits.masked_fill(~(active & inside)[:, :, None], float("-inf")).softmax(-1)
    out = torch.einsum("bhgs,bhsd->bhgd", probs, values).reshape(b, hq, 1, d).to(query.dtype)

    t, h, r = (x.view(-1, 1, 1) for x in (n_tokens, heavy, recent))
    present = (positions >= 0) & inside
    over = t > h + r
    leaving = present & over & (h > 0) & (positions == t - r)  # parked: held, not attended
    candidate = present & (positions < t - r)
    drop = present & over & (h == 0) & (positions <= t - r)  # without heavy hitters: the window alone
    if has_heavy:
        scores = scores + probs.sum(2)
        ranked = scores.masked_fill(~candidate, float("inf"))
        victim = ranked.argmin(-1, keepdim=True)
        excess = candidate.sum(-1, keepdim=True) > h
        hit = candidate.gather(-1, victim) & over & excess & (h > 0)
        drop = drop | torch.zeros_like(drop).scatter_(-1, victim, hit)
    keep = present & ~drop
    if has_heavy:
        scores = scores * keep
    after = positions.masked_fill(~keep, -1), keep & ~leaving, scores
    return out, *(torch.where(inside, new, old) for new, old in zip(after, before))


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
    cases = [p.values for p in DECODE_CASES]
    inputs = [_decode_inputs(*case, seed=i) for i, case in enumerate(cases)]
    calls = [("decode_step", args, options) for args, options in inputs]
    results = _interpreted(_RUN_KERNELS, calls, tmp_path_factory.mktemp("decode"))
    return {case: (args, options, result) for case, (args, options), result in zip(cases, inputs, results)}


@pytest.mark.parametrize("dtype, groups, head_dim, scenario", DECODE_CASES)
def test_decode_step(decoded, dtype, groups, head_dim, scenario):
    args, options, (out, after) = decoded[dtype, groups, head_dim, scenario]
    _, _, _, positions, active, scores, n_tokens, heavy, recent, _, has_heavy = args
    want_out, want_positions, want_active, want_scores = _decode_reference(*args, limits=options.get("limits"))

    # The setting is what the cache holds: over budget with heavy hitters, exactly one
    # candidate too many; and the scenario evicts (or is all under budget).
    candidates = (positions >= 0) & (positions < (n_tokens - recent).view(-1, 1, 1))
    over_heavy = ((n_tokens > heavy + recent) & (heavy > 0))[:, None].expand(-1, KV_HEADS)
    assert (candidates.sum(-1) == heavy[:, None] + 1)[over_heavy].all()
    assert (want_positions >= 0).sum() < (positions >= 0).sum() or (n_tokens <= heavy + recent).all()

    torch.testing.assert_close(out, want_out, **_tolerance(out.dtype))
    assert torch.equal(after[3], want_positions)
    assert torch.equal(after[4], want_active)
    torch.testing.assert_close(after[5], want_scores, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# prefill_scores

# (prompt length, block sizes, each row's left padding): tiles ending mid-prompt, the tuned
# default blocks, and left-padded rows (padding ending mid-tile, and past the first tile).
PREFILL_SHAPES = {
    "n37-blocks16": (37, dict(block_m=16, block_n=16), None),
    "n37-blocks16-left-padded": (37, dict(block_m=16, block_n=16), [9, 0]),
    "n70-default-blocks": (70, {}, None),
    "n70-default-blocks-left-padded": (70, {}, [0, 33]),
}
PREFILL_CASES = [
    pytest.param(dtype, groups, head_dim, shape, id=f"{dtype}-{groups}q-per-kv-d{head_dim}-{shape}")
    for dtype in DTYPES for groups in (1, 2, 3) for head_dim in (64, 128) for shape in PREFILL_SHAPES
]


def _prefill_inputs(dtype: str, groups: int, head_dim: int, shape: str, seed: int) -> tuple[tuple, dict]:
    n, options, starts = PREFILL_SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    # Laid out as the model's projections give them, (B, N, H, D) seen as (B, H, N, D).
    query = (2 * torch.randn(2, n, KV_HEADS * groups, head_dim, generator=g)).to(DTYPES[dtype]).transpose(1, 2)
    key = torch.randn(2, n, KV_HEADS, head_dim, generator=g).to(DTYPES[dtype]).transpose(1, 2)
    if starts is not None:
        options = {**options, "starts": torch.tensor(starts)}
    return (query, key, head_dim**-0.5), options


def _prefill_reference(query, key, scaling, starts=None):
    """(B, Hkv, N): the attention each key receives from the causal query rows at or after it,
    summed over the rows and over the query heads sharing its KV head; softmax in float32. Left
    padding (`starts`: each row's first real token) neither votes nor receives."""
    b, hq, n, _ = query.shape
    groups = hq // key.shape[1]
    starts = torch.zeros(b, dtype=torch.long) if starts is None else starts
    logits = query.float() @ key.float().repeat_interleave(groups, dim=1).transpose(-1, -2) * scaling
    i = torch.arange(n)
    real = i[None, :] >= starts[:, None]  # (B, N)
    visible = (i[None, :] <= i[:, None]) & real[:, None, :]  # (B, rows, keys)
    probs = logits.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
    probs = probs.nan_to_num(0.0) * real[:, None, :, None]  # a padding row sees nothing, votes nothing
    return probs.sum(-2).view(b, -1, groups, n).sum(2)


@pytest.fixture(scope="module")
def prefilled(tmp_path_factory):
    cases = [p.values for p in PREFILL_CASES]
    inputs = [_prefill_inputs(*case, seed=i) for i, case in enumerate(cases)]
    calls = [("prefill_scores", args, options) for args, options in inputs]
    results = _interpreted(_RUN_KERNELS, calls, tmp_path_factory.mktemp("prefill"))
    return {case: (args, options, out) for case, (args, options), (out, _) in zip(cases, inputs, results)}


@pytest.mark.parametrize("dtype, groups, head_dim, shape", PREFILL_CASES)
def test_prefill_scores(prefilled, dtype, groups, head_dim, shape):
    args, options, received = prefilled[dtype, groups, head_dim, shape]
    starts = options.get("starts", torch.zeros(2, dtype=torch.long))
    want = _prefill_reference(*args, starts=starts)
    # Every real query row hands out `groups` in all (one per head); padding receives nothing.
    real_rows = args[0].shape[2] - starts
    assert torch.allclose(want.sum(-1), (groups * real_rows).float()[:, None].expand_as(want[..., 0]))
    assert received.shape == want.shape
    torch.testing.assert_close(received, want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# generate_fast end to end

MODELS = {"2q-per-kv": dict(kv_heads=2), "3q-per-kv": dict(kv_heads=2, heads=6)}
RATIOS = {"h2o": (0.1, 0.1), "local": (0.0, 0.2), "h2o-prompt-within-budget": (0.5, 0.5)}
# One prompt a slice: unpadded prefills, the 8-token prompt has no heavy hitters under 10%; two
# a slice: a left-padded prefill. Even lengths: under 50% + 50% the prompt is the budget, and
# decoding goes over it.
PROMPTS = {"one-a-slice": ([100, 8], 1), "two-a-slice": ([64, 40], 2)}
NEW_TOKENS = 24
GENERATE_CASES = [
    pytest.param(model, ratios, prompts, id=f"{model}-{ratios}-{prompts}")
    for model in MODELS for ratios in RATIOS for prompts in PROMPTS
]


@pytest.fixture(scope="module")
def models():
    return {name: tiny_llama(**config) for name, config in MODELS.items()}


def _job(model: str, ratios: str, prompts: str) -> dict:
    lengths, rows = PROMPTS[prompts]
    return dict(model=model, ratios=RATIOS[ratios], prompts=random_prompts(lengths, seed=7),
                prefill_rows=rows, new_tokens=NEW_TOKENS)


@pytest.fixture(scope="module")
def generated(models, tmp_path_factory):
    cases = [p.values for p in GENERATE_CASES]
    work = dict(models={name: (MODELS[name], model.state_dict()) for name, model in models.items()},
                jobs=[_job(*case) for case in cases])
    return dict(zip(cases, _interpreted(_GENERATE, work, tmp_path_factory.mktemp("generate"))))


@pytest.mark.parametrize("model, ratios, prompts", GENERATE_CASES)
def test_generate_fast_with_kernels_gives_the_torch_paths_tokens(models, generated, model, ratios, prompts):
    job = _job(model, ratios, prompts)
    expected = generate_fast(models[model], job["prompts"], NEW_TOKENS, make_policy("h2o", *job["ratios"]),
                             prefill_rows=job["prefill_rows"], use_kernels=False).token_ids
    assert [len(t) for t in expected] == [NEW_TOKENS] * 2
    assert generated[model, ratios, prompts] == expected
