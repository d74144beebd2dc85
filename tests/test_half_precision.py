"""float16 and bfloat16: drop mode gives mask mode's tokens and the fast path the reference's, and
the scores accumulate in float32 whatever the model's dtype."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, tiny_llama
from h2o.engine.reference.evicting_cache import EvictingCache
from h2o.engine.fast import generate_fast
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o_oracle import eos_ids

DTYPES = [torch.float16, torch.bfloat16]
NEW_TOKENS = 16


@pytest.fixture(scope="module", params=DTYPES, ids=["float16", "bfloat16"])
def models(request):
    return {name: tiny_llama(kv_heads=kv).to(request.param) for name, kv in (("mha", 4), ("gqa", 2))}


def _tokens(model, tokenizer, prompts, policy, mode):
    out = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=NEW_TOKENS)] * len(prompts),
                   None if policy is None else Eviction(policy, mode))
    return [c.token_ids for c in out]


@pytest.mark.parametrize("ratios", [(0.1, 0.1), (0.0, 0.2), (0.3, 0.05)])
@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_drop_gives_mask_and_fast_gives_the_reference(models, tokenizer, model_name, ratios):
    model = models[model_name]
    prompts = random_prompts([64, 101], seed=50)
    policy = make_policy("h2o", *ratios)
    drop = _tokens(model, tokenizer, prompts, policy, "drop")
    assert sum(len(t) for t in drop) >= NEW_TOKENS
    assert drop == _tokens(model, tokenizer, prompts, policy, "mask")
    eos = tuple(eos_ids(model, tokenizer))
    assert generate_fast(model, prompts, NEW_TOKENS, policy, eos_token_ids=eos, prefill_rows=1).token_ids == drop
    assert drop != _tokens(model, tokenizer, prompts, None, None)  # the eviction shows in this dtype too


@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_scores_accumulate_in_float32(models, model_name):
    model = models[model_name]
    dtype = model.dtype
    n = 300
    prompt = random_prompts([n], seed=51)[0]
    # A budget of the whole prompt: the prefill evicts nothing, so each KV head's scores add up
    # to the probability mass of every (query row, query head) pair: exactly n * groups, to
    # float32's precision (a sum kept in the model's dtype is off by a few parts in a thousand).
    cache = EvictingCache(make_policy("h2o", 0.5, 0.5), "drop", model.config.num_hidden_layers, [n])
    model.set_attn_implementation("h2o_eager")
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    with torch.no_grad():
        positions = torch.arange(n)[None]
        cache.begin(positions, torch.ones(1, n, dtype=torch.bool))
        model(input_ids=torch.tensor([prompt]), position_ids=positions, cache=cache, eviction_cache=cache)
        for layer in cache.layers:
            assert layer.keys.dtype == dtype and layer.scores.dtype == torch.float32
            torch.testing.assert_close(layer.scores.double().sum(-1), torch.full_like(layer.scores[..., 0], n * groups,
                                       dtype=torch.float64), rtol=2e-6, atol=0)
        # One decode step: still float32, and over budget now, so the policy evicted.
        positions = torch.tensor([[n]])
        cache.begin(positions, torch.ones(1, 1, dtype=torch.bool))
        model(input_ids=torch.tensor([[5]]), position_ids=positions, cache=cache, eviction_cache=cache)
        for layer in cache.layers:
            assert layer.scores.dtype == torch.float32
            assert int((layer.positions >= 0).sum(-1).max()) == 2 * 150  # heavy + recent - 1 + the parked token


@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_the_fast_paths_scores_accumulate_in_float32(models, model_name, monkeypatch):
    from h2o.engine.fast import FastCache

    model = models[model_name]
    views = []  # each layer's slots as a sequence ends, before its blocks go back
    release = FastCache.release

    def spy(self, row):
        views.append([layer.view() for layer in self.layers])
        release(self, row)

    monkeypatch.setattr(FastCache, "release", spy)
    n = 300
    prompt = random_prompts([n], seed=51)[0]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    # One new token: the prefill alone, within budget, so the scores hold all the mass (see above).
    generate_fast(model, [prompt], 1, make_policy("h2o", 0.5, 0.5), use_kernels=False)
    [layers] = views
    for view in layers:
        assert view["keys"].dtype == model.dtype and view["scores"].dtype == torch.float32
        total = view["scores"].double().sum(-1)
        torch.testing.assert_close(total, torch.full_like(total, n * groups), rtol=2e-6, atol=0)
    generate_fast(model, [prompt], 4, make_policy("h2o", 0.1, 0.1), use_kernels=False)
    assert all(view["scores"].dtype == torch.float32 for view in views[-1])
