"""h2o-shrink: its selection rule by hand, between H2O and h2o-avg; drop, mask and the fast engine
alike; and its knob through run_helm.py and the sweep's points."""

import pytest
import torch

from conftest import random_prompts
from h2o.engine.reference.generation import Eviction, Sampling, generate
from h2o.policies import Budget, make_policy
from h2o.lab.points import Point, points, policy_spec
from h2o.serve.options import ServeOptions

# 10 tokens seen, heavy 1, recent 3: the window is 8, 9 (and the next token), 7 is parked, and
# one heavy hitter is chosen from 0-6. Token 0 has the largest sum (5.0 over 10 queries), token 6
# the largest mean (2.6 over 4), token 4 holds a high share over many queries (3.6 over 6).
SCORES = [5.0, 0.1, 0.1, 0.1, 3.6, 0.1, 2.6, 0.1, 0.1, 0.1]
AGES = [10 - p for p in range(10)]


def _kept(policy, scores=SCORES, views=AGES):
    positions = torch.arange(len(scores)).view(1, 1, -1)
    scores = torch.tensor(scores).view(1, 1, -1)
    chosen = policy.select(scores, torch.tensor(views, dtype=torch.float32).view(1, 1, -1), positions,
                           torch.tensor([10]), torch.tensor([1]), torch.tensor([3]))
    return chosen.active[0, 0].nonzero().flatten().tolist(), chosen.retained[0, 0].nonzero().flatten().tolist()


def test_the_shrunk_mean_chooses_between_h2os_sum_and_the_plain_mean():
    assert _kept(make_policy("h2o", 0.1, 0.1))[0] == [0, 8, 9]
    assert _kept(make_policy("h2o-avg", 0.1, 0.1))[0] == [6, 8, 9]
    # 5 / (10 + 2.5) = 0.40, 3.6 / (6 + 2.5) = 0.42, 2.6 / (4 + 2.5) = 0.40.
    active, retained = _kept(make_policy("h2o-shrink", 0.1, 0.1, shrink=0.25))
    assert active == [4, 8, 9] and retained == [4, 7, 8, 9]  # H2O's parked token and bytes
    assert _kept(make_policy("h2o-shrink", 0.1, 0.1, shrink=0.0))[0] == [6, 8, 9]
    assert _kept(make_policy("h2o-shrink", 0.1, 0.1, shrink=1e6))[0] == [0, 8, 9]
    assert make_policy("h2o-shrink", 0.1, 0.1).shrink == 0.25  # the default


def test_the_age_comes_from_the_newest_position_not_from_stale_views():
    # An evicted slot of mask mode (score 0, views frozen) and an empty slot of drop mode (-1)
    # change nothing: t is one past the newest token either way.
    policy = make_policy("h2o-shrink", 0.1, 0.1)
    assert _kept(policy, views=[999.0] * 10)[0] == [4, 8, 9]
    scores = torch.tensor([SCORES + [0.0]])[None]
    positions = torch.tensor([list(range(10)) + [-1]])[None]
    ranked = policy.rank(scores, torch.ones_like(scores), positions)
    t = torch.tensor(10.0)
    assert torch.allclose(ranked[0, 0, :10], torch.tensor(SCORES) / (t - torch.arange(10) + 0.25 * t))


def test_a_negative_shrink_is_refused():
    with pytest.raises(ValueError, match="--shrink must be >= 0, got -1"):
        make_policy("h2o-shrink", 0.1, 0.1, shrink=-1.0)


def test_drop_gives_mask_modes_tokens_and_both_differ_from_h2o(mha, tokenizer):
    prompts = random_prompts([64, 101], seed=5)
    greedy = [Sampling(max_new_tokens=16)] * 2
    runs = {}
    for mode in ("mask", "drop"):
        eviction = Eviction(make_policy("h2o-shrink", 0.1, 0.1, shrink=0.05), mode)  # 0.25 shows less here
        runs[mode] = [c.token_ids for c in generate(mha, tokenizer, prompts, greedy, eviction)]
    assert runs["drop"] == runs["mask"]
    h2o = [c.token_ids for c in generate(mha, tokenizer, prompts, greedy, Eviction(make_policy("h2o", 0.1, 0.1)))]
    assert runs["drop"] != h2o


@pytest.mark.parametrize("ratios", [(0.1, 0.1), (0.05, 0.15), (0.2, 0.05)])
def test_the_fast_engine_gives_the_reference_drop_tokens(gqa, tokenizer, fast_caches, monkeypatch, ratios):
    from test_fast_policies_and_slicing import _fast, _reference

    from h2o.engine.fast import FastCache

    prompts = random_prompts([64, 101, 47], seed=70)
    policy = make_policy("h2o-shrink", *ratios, shrink=0.1)
    expected = _reference(gqa, tokenizer, prompts, policy)
    held = {}  # row -> each layer's held slots per KV head as its sequence ends (its blocks go back then)
    release = FastCache.release

    def spy(self, row):
        held[row] = [(layer.view()["positions"][row] >= 0).sum(-1).tolist() for layer in self.layers]
        release(self, row)

    monkeypatch.setattr(FastCache, "release", spy)
    assert _fast(gqa, tokenizer, prompts, policy, prefill_rows=2) == expected
    assert not fast_caches[-1].use_kernels  # its own ranking: the torch path
    # H2O's slots: heavy + recent, the parked token included.
    heads, layers = gqa.config.num_key_value_heads, gqa.config.num_hidden_layers
    assert held == {row: [[policy.budget(len(p)).total] * heads] * layers for row, p in enumerate(prompts)}


def test_the_knob_reaches_run_helm_and_is_refused_for_other_policies():
    from h2o.serve.cli import main

    point = Point("h2o-shrink", 0.2, 0.5)
    assert point.name == "h2o-shrink_0.5-20" and point.label == "h2o-shrink:0.5"
    base = ServeOptions("out.jsonl")
    assert point.serve_options(base).shrink == 0.5 and point.eviction().policy.shrink == 0.5
    default = Point("h2o-shrink", 0.2).serve_options(base)
    assert (default.recent_ratio, default.shrink) == (0.1, None) and Point("h2o-shrink", 0.2).name == "h2o-shrink-20"
    assert [p.name for p in points(["h2o", "h2o-shrink:0.1"], [0.04])] == ["full", "h2o-04", "h2o-shrink_0.1-04"]
    for spec, message in (("h2o:0.5", "h2o has no knob to set"), ("h2o-shrink:x", "'x' is not a number"),
                          ("nope", "unknown policy")):
        with pytest.raises(ValueError, match=message):
            policy_spec(spec)
    assert main(["--output_path", "x.jsonl", "--enable_small_cache", "--policy", "h2o", "--shrink", "0.5"]) == 2


def test_a_sweep_refuses_a_knob_out_of_range_before_anything_runs(tmp_path, capsys):
    from h2o.lab import sweep

    assert sweep.main(["--reports", str(tmp_path), "--policies", "h2o-shrink:-2", "--budgets", "0.2"]) == 2
    assert capsys.readouterr().err.strip() == "sweep: error: --shrink must be >= 0, got -2.0"
    assert not tmp_path.joinpath("xsum-smollm2").exists()


def test_its_budget_is_h2os():
    assert make_policy("h2o-shrink", 0.1, 0.1).budget(519) == Budget(heavy=51, recent=51)
