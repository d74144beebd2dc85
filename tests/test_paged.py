"""The fast engine's paged KV memory: every row holds its own budget's blocks, taken when its
request starts and given back when it ends, and results stay the reference engine's."""

import math

import pytest
import torch

from conftest import random_prompts
from h2o.engine.fast import FastCache, engine as fast_engine
from h2o.engine.fast.blocks import NULL_BLOCK, block_bytes
from h2o.engine.fast.engine import FastEngine
from h2o.engine.reference.generation import Sampling
from h2o.policies import Budget, make_policy
from test_engines import _assert_same, _reference, _sampling

LENGTHS = [64, 101, 40, 77, 30, 90, 55]
POLICIES = {"full": None, "h2o": ("h2o", 0.1, 0.1), "local": ("h2o", 0.0, 0.2), "pyramidkv": ("pyramidkv", 0.1, 0.1)}


def _policy(name):
    return None if POLICIES[name] is None else make_policy(*POLICIES[name])


@pytest.fixture
def assignments(monkeypatch) -> list:
    """After every FastCache.assign: (the pool's free blocks, the assigned rows' budgets, each
    one's blocks per layer)."""
    seen = []
    assign = FastCache.assign

    def spy(self, rows, budgets):
        assign(self, rows, budgets)
        table = self.table.table
        held = table[table != NULL_BLOCK].tolist()
        assert len(held) == len(set(held)), "a block is in two places of the table"
        seen.append((self.pool.free_count, budgets, [(table[:, row] != NULL_BLOCK).sum(-1).tolist() for row in rows]))

    monkeypatch.setattr(FastCache, "assign", spy)
    return seen


@pytest.mark.parametrize("name", list(POLICIES))
def test_a_row_holds_its_own_budgets_blocks_and_gives_them_back(gqa, tokenizer, assignments, name):
    policy, block_size, layers = _policy(name), 4, gqa.config.num_hidden_layers
    prompts = random_prompts(LENGTHS, seed=5)
    sampling = _sampling(len(prompts))
    engine = FastEngine(gqa, tokenizer, policy, 3, steps_per_check=4, block_size=block_size)
    engine.run(prompts, sampling)
    expected = {}
    for prompt, s in zip(prompts, sampling):
        budget = (Budget(heavy=0, recent=len(prompt) + s.max_new_tokens) if policy is None
                  else policy.budget(len(prompt)))
        per_layer = [budget] * layers if policy is None else policy.layer_budgets(budget, layers)
        expected[budget] = [math.ceil((b.total + 1) / block_size) for b in per_layer]
    held = {budget: blocks for _, budgets, rows in assignments for budget, blocks in zip(budgets, rows)}
    assert held == expected
    if name == "pyramidkv":  # per-layer budgets: the layers' block counts differ
        assert any(len(set(blocks)) > 1 for blocks in held.values())
    cache = engine.cache
    assert cache.pool.free_count == cache.pool.num_blocks - 1  # none leaked
    assert bool((cache.table.table == NULL_BLOCK).all())


@pytest.mark.parametrize("name", ["h2o", "pyramidkv"])
@pytest.mark.parametrize("rows", [1, 4])
def test_small_blocks_give_the_reference_results(gqa, tokenizer, name, rows):
    prompts = random_prompts(LENGTHS, seed=6)
    sampling = _sampling(len(prompts))
    alone = _reference(gqa, tokenizer, prompts, sampling, _policy(name), batch=1)
    done = FastEngine(gqa, tokenizer, _policy(name), rows, steps_per_check=4, block_size=8).run(prompts, sampling)
    _assert_same(done, alone)


