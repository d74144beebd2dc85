import pytest
import torch

from h2o.policies import Budget, make_policy


def test_budgets_truncate_like_the_paper_and_keep_the_newest_token():
    policy = make_policy("h2o", 0.1, 0.1)
    assert policy.budget(519) == Budget(heavy=51, recent=51)
    assert policy.budget(5) == Budget(heavy=0, recent=1)
    assert make_policy("h2o", 0.0, 0.2).budget(100) == Budget(heavy=0, recent=20)


@pytest.mark.parametrize(
    "heavy, recent, message",
    [(-0.1, 0.1, "--heavy_ratio"), (0.1, 1.5, "--recent_ratio"), (0.6, 0.6, "at most 1")],
)
def test_ratios_outside_range_are_refused(heavy, recent, message):
    with pytest.raises(ValueError, match=message):
        make_policy("h2o", heavy, recent)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope", 0.1, 0.1)


def _select(scores, n_tokens, heavy, recent):
    positions = torch.arange(len(scores)).view(1, 1, -1)
    policy = make_policy("h2o", 0.1, 0.1)
    scores = torch.tensor(scores, dtype=torch.float32).view(1, 1, -1)
    return policy.select(
        scores, torch.ones_like(scores), positions,
        torch.tensor([n_tokens]), torch.tensor([heavy]), torch.tensor([recent]),
    )


def test_selection_keeps_recent_window_top_heavy_and_parks_the_leaving_token():
    # 10 tokens seen, heavy 2, recent 3: the next token plus tokens 8, 9 form the window;
    # token 7 leaves it (kept in memory, not attended); heavy = top 2 of tokens 0..6.
    scores = [5.0, 0.1, 9.0, 0.2, 0.3, 7.0, 0.4, 100.0, 0.0, 0.0]
    chosen = _select(scores, n_tokens=10, heavy=2, recent=3)
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [2, 5, 8, 9]
    assert chosen.retained[0, 0].nonzero().flatten().tolist() == [2, 5, 7, 8, 9]


def test_nothing_is_evicted_within_budget():
    chosen = _select([1.0] * 6, n_tokens=6, heavy=3, recent=3)
    assert chosen.active.all() and chosen.retained.all()


def test_local_keeps_only_the_window():
    chosen = _select([9.0] * 10, n_tokens=10, heavy=0, recent=4)
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [7, 8, 9]
    assert chosen.retained[0, 0].nonzero().flatten().tolist() == [7, 8, 9]


def test_budgets_are_per_sequence_in_a_batch():
    policy = make_policy("h2o", 0.1, 0.1)
    scores = torch.arange(10, dtype=torch.float32).flip(0).repeat(2, 1, 1)  # earliest highest
    positions = torch.arange(10).repeat(2, 1, 1)
    chosen = policy.select(scores, torch.ones_like(scores), positions, torch.tensor([10, 10]), torch.tensor([1, 3]), torch.tensor([2, 2]))
    assert chosen.active[0, 0].nonzero().flatten().tolist() == [0, 9]
    assert chosen.active[1, 0].nonzero().flatten().tolist() == [0, 1, 2, 9]


def _select_with(policy, scores, n_tokens, budget, views=None):
    positions = torch.arange(len(scores)).view(1, 1, -1)
    scores = torch.tensor(scores, dtype=torch.float32).view(1, 1, -1)
    views = torch.ones_like(scores) if views is None else torch.tensor(views, dtype=torch.float32).view(1, 1, -1)
    return policy.select(scores, views, positions, torch.tensor([n_tokens]),
                         torch.tensor([budget.heavy]), torch.tensor([budget.recent]))


def _kept(selection):
    return selection.active[0, 0].nonzero().flatten().tolist()


def test_sink_keeps_the_first_tokens_and_the_window():
    policy = make_policy("sink", 0.0, 0.5, sink_size=2)
    budget = policy.budget(12)
    assert budget == Budget(heavy=2, recent=4)
    chosen = _select_with(policy, [0.0] * 12 + [99.0] * 0, n_tokens=12, budget=budget)
    assert _kept(chosen) == [0, 1, 9, 10, 11]  # + the next token: 6 in all
    assert chosen.retained.sum() == chosen.active.sum()  # nothing parked


