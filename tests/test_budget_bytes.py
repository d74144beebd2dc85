"""Policies that budget by layer (pyramidkv) or by head (adakv) spend H2O's KV memory at every
budget of the sweep: by the report's count (`Policy.held`) and by the slots a drop-mode cache
really holds."""

import pytest
import torch

from conftest import random_prompts
from h2o.engine.reference.generation import Decoder, Eviction
from h2o.lab.points import BUDGETS, Point

SAME_SPLIT = ("h2o", "h2o-avg", "h2o-sink", "h2o-shrink", "knorm", "snapkv", "pyramidkv", "adakv", "a2sf", "keydiff",
              "h2o-vnorm", "expected-attention", "h2o-keydiff")


# Tokens per KV head in one layer at each budget, for prompts of 37, 250, 519 and 1000 tokens:
# half the budget heavy, half recent, each truncated, the recent window never empty (at 4% of 37
# tokens: 0.74 heavy is none, 0.74 recent is one).
HELD_PER_LAYER = {0.04: (1, 10, 20, 40), 0.10: (2, 24, 50, 100), 0.20: (6, 50, 102, 200), 0.40: (14, 100, 206, 400)}


@pytest.mark.parametrize("budget", BUDGETS)
def test_the_reported_budget_bytes_are_h2os(budget):
    for n, per_layer in zip((37, 250, 519, 1000), HELD_PER_LAYER[budget], strict=True):
        expected = 30 * per_layer  # SmolLM2's 30 layers
        assert Point("h2o", budget).eviction().policy.held(n, 30) == expected, n
        for name in SAME_SPLIT:
            assert Point(name, budget).eviction().policy.held(n, 30) == expected, (name, n)
    pyramid = Point("pyramidkv", budget).eviction().policy
    per_layer = [b.total for b in pyramid.layer_budgets(pyramid.budget(519), 30)]
    assert len(set(per_layer)) > 1  # unequal layers, H2O's sum


@pytest.mark.parametrize("budget", [0.2, 0.4])
def test_a_drop_cache_holds_what_the_report_counts(gqa, budget):
    prompt = random_prompts([120], seed=40)[0]
    layers, heads = gqa.config.num_hidden_layers, gqa.config.num_key_value_heads
    held = {}
    for name in SAME_SPLIT:
        policy = Point(name, budget).eviction().policy
        decoder = Decoder(gqa, [prompt], Eviction(policy, "drop"))
        decoder.prefill()
        for token in (5, 6, 7):
            decoder.step(torch.tensor([token]))
        held[name] = sum(int((layer.positions >= 0).sum()) for layer in decoder.cache.layers)
        # The window less the coming token's place; H2O's family keeps the token it parks.
        parked = 0 if policy.parks_leaving_token else -1
        assert held[name] == (policy.held(len(prompt), layers) + parked * layers) * heads, name
    assert held["pyramidkv"] == held["snapkv"] == held["adakv"]
    assert held["h2o-shrink"] == held["h2o"]
