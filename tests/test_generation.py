import math

import pytest
import torch

from conftest import random_prompts
from h2o.engine.reference.attention import eager_eviction_attention
from h2o.engine.reference.evicting_cache import EvictingCache
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import make_policy
from paper_reference import paper_greedy

GREEDY = Sampling(max_new_tokens=24)
RATIOS = [(0.1, 0.1), (0.2, 0.1), (0.0, 0.2), (0.3, 0.05)]


def _tokens(model, tokenizer, prompts, mode=None, ratios=(0.1, 0.1), attention="eager", sampling=GREEDY):
    eviction = None if mode is None else Eviction(make_policy("h2o", *ratios), mode, attention)
    out = generate(model, tokenizer, prompts, [sampling] * len(prompts), eviction)
    return [c.token_ids for c in out]


@pytest.mark.parametrize("ratios", RATIOS)
def test_mask_mode_reproduces_the_papers_tokens(mha, tokenizer, ratios):
    for prompt in random_prompts([57, 90], seed=3):
        expected = paper_greedy(mha, prompt, GREEDY.max_new_tokens, *ratios)
        assert _tokens(mha, tokenizer, [prompt], "mask", ratios) == [expected]


def test_eviction_changes_the_output(mha, tokenizer):
    # Guards the tests above: on these models a small cache must make a difference.
    prompts = random_prompts([57, 90], seed=3)
    assert _tokens(mha, tokenizer, prompts, "mask", (0.0, 0.2)) != _tokens(mha, tokenizer, prompts)


@pytest.mark.parametrize("ratios", RATIOS)
@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_drop_mode_gives_mask_modes_tokens(request, tokenizer, model_name, ratios):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts([64, 101], seed=5)
    for prompt in prompts:
        assert _tokens(model, tokenizer, [prompt], "drop", ratios) == _tokens(model, tokenizer, [prompt], "mask", ratios)


@pytest.mark.parametrize("policy", ["h2o-avg", "h2o-sink", "knorm", "pyramidkv", "sink", "snapkv", "tova"])
def test_every_policy_drops_what_it_masks(mha, tokenizer, policy):
    prompts = random_prompts([64, 101], seed=5)
    runs = {}
    for mode in ("mask", "drop"):
        eviction = Eviction(make_policy(policy, 0.1, 0.1), mode)
        runs[mode] = [c.token_ids for c in generate(mha, tokenizer, prompts, [GREEDY] * 2, eviction)]
    assert runs["drop"] == runs["mask"]
    assert runs["drop"] != _tokens(mha, tokenizer, prompts)


def test_sdpa_drop_gives_eager_drop_tokens(gqa, tokenizer):
    prompts = random_prompts([70], seed=6)
    assert _tokens(gqa, tokenizer, prompts, "drop", attention="sdpa") == _tokens(gqa, tokenizer, prompts, "drop")


@pytest.mark.parametrize("mode", [None, "mask", "drop"])
def test_a_batch_gives_the_same_tokens_as_one_at_a_time(gqa, tokenizer, mode):
    prompts = random_prompts([33, 80, 51], seed=7)
    singles = [_tokens(gqa, tokenizer, [p], mode)[0] for p in prompts]
    assert _tokens(gqa, tokenizer, prompts, mode) == singles


def test_sampling_is_seeded_per_request_not_per_batch(gqa, tokenizer):
    prompts = random_prompts([40, 60], seed=8)
    sampling = [Sampling(max_new_tokens=16, temperature=0.8, seed=s) for s in (11, 12)]
    eviction = Eviction(make_policy("h2o", 0.1, 0.1), "drop")
    batch = [c.token_ids for c in generate(gqa, tokenizer, prompts, sampling, eviction)]
    single = [generate(gqa, tokenizer, [p], [s], eviction)[0].token_ids for p, s in zip(prompts, sampling)]
    assert batch == single
    other = generate(gqa, tokenizer, prompts[:1], [Sampling(max_new_tokens=16, temperature=0.8, seed=99)], eviction)
    assert other[0].token_ids != batch[0]


def test_drop_mode_holds_at_most_the_budget_plus_one_per_head(gqa, tokenizer):
    prompts = random_prompts([100, 60], seed=9)
    policy = make_policy("h2o", 0.1, 0.1)
    cache = EvictingCache(policy, "drop", gqa.config.num_hidden_layers, [100, 60])
    seen = []
    original = cache.layers[0].update

    def spy(*args, **kwargs):
        keys, values = original(*args, **kwargs)
        seen.append(int((cache.layers[0].positions >= 0).sum(-1).max()))
        return keys, values

    # Drive generate's loop by hand for this one cache, to watch every step.
    gqa.set_attn_implementation("h2o_eager")
    ids = torch.tensor([[0] * 0 + prompts[0], [0] * 40 + prompts[1]])
    valid = torch.tensor([[True] * 100, [False] * 40 + [True] * 60])
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    cache.begin(positions, valid)
    gqa(input_ids=ids, position_ids=positions, cache=cache, eviction_cache=cache)
    widths = [int((cache.layers[0].positions[b] >= 0).sum(-1).max()) for b in range(2)]
    assert widths == [20, 12]  # heavy + recent - 1 in the window + the leaving token
    cache.layers[0].update = spy
    for step in range(10):
        cache.begin(torch.tensor([[100 + step], [60 + step]]), torch.ones(2, 1, dtype=torch.bool))
        gqa(input_ids=torch.tensor([[5], [6]]), position_ids=torch.tensor([[100 + step], [60 + step]]),
            cache=cache, eviction_cache=cache)
    assert max(seen) == 21  # 20 kept + the new token, for the longer prompt
    per_sequence = [int((cache.layers[0].positions[b] >= 0).sum(-1).max()) for b in range(2)]
    assert per_sequence == [20, 12]


