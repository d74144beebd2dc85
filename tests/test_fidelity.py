import pytest

from conftest import random_prompts
from h2o.fidelity import against_full
from h2o.generation import Eviction, Sampling, generate
from h2o.policies import make_policy


def _continuation(model, tokenizer, prompt):
    return generate(model, tokenizer, [prompt], [Sampling(max_new_tokens=16)])[0].token_ids


def test_until_the_first_eviction_the_small_cache_is_the_full_one(gqa, tokenizer):
    # A budget of the whole prompt: the first eviction follows the first decoded token's pass.
    prompt = random_prompts([60], seed=21)[0]
    continuation = _continuation(gqa, tokenizer, prompt)
    whole = against_full(gqa, prompt, continuation, Eviction(make_policy("h2o", 0.0, 1.0), "drop"))
    assert whole.kl[:2] == pytest.approx([0.0, 0.0], abs=1e-5) and whole.agree[:2] == [True, True]
    assert max(whole.kl[2:]) > 1e-4


def test_a_small_cache_diverges_and_agreement_matches_free_generation(gqa, tokenizer):
    prompt = random_prompts([120], seed=22)[0]
    continuation = _continuation(gqa, tokenizer, prompt)
    eviction = Eviction(make_policy("h2o", 0.0, 0.05), "drop")
    small = against_full(gqa, prompt, continuation, eviction)
    assert len(small.kl) == len(small.agree) == len(continuation)
    assert small.mean_kl > 1e-3 and small.agreement < 1.0
    # Until the first disagreement, teacher forcing and free generation see the same tokens.
    free = generate(gqa, tokenizer, [prompt], [Sampling(max_new_tokens=16)], eviction)[0].token_ids
    first = small.agree.index(False)
    assert free[:first] == continuation[:first] and free[first] != continuation[first]