def test_tova_ranks_by_the_newest_query_alone():
    from h2o.policies import Observation

    policy = make_policy("tova", 0.2, 0.2)
    old = torch.tensor([[[100.0, 100.0, 0.0, 0.0]]])
    newest = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    observed = Observation(received=newest, newest=newest, seen=torch.ones_like(newest))
    assert torch.equal(policy.accumulate(old, observed), newest)
    budget = policy.budget(10)
    assert budget == Budget(heavy=3, recent=1)
    chosen = _select_with(policy, [5.0, 0.0, 4.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 9.0], n_tokens=10, budget=budget)
    assert _kept(chosen) == [0, 2, 9]


def test_h2o_avg_ranks_by_attention_per_view():
    policy = make_policy("h2o-avg", 0.1, 0.3)
    # Token 0: much attention but seen by many queries; token 2: less, seen by few.
    chosen = _select_with(policy, [10.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], n_tokens=10,
                          budget=Budget(heavy=1, recent=3), views=[100, 10, 2, 1, 1, 1, 1, 1, 1, 1])
    assert _kept(chosen) == [2, 8, 9]


def test_h2o_sink_keeps_the_first_tokens_whatever_their_score_then_the_top_scores():
    policy = make_policy("h2o-sink", 0.1, 0.3, sink_size=2)
    scores = [0.0, 0.0, 3.0, 9.0, 1.0, 7.0, 0.0, 0.0, 0.0, 0.0]
    chosen = _select_with(policy, scores, n_tokens=10, budget=Budget(heavy=3, recent=3))
    assert _kept(chosen) == [0, 1, 3, 8, 9]  # sinks 0 and 1, then the best score; 7 is parked
    plain = _select_with(make_policy("h2o", 0.1, 0.3), scores, n_tokens=10, budget=Budget(heavy=3, recent=3))
    assert _kept(plain) == [2, 3, 5, 8, 9]  # H2O alone lets the low-scored sinks go


def test_h2o_sink_keeps_the_earliest_sinks_when_the_heavy_budget_holds_fewer():
    # Heavy 2 < sink_size 4: sinks 0 and 1, whatever the scores (not a tie broken at random).
    policy = make_policy("h2o-sink", 0.1, 0.3, sink_size=4)
    scores = [0.0, 0.0, 5.0, 9.0, 1.0, 7.0, 0.0, 0.0, 0.0, 0.0]
    for order in (scores, [0.0, 1.0, 2.0, 3.0] + scores[4:]):
        chosen = _select_with(policy, order, n_tokens=10, budget=Budget(heavy=2, recent=3))
        assert _kept(chosen) == [0, 1, 8, 9]


def test_knorm_keeps_the_keys_of_lowest_norm_and_the_window():
    from h2o.policies import Observation

    policy = make_policy("knorm", 0.2, 0.2)
    norms = torch.tensor([[[3.0, 0.5, 2.0, 0.1, 4.0, 1.0, 9.0, 9.0, 9.0, 9.0]]])
    seen = torch.ones_like(norms)
    seen[..., 1] = 0  # evicted in mask mode: no query sees it, it never comes back
    scores = policy.accumulate(torch.zeros_like(norms), Observation(received=seen, newest=seen, seen=seen,
                                                                    key_norms=norms))
    assert torch.equal(scores, torch.where(seen > 0, 1 / (1 + norms), 0.0))  # no attention in it
    chosen = _select_with(policy, scores[0, 0].tolist(), n_tokens=10, budget=policy.budget(10))
    assert policy.budget(10) == Budget(heavy=2, recent=2)
    assert _kept(chosen) == [3, 5, 9]  # the two smallest norms seen, then the window