def _card(monkeypatch, model, blocks, activations=(0.0, 0.0)):
    """A card whose memory, at --gpu_memory_fraction 1, holds `blocks` blocks of 32 slots (null
    block included) and no more, beside `activations` (bytes per prefill token and per decoding
    row, as the probe would measure them; none by default)."""
    config = model.config
    per_block = block_bytes(config.num_key_value_heads, 32, config.hidden_size // config.num_attention_heads, 4)
    total = blocks * per_block + per_block // 2
    monkeypatch.setattr(fast_engine, "card_memory", lambda device: (total, total))
    monkeypatch.setattr(FastEngine, "_activations", lambda self, requests, longest: activations)
    return total, per_block


def test_a_small_pool_admits_what_it_holds_and_serves_every_request(gqa, tokenizer, monkeypatch, assignments):
    policy = _policy("h2o")
    prompts = random_prompts(LENGTHS, seed=7)
    sampling = _sampling(len(prompts))
    alone = _reference(gqa, tokenizer, prompts, sampling, policy, batch=1)
    # h2o's budget of a prompt of 101 tokens is 10 + 10 + 1 slots: one block per layer, 2 a
    # request; 5 blocks: the null block and room for 2 requests.
    _card(monkeypatch, gqa, 5)
    engine = FastEngine(gqa, tokenizer, policy, 4, steps_per_check=4, prefill_tokens=4096, gpu_memory_fraction=1.0)
    _assert_same(engine.run(prompts, sampling), alone)
    assert engine.cache.pool.num_blocks == 5
    assert min(free for free, _, _ in assignments) == 0  # two requests' blocks at once, no more
    assert engine.cache.pool.free_count == 4


def test_auto_rows_are_what_the_pool_holds(gqa, tokenizer, monkeypatch):
    prompts = random_prompts(LENGTHS, seed=7)
    _card(monkeypatch, gqa, 7)
    engine = FastEngine(gqa, tokenizer, _policy("h2o"), None, prefill_tokens=4096, gpu_memory_fraction=1.0)
    engine.run(prompts, [Sampling(max_new_tokens=3)] * len(prompts))
    assert engine.cache.batch == 3  # 6 free blocks, 2 per request


def test_a_pool_too_small_for_one_request_names_the_flag_and_the_sizes(gqa, tokenizer, monkeypatch):
    _card(monkeypatch, gqa, 2)  # the null block and one more: a request needs 2
    engine = FastEngine(gqa, tokenizer, _policy("h2o"), 4, prefill_tokens=4096, gpu_memory_fraction=1.0)
    with pytest.raises(ValueError) as error:
        engine.run(random_prompts([101], seed=7), [Sampling(max_new_tokens=3)])
    message = str(error.value)
    assert "\n" not in message and message.startswith("--gpu_memory_fraction 1.0")
    assert "holds 1 blocks of" in message and "one request needs 2" in message


def test_the_measured_activations_come_out_of_the_pool(gqa, tokenizer, monkeypatch):
    prompts = random_prompts(LENGTHS, seed=7)
    sampling = [Sampling(max_new_tokens=3)] * len(prompts)
    _, per_block = _card(monkeypatch, gqa, 10)
    engine = FastEngine(gqa, tokenizer, _policy("h2o"), None, prefill_tokens=4096, gpu_memory_fraction=1.0)
    engine.run(prompts, sampling)
    assert engine.cache.batch == 4 and engine.slice_tokens == 4096  # 9 free blocks, 2 a request
    # A prefill token costing so much that the share a slice may take holds 202 tokens (two of
    # these prompts): a fifth of the card goes to it, and the pool keeps 8 blocks: 3 requests.
    total, _ = _card(monkeypatch, gqa, 10)
    per_token = fast_engine.PREFILL_SHARE * total / (202 * fast_engine.ACTIVATION_MARGIN)
    _card(monkeypatch, gqa, 10, (per_token, 0.0))
    engine.run(prompts, sampling)
    assert engine.slice_tokens == 202 and engine.cache.batch == 3
    # A decoding row as costly as the smallest request's two blocks: each block costs twice, 5
    # fit (the null block and 2 requests).
    _card(monkeypatch, gqa, 10, (0.0, 2 * per_block / fast_engine.ACTIVATION_MARGIN))
    engine.run(prompts, sampling)
    assert engine.cache.batch == 2


def _out_of_memory_when(monkeypatch, model, strikes):
    """Make `model`'s forward raise CUDA's out-of-memory error on the calls where `strikes(rows,
    tokens)` says so, as another process taking the card's memory would."""
    forward = model.forward

    def limited(input_ids=None, **kwargs):
        if strikes(*input_ids.shape):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", limited)


@pytest.mark.parametrize("policy", ["full", "h2o"])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_out_of_memory_backs_off_and_gives_every_request_its_result(gqa, tokenizer, monkeypatch, caplog, policy,
                                                                     where):
    prompts = random_prompts(LENGTHS, seed=8)
    sampling = _sampling(len(prompts))
    alone = _reference(gqa, tokenizer, prompts, sampling, _policy(policy), batch=1)
    monkeypatch.setattr(fast_engine, "GROW_AFTER", 1)
    calls, struck = {"prefill": 0, "decode": 0}, []

    def strikes(rows, tokens):
        kind = "decode" if tokens == 1 else "prefill"
        calls[kind] += 1
        # Once: the first prefill of more than one prompt, or the fourth decode step.
        strike = not struck and kind == where and (rows > 1 if kind == "prefill" else calls[kind] == 4)
        struck.extend([True] * strike)
        return strike

    _out_of_memory_when(monkeypatch, gqa, strikes)
    engine = FastEngine(gqa, tokenizer, _policy(policy), 4, steps_per_check=4)
    with caplog.at_level("WARNING"):
        done = engine.run(prompts, sampling)
    _assert_same(done, alone)
    assert engine.stats["backoffs"] == 1 and caplog.text.count(f"out of memory in a {where}") == 1
    if where == "prefill":  # later slices and admissions shrank, then grew back
        assert "at most 2 taking requests" in caplog.text
        assert engine.row_cap == 4 and engine.slice_tokens == engine.full_slice
    else:  # the rows' own memory: the engine goes on with half of them
        assert engine.cache.batch == 2 and "2 rows" in caplog.text
    assert engine.cache.pool.free_count == engine.cache.pool.num_blocks - 1  # none leaked


def test_out_of_memory_for_one_request_alone_is_raised(gqa, tokenizer, monkeypatch):
    _out_of_memory_when(monkeypatch, gqa, lambda rows, tokens: True)
    engine = FastEngine(gqa, tokenizer, _policy("h2o"), 4, steps_per_check=4)
    with pytest.raises(torch.OutOfMemoryError):
        engine.run(random_prompts(LENGTHS, seed=8), _sampling(len(LENGTHS)))


def test_the_card_memory_is_what_the_per_process_cap_leaves(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 0.25)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    # A 20 GiB cap of which this process holds 3: 17 free, though the card has 70.
    assert fast_engine.card_memory(torch.device("cuda")) == (17 * gib, 20 * gib)
    assert fast_engine.card_memory(torch.device("cpu")) is None
