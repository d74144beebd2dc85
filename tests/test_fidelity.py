import pytest

from conftest import random_prompts
from h2o.lab.fidelity import against_full, full_reference
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy


def _continuation(model, tokenizer, prompt):
    return generate(model, tokenizer, [prompt], [Sampling(max_new_tokens=16)])[0].token_ids


def test_until_the_first_eviction_the_small_cache_is_the_full_one(gqa, tokenizer):
    # A budget of the whole prompt: the first eviction follows the first decoded token's pass.
    prompt = random_prompts([60], seed=21)[0]
    continuation = _continuation(gqa, tokenizer, prompt)
    [whole] = against_full(gqa, [prompt], [continuation], Eviction(make_policy("h2o", 0.0, 1.0), "drop"))
    assert whole.kl[:2] == pytest.approx([0.0, 0.0], abs=1e-5) and whole.agree[:2] == [True, True]
    assert max(whole.kl[2:]) > 1e-4


def test_a_small_cache_diverges_and_agreement_matches_free_generation(gqa, tokenizer):
    prompt = random_prompts([120], seed=22)[0]
    continuation = _continuation(gqa, tokenizer, prompt)
    eviction = Eviction(make_policy("h2o", 0.0, 0.05), "drop")
    [small] = against_full(gqa, [prompt], [continuation], eviction)
    assert len(small.kl) == len(small.agree) == len(continuation)
    assert small.mean_kl > 1e-3 and small.agreement < 1.0
    # Until the first disagreement, teacher forcing and free generation see the same tokens.
    free = generate(gqa, tokenizer, [prompt], [Sampling(max_new_tokens=16)], eviction)[0].token_ids
    first = small.agree.index(False)
    assert free[:first] == continuation[:first] and free[first] != continuation[first]


def test_a_batch_gives_what_each_prompt_gives_alone(gqa, tokenizer):
    prompts = random_prompts([90, 40, 120], seed=23)
    continuations = [_continuation(gqa, tokenizer, p) for p in prompts]
    continuations[1] = continuations[1][:5]  # rows of different lengths share the batch
    eviction = Eviction(make_policy("h2o", 0.05, 0.05), "drop")
    alone = [against_full(gqa, [p], [c], eviction)[0] for p, c in zip(prompts, continuations)]
    batch = against_full(gqa, prompts, continuations, eviction)
    reused = against_full(gqa, prompts, continuations, eviction, full_reference(gqa, prompts, continuations))
    for one, many, again in zip(alone, batch, reused):
        assert len(many.kl) == len(one.kl) and many.agree == one.agree == again.agree
        assert many.kl == pytest.approx(one.kl, abs=1e-4) and again.kl == many.kl
    assert [len(f.kl) for f in batch] == [len(c) for c in continuations]
    assert max(f.mean_kl for f in batch) > 1e-3


def test_an_empty_continuation_has_nothing_to_compare(gqa, tokenizer):
    prompt = random_prompts([30], seed=24)[0]
    [empty] = against_full(gqa, [prompt], [[]], Eviction(make_policy("h2o", 0.1, 0.1), "drop"))
    assert empty.kl == [] and empty.agreement == 1.0
