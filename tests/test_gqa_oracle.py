"""H2O decoding with grouped-query attention against an independent, plain re-statement
(tests/h2o_oracle.py, which shares no code with h2o.engine.reference.attention, h2o.engine.reference.evicting_cache or h2o.policies).

TOVA is checked beside H2O, since its GQA scoring (the newest row summed over a KV head's query
heads) has no other check.
"""

from __future__ import annotations

import json

import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, VOCAB, random_prompts, tiny_llama
from h2o.engine.reference.evicting_cache import EvictingCache
from h2o.engine.fast import generate_fast
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from h2o_oracle import OracleState, PlainLlama, eos_ids, oracle_budget, oracle_greedy

NEW_TOKENS = 20


def reference(model, tokenizer, prompts, policy, mode, new_tokens=NEW_TOKENS):
    out = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=new_tokens)] * len(prompts),
                   Eviction(policy, mode))
    return [c.token_ids for c in out]


def fast(model, tokenizer, prompts, policy, new_tokens=NEW_TOKENS, **options):
    eos = tuple(eos_ids(model, tokenizer))
    return generate_fast(model, prompts, new_tokens, policy, eos_token_ids=eos, **options).token_ids


@pytest.fixture(scope="module")
def gqa1():
    model = tiny_llama(kv_heads=1, seed=3)
    with torch.no_grad():
        model.lm_head.weight[1] = 0.0  # this seed likes the eos token; let the continuations run on
    return model


@pytest.fixture(scope="module")
def gqa3():
    """Six query heads over two KV heads: three per group, as SmolLM2 has."""
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=1, pad_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharp attention, as conftest's tiny models
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
        model.lm_head.weight.mul_(8.0)
        model.lm_head.weight[1] = 0.0
    model.generation_config.eos_token_id = None
    return model


MODELS = ["gqa", "gqa1", "gqa3"]


@pytest.fixture(scope="module")
def plain_models(gqa, gqa1, gqa3):
    return {name: (model, PlainLlama(model)) for name, model in zip(MODELS, (gqa, gqa1, gqa3))}


@pytest.mark.parametrize("model_name", MODELS)
def test_the_plain_forward_is_the_models_function(plain_models, model_name):
    # Guards the oracle: with a budget over the whole text nothing is evicted, and the plain
    # forward must give transformers' logits, pass by pass.
    model, plain = plain_models[model_name]
    prompt = random_prompts([50], seed=30)[0]
    model.set_attn_implementation("eager")  # other tests leave their own behind
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([prompt + [7, 9]])).logits[0]
    state = OracleState(plain, heavy=10_000, recent=10_000, policy="h2o")
    torch.testing.assert_close(state.forward(prompt, list(range(50))), expected[49], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.forward([7], [50]), expected[50], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.forward([9], [51]), expected[51], rtol=1e-4, atol=1e-4)


RATIOS = [(0.1, 0.1), (0.2, 0.1), (0.0, 0.2), (0.3, 0.05), (0.05, 0.0), (0.45, 0.45), (0.5, 0.5)]


@pytest.mark.parametrize("ratios", RATIOS)
@pytest.mark.parametrize("model_name", MODELS)
def test_drop_mask_and_fast_give_the_oracles_tokens(plain_models, tokenizer, model_name, ratios):
    model, plain = plain_models[model_name]
    prompts = random_prompts([57, 101, 33], seed=31)
    policy = make_policy("h2o", *ratios)
    expected = [oracle_greedy(plain, p, NEW_TOKENS, *ratios, eos_ids(model, tokenizer)) for p in prompts]
    assert sum(len(e) for e in expected) >= 2 * NEW_TOKENS  # the eos token ends some early
    # A batch of different lengths (left padding) and each prompt alone.
    assert reference(model, tokenizer, prompts, policy, "drop") == expected
    assert reference(model, tokenizer, prompts, policy, "mask") == expected
    assert [reference(model, tokenizer, [p], policy, "drop")[0] for p in prompts] == expected
    assert fast(model, tokenizer, prompts, policy, prefill_rows=2) == expected


def test_the_oracle_tells_eviction_apart(plain_models, tokenizer):
    # Guards the test above: different budgets, and parking the leaving token, change the tokens.
    model, plain = plain_models["gqa"]
    prompt = random_prompts([101], seed=31)[0]
    full = oracle_greedy(plain, prompt, NEW_TOKENS, 0.0, 1.0)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, 101:].tolist()
    assert full[:2] == out[:2] and full != out  # within budget until the second decode step
    runs = {r: oracle_greedy(plain, prompt, NEW_TOKENS, *r) for r in [(0.1, 0.1), (0.0, 0.2), (0.2, 0.0)]}
    assert len({tuple(t) for t in runs.values()}) == 3
    assert runs[(0.1, 0.1)] != out


