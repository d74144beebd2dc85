"""The fast path's TOVA and h2o-sink against the reference drop path, and the reference attention's
query slicing (h2o.engine.reference.attention.MAX_SCORE_ELEMENTS) against no slicing: same tokens, same scores."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from h2o.engine.reference import attention
from h2o.engine.reference.evicting_cache import EvictingCache
from h2o.engine.fast import FastCache, generate_fast
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o_oracle import eos_ids

NEW_TOKENS = 16


def _reference(model, tokenizer, prompts, policy, mode="drop", attention_kind="eager"):
    out = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=NEW_TOKENS)] * len(prompts),
                   Eviction(policy, mode, attention_kind))
    return [c.token_ids for c in out]


def _fast(model, tokenizer, prompts, policy, **options):
    eos = tuple(eos_ids(model, tokenizer))
    return generate_fast(model, prompts, NEW_TOKENS, policy, eos_token_ids=eos, use_kernels=False,
                         **options).token_ids


# h2o-sink with a heavy budget of at least --sink_size for every prompt here (47, 64, 101 tokens).
# tova at a budget of the whole prompt goes over it at the first decode step, two tokens over.
POLICIES = [("tova", (0.1, 0.1), {}), ("tova", (0.0, 0.3), {}), ("tova", (0.02, 0.0), {}), ("tova", (0.5, 0.5), {}),
            ("h2o-sink", (0.1, 0.1), {"sink_size": 4}), ("h2o-sink", (0.05, 0.1), {"sink_size": 2}),
            ("h2o-sink", (0.2, 0.05), {"sink_size": 8})]


@pytest.mark.parametrize("name, ratios, options", POLICIES)
@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_fast_tova_and_h2o_sink_give_the_reference_drop_tokens(request, tokenizer, monkeypatch, model_name, name,
                                                               ratios, options):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts([64, 101, 47], seed=70)
    policy = make_policy(name, *ratios, **options)
    expected = _reference(model, tokenizer, prompts, policy)
    assert sum(len(t) for t in expected) >= 2 * NEW_TOKENS
    held = {}  # row -> each layer's held slots per KV head as its sequence ends
    release = FastCache.release

    def spy(self, row):
        held[row] = [(layer.view()["positions"][row] >= 0).sum(-1).tolist() for layer in self.layers]
        release(self, row)

    monkeypatch.setattr(FastCache, "release", spy)
    assert _fast(model, tokenizer, prompts, policy, prefill_rows=2) == expected
    # After the last step, every layer and KV head holds the window less the coming token, the
    # heavy hitters, and (h2o-sink) the parked token: heavy + recent, or for TOVA heavy + recent - 1.
    budgets = [policy.budget(len(p)) for p in prompts]
    parked = 1 if policy.parks_leaving_token else 0
    heads = model.config.num_key_value_heads
    assert held == {row: [[b.total - 1 + parked] * heads] * model.config.num_hidden_layers
                    for row, b in enumerate(budgets)}
    assert _fast(model, tokenizer, prompts[1:2], policy) == expected[1:2]
    full = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=NEW_TOKENS)] * len(prompts))
    assert expected != [c.token_ids for c in full]  # the eviction shows


def _scores_after(model, prompts, policy, mode, steps=3):
    """The EvictingCache's scores, positions and active flags after the prefill and `steps` decode
    steps, driven by hand (left-padded batch)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    cache = EvictingCache(policy, mode, model.config.num_hidden_layers, [len(p) for p in prompts])
    model.set_attn_implementation("h2o_eager")
    snapshots = []
    with torch.no_grad():
        cache.begin(positions, valid)
        model(input_ids=ids, position_ids=positions, cache=cache, eviction_cache=cache)
        snapshots.append([(l.scores.clone(), l.positions.clone(), l.active.clone()) for l in cache.layers])
        lengths = torch.tensor([len(p) for p in prompts])
        for step in range(steps):
            at = (lengths + step)[:, None]
            cache.begin(at, torch.ones_like(at, dtype=torch.bool))
            model(input_ids=torch.full_like(at, 7 + step), position_ids=at, cache=cache, eviction_cache=cache)
            snapshots.append([(l.scores.clone(), l.positions.clone(), l.active.clone()) for l in cache.layers])
    return snapshots


@pytest.mark.parametrize("name", ["h2o", "tova", "h2o-avg"])
def test_query_slicing_gives_the_same_tokens_and_scores(gqa, tokenizer, monkeypatch, name):
    prompts = random_prompts([101, 64, 33], seed=71)
    policy = make_policy(name, 0.1, 0.1)
    whole = {mode: _reference(gqa, tokenizer, prompts, policy, mode) for mode in ("drop", "mask")}
    whole["sdpa"] = _reference(gqa, tokenizer, prompts, policy, "drop", "sdpa")
    unsliced = _scores_after(gqa, prompts, policy, "drop")
    sliced_rows = []
    original = attention._probabilities

    def spy(query, *args):
        sliced_rows.append(query.shape[2])
        return original(query, *args)

    # 7 query rows per slice at the prefill (3 sequences x 4 heads x 101 slots each): 15 slices,
    # the last of 3 rows.
    monkeypatch.setattr(attention, "MAX_SCORE_ELEMENTS", 3 * 4 * 101 * 7)
    monkeypatch.setattr(attention, "_probabilities", spy)
    sliced = _scores_after(gqa, prompts, policy, "drop")
    assert sliced_rows[: 15] == [7] * 14 + [3]  # the first layer's prefill, sliced
    for before, after in zip(unsliced, sliced):
        for (s0, p0, a0), (s1, p1, a1) in zip(before, after):
            assert torch.equal(p0, p1) and torch.equal(a0, a1)
            torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    for mode in ("drop", "mask"):
        assert _reference(gqa, tokenizer, prompts, policy, mode) == whole[mode], mode
    assert _reference(gqa, tokenizer, prompts, policy, "drop", "sdpa") == whole["sdpa"]
    assert whole["drop"] == whole["mask"] == whole["sdpa"]