def test_snapkv_keeps_the_prompt_tokens_its_last_queries_attend_to_pooled(gqa):
    """The first eviction against transformers' own attention: the last 32 prompt queries' mass,
    summed over the query heads of each KV head, max-pooled over 7 neighbours, top heavy among the
    tokens before the window."""
    import torch.nn.functional as F

    from conftest import random_prompts
    from h2o.engine.reference.evicting_cache import EvictingCache
    from h2o.engine.reference.generation import Decoder, Eviction

    prompt = random_prompts([120], seed=33)[0]
    policy = make_policy("snapkv", 0.1, 0.1)
    decoder = Decoder(gqa, [prompt], Eviction(policy, "drop"))
    decoder.prefill()
    gqa.set_attn_implementation("eager")
    with torch.inference_mode():
        attentions = gqa(input_ids=torch.tensor([prompt]), output_attentions=True).attentions
    groups = gqa.config.num_attention_heads // gqa.config.num_key_value_heads
    n, budget = len(prompt), policy.budget(len(prompt))
    assert isinstance(decoder.cache, EvictingCache)
    for layer, attention in enumerate(attentions):
        mass = attention[0, :, n - SnapKVRows:, :].sum(1).view(-1, groups, n).sum(1)
        pooled = F.max_pool1d(mass[:, None], 7, stride=1, padding=3)[:, 0]
        candidates = n + 1 - budget.recent  # positions before the window
        # Pooling makes plateaus of equal scores: the later token wins a tie.
        expected = [sorted(sorted(range(candidates), key=lambda p: (-float(pooled[h, p]), -p))[: budget.heavy]
                           + list(range(candidates, n)))
                    for h in range(gqa.config.num_key_value_heads)]
        kept = decoder.cache.layers[layer]
        got = [sorted(kept.positions[0, h][kept.active[0, h]].tolist()) for h in range(gqa.config.num_key_value_heads)]
        assert got == expected, layer


SnapKVRows = 32


def test_pyramidkv_budgets_fall_by_layer_and_hold_h2os_bytes():
    policy = make_policy("pyramidkv", 0.1, 0.1)
    budget = policy.budget(400)
    layers = policy.layer_budgets(budget, 30)
    heavy = [b.heavy for b in layers]
    assert sum(heavy) == 30 * budget.heavy and {b.recent for b in layers} == {budget.recent}
    assert heavy == sorted(heavy, reverse=True) and heavy[0] > 1.9 * budget.heavy and heavy[-1] <= 3
    assert policy.layer_budgets(Budget(heavy=0, recent=8), 30) == [Budget(0, 8)] * 30


def test_pyramidkv_keeps_each_layers_own_budget(gqa, tokenizer):
    from conftest import random_prompts
    from h2o.engine.reference.generation import Decoder, Eviction

    prompt = random_prompts([120], seed=34)[0]
    policy = make_policy("pyramidkv", 0.1, 0.1)
    decoder = Decoder(gqa, [prompt], Eviction(policy, "drop"))
    decoder.prefill()
    for layer, budget in zip(decoder.cache.layers, policy.layer_budgets(policy.budget(120), 2)):
        # The window less the coming token's place, and the layer's own heavy hitters.
        assert (layer.positions >= 0).sum(-1).tolist() == [[budget.heavy + budget.recent - 1] * 2]


def test_adakv_gives_a_layers_heavy_budget_to_the_heads_whose_attention_needs_it():
    policy = make_policy("adakv", 0.2, 0.2)
    # Head 0 attends to many tokens, head 1 to one: heavy 4 a head is 8 for the layer, 0 a head
    # kept first (alpha 0.2 of 4 rounds down), so head 0 takes 7 and head 1 its one token.
    scores = torch.tensor([[[5.0, 6.0, 7.0, 8.0, 9.0, 4.0, 3.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                             0.0, 0.0, 0.0],
                            [0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                             0.0, 0.0, 0.0]]])
    positions = torch.arange(20).expand(1, 2, 20)
    chosen = policy.select(scores, torch.ones_like(scores), positions, torch.tensor([20]), torch.tensor([4]),
                           torch.tensor([4]))
    window = [17, 18, 19]
    kept = [positions[0, h][chosen.active[0, h]].tolist() for h in range(2)]
    assert kept[0] == [0, 1, 2, 3, 4, 5, 6] + window and kept[1] == [1] + window
    assert sum(len(k) for k in kept) == 2 * (4 + 4 - 1)  # H2O's slots for the layer
    assert torch.equal(chosen.retained, chosen.active)