def test_drop_mode_reports_fewer_kv_bytes_than_mask_and_full(gqa, tokenizer):
    prompts = random_prompts([200], seed=10)
    reports = {}
    for mode in (None, "mask", "drop"):
        eviction = None if mode is None else Eviction(make_policy("h2o", 0.1, 0.1), mode)
        reports[mode] = generate(gqa, tokenizer, prompts, [GREEDY], eviction)[0].kv_cache
    per_token = 2 * 2 * 16 * 2 * 4  # layers * kv heads * head_dim * (k, v) * float32
    assert reports[None]["kv_bytes_peak"] == (200 + 23) * per_token
    assert reports["mask"]["kv_bytes_peak"] == reports[None]["kv_bytes_peak"]
    # Peak: layer 0 evicted down to 40 while layer 1 holds the whole prompt during the prefill.
    assert reports["drop"]["kv_bytes_peak"] == (200 + 40) * per_token // 2
    assert reports["drop"]["heavy_budget"] == 20 and reports["drop"]["recent_budget"] == 20


class _Layer:
    layer_idx = 0


def test_gqa_scores_sum_the_query_heads_sharing_a_kv_head():
    torch.manual_seed(0)
    b, hq, hkv, n, d = 1, 4, 2, 6, 8
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    cache = EvictingCache(make_policy("h2o", 0.5, 0.5), "drop", 1, [n])
    positions = torch.arange(n)[None]
    cache.begin(positions, torch.ones(1, n, dtype=torch.bool))
    keys, values = cache.update(k, v, 0)
    out, _ = eager_eviction_attention(_Layer(), q, keys, values, None, d**-0.5, eviction_cache=cache)
    logits = q @ k.repeat_interleave(2, dim=1).transpose(2, 3) / math.sqrt(d)
    probs = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    expected = probs.sum(2).view(b, hkv, 2, n).sum(2)
    torch.testing.assert_close(cache.layers[0].scores, expected)
    torch.testing.assert_close(out, (probs @ v.repeat_interleave(2, dim=1)).transpose(1, 2))


def test_text_is_cut_at_the_first_stop_and_kept_whole_without_one(gqa, tokenizer):
    prompt = random_prompts([30], seed=11)
    plain = generate(gqa, tokenizer, prompt, [GREEDY])[0]
    assert plain.finish_reason == "length" and plain.text == tokenizer.decode(plain.token_ids)
    assert len(plain.token_ids) == GREEDY.max_new_tokens
    stop_word = plain.text.split()[3]
    stopped = generate(gqa, tokenizer, prompt, [Sampling(max_new_tokens=24, stop=(stop_word,))])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == plain.text[: plain.text.find(stop_word)]
    assert stopped.token_ids == plain.token_ids[: len(stopped.token_ids)]
    # Tokens cover the text: a token that straddles the cut stays, none starts after it.
    assert "".join(stopped.tokens).startswith(stopped.text)
    assert len("".join(stopped.tokens[:-1])) < len(stopped.text)
    assert stopped.text_offset == [len("".join(stopped.tokens[:i])) for i in range(len(stopped.tokens))]


def test_token_logprobs_are_those_of_the_chosen_tokens(gqa, tokenizer):
    prompt = random_prompts([30], seed=12)[0]
    out = generate(gqa, tokenizer, [prompt], [Sampling(max_new_tokens=4, top_logprobs=3)])[0]
    with torch.no_grad():
        logits = gqa(input_ids=torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    expected = [float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 3 for top in out.top_logprobs)
    assert all(max(top.values()) == pytest.approx(lp, abs=1e-6) for top, lp in zip(out.top_logprobs, out.token_logprobs))


@pytest.mark.parametrize("mode", ["mask", "drop"])
def test_kv_peak_of_a_request_does_not_depend_on_its_batch(gqa, tokenizer, mode):
    # The second request ends first; the first keeps decoding in the same batch.
    prompts = random_prompts([70, 31], seed=40)
    sampling = [Sampling(max_new_tokens=12), Sampling(max_new_tokens=5)]
    eviction = Eviction(make_policy("h2o", 0.1, 0.1), mode)
    batch = generate(gqa, tokenizer, prompts, sampling, eviction)
    alone = [generate(gqa, tokenizer, [p], [s], eviction)[0] for p, s in zip(prompts, sampling)]
    assert [c.kv_cache for c in batch] == [c.kv_cache for c in alone]


def test_h2o_sink_with_fewer_heavy_slots_than_sinks_drops_what_it_masks(mha, tokenizer):
    prompt = random_prompts([64, 101, 47], seed=70)[2]
    policy = make_policy("h2o-sink", 0.05, 0.1, sink_size=8)  # heavy 2 < 8 sinks
    runs = [generate(mha, tokenizer, [prompt], [GREEDY], Eviction(policy, mode))[0].token_ids for mode in ("mask", "drop")]
    assert runs[0] == runs[1]


def test_adakv_drops_what_it_masks_and_batches_alike(gqa, tokenizer):
    prompts = random_prompts([64, 101], seed=5)
    eviction = {mode: Eviction(make_policy("adakv", 0.1, 0.1), mode) for mode in ("mask", "drop")}
    runs = {mode: [c.token_ids for c in generate(gqa, tokenizer, prompts, [GREEDY] * 2, e)] for mode, e in eviction.items()}
    assert runs["drop"] == runs["mask"]
    assert runs["drop"] == [generate(gqa, tokenizer, [p], [GREEDY], eviction["drop"])[0].token_ids for p in prompts]
    assert runs["drop"] != _tokens(gqa, tokenizer, prompts)