@pytest.mark.parametrize("ratios", [(0.1, 0.1), (0.0, 0.3)])
@pytest.mark.parametrize("model_name", MODELS)
def test_tova_gives_the_oracles_tokens(plain_models, tokenizer, model_name, ratios):
    model, plain = plain_models[model_name]
    prompts = random_prompts([57, 101], seed=32)
    policy = make_policy("tova", *ratios)
    expected = [oracle_greedy(plain, p, NEW_TOKENS, *ratios, policy="tova") for p in prompts]
    assert reference(model, tokenizer, prompts, policy, "drop") == expected
    assert reference(model, tokenizer, prompts, policy, "mask") == expected
    assert fast(model, tokenizer, prompts, policy) == expected
    assert expected != [oracle_greedy(plain, p, NEW_TOKENS, *ratios) for p in prompts]  # not H2O's


def snapshots(model, prompt: list[int], tokens: list[int], policy, mode: str, attention: str):
    """Drive an EvictingCache through the prompt and then `tokens`, one pass at a time; after
    each pass, per layer, per KV head: {position: score} of the slots in memory, and the set of
    positions the next pass attends to."""
    model.set_attn_implementation(attention)
    cache = EvictingCache(policy, mode, model.config.num_hidden_layers, [len(prompt)])
    feeds = [(prompt, list(range(len(prompt))))] + [([t], [len(prompt) + i]) for i, t in enumerate(tokens)]
    out = []
    with torch.no_grad():
        for ids, positions in feeds:
            positions = torch.tensor([positions])
            cache.begin(positions, torch.ones_like(positions, dtype=torch.bool))
            model(input_ids=torch.tensor([ids]), position_ids=positions, cache=cache, eviction_cache=cache)
            out.append([[({p: s for p, s in zip(layer.positions[0, h].tolist(), layer.scores[0, h].tolist()) if p >= 0},
                          {p for p, a in zip(layer.positions[0, h].tolist(), layer.active[0, h].tolist()) if a})
                         for h in range(layer.positions.shape[1])] for layer in cache.layers])
    return out


@pytest.mark.parametrize("attention", ["h2o_eager", "h2o_sdpa"])
@pytest.mark.parametrize("mode", ["drop", "mask"])
@pytest.mark.parametrize("model_name", MODELS)
def test_scores_and_kept_tokens_are_the_oracles_at_every_step(plain_models, model_name, mode, attention):
    model, plain = plain_models[model_name]
    prompt = random_prompts([61], seed=33)[0]
    ratios = (0.15, 0.1)
    state = OracleState(plain, *oracle_budget("h2o", len(prompt), *ratios), "h2o")
    tokens = oracle_greedy(plain, prompt, 12, *ratios)
    got = snapshots(model, prompt, tokens[:-1], make_policy("h2o", *ratios), mode, attention)
    feeds = [(prompt, list(range(len(prompt))))] + [([t], [len(prompt) + i]) for i, t in enumerate(tokens[:-1])]
    with torch.no_grad():
        for step, ((ids, positions), layers) in enumerate(zip(feeds, got)):
            state.forward(ids, positions)
            for i, heads in enumerate(layers):
                for g, (scores, active) in enumerate(heads):
                    where = f"pass {step}, layer {i}, KV head {g}"
                    assert active == state.active[i][g], where
                    live = state.live[i][g]
                    if mode == "drop":  # exactly the live tokens stay in memory
                        assert set(scores) == live, where
                    else:  # every token stays; the dead ones with no score
                        assert set(scores) == set(range(positions[-1] + 1)), where
                        assert all(scores[p] == 0 for p in set(scores) - live), where
                    expected = [state.score[i][g][p] for p in sorted(live)]
                    assert [scores[p] for p in sorted(live)] == pytest.approx(expected, rel=1e-5, abs=1e-6), where


@pytest.fixture(scope="module")
def smollm2():
    from h2o import models
    from h2o.serve.prompts import encode

    tokenizer, _ = models.load_tokenizer()
    lines = (ROOT / "data" / "xsum.jsonl").read_text().splitlines()[1:3]
    prompts = [encode(tokenizer, json.loads(line)["request"]["prompt"], "on")[0] for line in lines]
    model = models.load_model()
    return model, PlainLlama(model), tokenizer, prompts


def test_smollm2_drop_mask_and_fast_give_the_oracles_tokens(smollm2):
    model, plain, tokenizer, prompts = smollm2
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 3
    ratios, new_tokens = (0.1, 0.1), 24
    policy = make_policy("h2o", *ratios)
    expected = [oracle_greedy(plain, p, new_tokens, *ratios, eos_ids(model, tokenizer)) for p in prompts]
    assert sum(len(e) for e in expected) >= new_tokens  # not a vacuous match on empty continuations
    full = generate(model, tokenizer, prompts, [Sampling(max_new_tokens=new_tokens)] * len(prompts))
    assert all(e != c.token_ids for e, c in zip(expected, full))  # the eviction shows
    assert reference(model, tokenizer, prompts, policy, "drop", new_tokens) == expected
    assert reference(model, tokenizer, prompts[:1], policy, "mask", new_tokens) == expected[:1]
    assert fast(model, tokenizer, prompts, policy, new_tokens) == expected
