"""a2sf, keydiff, h2o-vnorm, expected-attention and h2o-keydiff: each against its published rule restated as a
plain oracle (on hand-made inputs, then on the prompt's eviction against transformers' own
attention, keys, values and queries); drop, mask, batch and alone, and the fast engine alike;
budgets held exactly; their knobs through run_helm.py and the sweep."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts
from h2o.engine.fast import FastCache
from h2o.engine.reference.generation import Decoder, Eviction, Sampling, generate
from h2o.lab.points import Point, policy_spec
from h2o.policies import Budget, Observation, ValueNormed, make_policy
from h2o.policies.tova import TOVA
from h2o.serve.cli import main
from test_fast_policies_and_slicing import _fast, _reference

NEW = ("a2sf", "keydiff", "h2o-vnorm", "expected-attention", "h2o-keydiff")


def _kept(policy, scores, n_tokens, budget):
    positions = torch.arange(len(scores)).view(1, 1, -1)
    scores = torch.as_tensor(scores, dtype=torch.float32).view(1, 1, -1)
    chosen = policy.select(scores, torch.ones_like(scores), positions, torch.tensor([n_tokens]),
                           torch.tensor([budget.heavy]), torch.tensor([budget.recent]))
    return chosen.active[0, 0].nonzero().flatten().tolist()


def _causal_attention(n: int, seed: int) -> torch.Tensor:
    """(n, n) rows of a random causal softmax: row j is query j's attention over tokens 0..j."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, n, generator=g) * 3
    return logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


# --- a2sf -------------------------------------------------------------------------------------

def a2sf_oracle(attention: torch.Tensor, factor: float) -> torch.Tensor:
    """A2SF's score after the last query row: sum over rows j of factor^(last - j) x attention."""
    n = attention.shape[0]
    return sum(factor ** (n - 1 - j) * attention[j] for j in range(n))


def test_a2sf_forgets_old_attention_by_its_factor_in_the_prompt_and_while_decoding():
    policy = make_policy("a2sf", 0.2, 0.2, forgetting_factor=0.5)
    attention = _causal_attention(12, seed=1)
    prompt = 8  # rows 0-7 in one pass, then four decode steps of one row each
    weights = policy.row_weights(torch.arange(prompt - 1, -1, -1)[None])
    assert torch.allclose(weights, 0.5 ** torch.arange(prompt - 1, -1, -1.0)[None])
    one = lambda mass: Observation(received=mass.view(1, 1, -1), newest=mass.view(1, 1, -1),
                                   seen=torch.ones(1, 1, 12))
    scores = policy.accumulate(torch.zeros(1, 1, 12), one(weights[0] @ attention[:prompt]))
    torch.testing.assert_close(scores[0, 0], a2sf_oracle(attention[:prompt], 0.5))
    for row in range(prompt, 12):
        scores = policy.accumulate(scores, one(attention[row]))
    torch.testing.assert_close(scores[0, 0], a2sf_oracle(attention, 0.5))
    # Recent attention outweighs old: rows 0-3 attend to token 0 alone, rows 6-9 half to token 6.
    rows = torch.zeros(10, 10)
    rows[:4, 0] = 1.0
    rows[6:, 6] = 0.5
    rows[6:, 7] = 0.5
    budget = Budget(heavy=1, recent=3)
    assert _kept(policy, a2sf_oracle(rows, 0.5), 10, budget) == [6, 8, 9]
    assert _kept(make_policy("h2o", 0.2, 0.2), rows.sum(0), 10, budget) == [0, 8, 9]
    assert make_policy("a2sf", 0.1, 0.1).forgetting_factor == 0.1  # the authors' default


def test_a2sf_at_factor_one_is_h2o_and_below_it_differs(gqa, tokenizer):
    prompts = random_prompts([64, 101], seed=5)
    h2o = _reference(gqa, tokenizer, prompts, make_policy("h2o", 0.1, 0.1))
    assert _reference(gqa, tokenizer, prompts, make_policy("a2sf", 0.1, 0.1, forgetting_factor=1.0)) == h2o
    assert _reference(gqa, tokenizer, prompts, make_policy("a2sf", 0.1, 0.1)) != h2o


# --- keydiff ----------------------------------------------------------------------------------

def keydiff_oracle(keys: torch.Tensor) -> torch.Tensor:
    """kvpress's KeyDiffPress: minus the cosine similarity to the mean of the unit keys (S, D)."""
    anchor = F.normalize(keys, dim=-1).mean(0, keepdim=True)
    return -F.cosine_similarity(keys, anchor, dim=-1)


def test_keydiff_keeps_the_keys_least_like_the_mean_key():
    policy = make_policy("keydiff", 0.2, 0.2)
    g = torch.Generator().manual_seed(2)
    keys = torch.tensor([1.0, 0.2]) + 0.1 * torch.randn(10, 2, generator=g)
    keys[3] = torch.tensor([-1.0, 0.5])  # points away from the rest
    keys[5] = torch.tensor([0.3, 1.0])
    keys[1] = 5 * keys[1]  # the norm does not matter
    seen = torch.ones(1, 1, 10)
    observed = Observation(received=seen, newest=seen, seen=seen, keys=keys[None, None])
    scores = policy.accumulate(torch.zeros(1, 1, 10), observed)
    torch.testing.assert_close(scores[0, 0], 2 + keydiff_oracle(keys))
    budget = policy.budget(10)
    oracle = keydiff_oracle(keys)[: 10 + 1 - budget.recent].topk(budget.heavy).indices.tolist()
    assert sorted(oracle) == [3, 5]
    assert _kept(policy, scores[0, 0], 10, budget) == [3, 5, 9]
    # A slot no query sees (evicted in mask mode) is out of the anchor and never comes back.
    seen[..., 3] = 0
    masked = policy.accumulate(torch.zeros(1, 1, 10), Observation(received=seen, newest=seen, seen=seen,
                                                                  keys=keys[None, None]))
    rest = torch.cat([keys[:3], keys[4:]])
    torch.testing.assert_close(torch.cat([masked[0, 0, :3], masked[0, 0, 4:]]), 2 + keydiff_oracle(rest))
    assert masked[0, 0, 3] == 0


# --- value norms ------------------------------------------------------------------------------

class TOVAValueNorm(ValueNormed, TOVA):
    name = "tova-vnorm"


def test_the_value_norm_wrapper_weights_any_attention_scorer():
    g = torch.Generator().manual_seed(3)
    values = torch.randn(1, 1, 6, 4, generator=g)
    received, newest = torch.rand(1, 1, 6, generator=g), torch.rand(1, 1, 6, generator=g)
    observed = Observation(received=received, newest=newest, seen=torch.ones(1, 1, 6), values=values)
    l1 = values.abs().sum(-1)
    old = torch.rand(1, 1, 6, generator=g)
    # VATP: accumulated attention times the value's L1 norm; H2O's running sum keeps the product.
    h2o = make_policy("h2o-vnorm", 0.2, 0.2)
    torch.testing.assert_close(h2o.accumulate(old * l1, observed), (old + received) * l1)
    tova = TOVAValueNorm(0.2, 0.2)
    torch.testing.assert_close(tova.accumulate(old, observed), newest * l1)
    assert h2o.budget(100) == make_policy("h2o", 0.2, 0.2).budget(100) and h2o.parks_leaving_token
    assert h2o.uses_base_selection() and tova.uses_base_selection()


def test_h2o_keydiff_weights_each_passes_attention_by_the_keys_distance_from_the_mean():
    g = torch.Generator().manual_seed(9)
    policy = make_policy("h2o-keydiff", 0.2, 0.2)
    seen = torch.ones(1, 1, 6)
    scores = torch.zeros(1, 1, 6)
    expected = torch.zeros(6)
    for _ in range(3):  # the anchor moves with the keys, pass by pass
        keys, received = torch.randn(1, 1, 6, 4, generator=g), torch.rand(1, 1, 6, generator=g)
        scores = policy.accumulate(scores, Observation(received=received, newest=received, seen=seen, keys=keys))
        expected += received[0, 0] * (1 + keydiff_oracle(keys[0, 0]))
    torch.testing.assert_close(scores[0, 0], expected)
    assert policy.parks_leaving_token and policy.budget(50) == make_policy("h2o", 0.2, 0.2).budget(50)


# --- expected attention -----------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)


def expected_attention_oracle(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cos: torch.Tensor,
                              sin: torch.Tensor, epsilon: float, sinks: int = 4) -> torch.Tensor:
    """kvpress's ExpectedAttentionPress.score, restated for one sequence: queries (Hq, n, D) before
    RoPE, keys and values (Hkv, n, D) as cached, cos and sin (future, D) of the coming positions.
    The sinks get the top score."""
    hq, hkv, d = queries.shape[0], keys.shape[0], keys.shape[-1]
    q = queries[:, sinks:]
    mean = q.mean(1)
    centered = q - mean[:, None]
    cov = centered.transpose(1, 2) @ centered / q.shape[1]
    turn = torch.stack([rotate_half(e) for e in torch.eye(d)], 1)  # turn @ x == rotate_half(x)
    rotation = torch.stack([torch.diag(c) + torch.diag(s) @ turn for c, s in zip(cos, sin)]).mean(0)
    mean, cov = mean @ rotation.T, rotation @ cov @ rotation.T
    k, v = keys[:, sinks:], values[:, sinks:]
    scores = []
    for head in range(hq):
        kv = head // (hq // hkv)
        exponent = k[kv] @ mean[head] / math.sqrt(d) + torch.einsum("si,ij,sj->s", k[kv], cov[head], k[kv]) / d / 2
        scores.append(exponent.softmax(-1))
    scores = torch.stack(scores).view(hkv, hq // hkv, -1).mean(1)
    scores = (scores + epsilon) * v.norm(dim=-1)
    return F.pad(scores, (sinks, 0), value=scores.max().item() + 1)


def test_expected_attention_scores_as_kvpress_on_hand_made_statistics():
    policy = make_policy("expected-attention", 0.2, 0.2, epsilon=0.02)
    g = torch.Generator().manual_seed(4)
    n, d = 12, 4
    keys, values = torch.randn(1, 1, n, d, generator=g), torch.randn(1, 1, n, d, generator=g)
    mean = torch.randn(1, 2, d, generator=g)
    a = torch.randn(2, d, d, generator=g)
    cov = (a @ a.transpose(1, 2) / d)[None]
    positions = torch.arange(n).view(1, 1, -1)
    observed = Observation(received=torch.zeros(1, 1, n), newest=torch.zeros(1, 1, n), seen=torch.ones(1, 1, n),
                           positions=positions, keys=keys, values=values, query_mean=mean, query_cov=cov)
    scores = policy.accumulate(torch.zeros(1, 1, n), observed)
    # kvpress's score on statistics already rotated: the policy only scores.
    k = keys[0, 0, 4:]
    expected = []
    for head in range(2):
        exponent = k @ mean[0, head] / math.sqrt(d) + torch.einsum("si,ij,sj->s", k, cov[0, head], k) / d / 2
        expected.append(exponent.softmax(-1))
    expected = (torch.stack(expected).mean(0) + 0.02) * values[0, 0, 4:].norm(dim=-1)
    torch.testing.assert_close(scores[0, 0, 4:], 2 * expected)  # the sum over the two query heads
    ranked = policy.rank(scores, torch.ones_like(scores), positions)
    assert ranked[0, 0, :4].min() > ranked[0, 0, 4:].max()  # the sinks always stay
    budget = policy.budget(n)
    assert budget == Budget(heavy=2, recent=2)
    # Decoding adds each query's attention times the value's norm.
    decoded = policy.accumulate(scores, Observation(received=torch.ones(1, 1, n), newest=torch.ones(1, 1, n),
                                                    seen=torch.ones(1, 1, n), keys=keys, values=values))
    torch.testing.assert_close(decoded, scores + values.norm(dim=-1))
    for bad in (-0.01, float("nan")):
        with pytest.raises(ValueError, match="--epsilon must be >= 0"):
            make_policy("expected-attention", 0.1, 0.1, epsilon=bad)
    assert make_policy("expected-attention", 0.1, 0.1).epsilon == 0.01


# --- the prompt's eviction against transformers' own tensors --------------------------------------

def _transformers_tensors(model, prompt):
    """Per layer: the attention (Hq, n, n), keys and values as cached (Hkv, n, D), and the queries
    before RoPE (Hq, n, D), all from transformers' own eager forward pass."""
    model.set_attn_implementation("eager")
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True, use_cache=True)
        layers = []
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            hidden = layer.input_layernorm(out.hidden_states[i])
            queries = attn.q_proj(hidden).view(1, len(prompt), -1, attn.head_dim).transpose(1, 2)
            cached = out.past_key_values.layers[i]
            layers.append((out.attentions[i][0], cached.keys[0].float(), cached.values[0].float(), queries[0]))
    return layers


def _oracle_kept(scores: torch.Tensor, n: int, budget: Budget, parks: bool) -> list[list[int]]:
    """Per KV head: the window (the newest recent - 1 tokens), and the top heavy scores of the tokens
    before it (before the parked one too, for a policy that parks it)."""
    candidates = n - budget.recent if parks else n + 1 - budget.recent
    return [sorted(head[:candidates].topk(budget.heavy).indices.tolist() + list(range(n + 1 - budget.recent, n)))
            for head in scores]


@pytest.mark.parametrize("name", NEW)
def test_the_prompts_eviction_is_the_papers_rule_on_transformers_tensors(gqa, name):
    prompt = random_prompts([120], seed=33)[0]
    n = len(prompt)
    # No epsilon here: at 1/n per token's attention, 0.01 would rank mostly by the values' norms.
    policy = make_policy(name, 0.1, 0.1, **({"epsilon": 0.0} if name == "expected-attention" else {}))
    decoder = Decoder(gqa, [prompt], Eviction(policy, "drop"))
    decoder.prefill()
    budget = policy.budget(n)
    hkv = gqa.config.num_key_value_heads
    groups = gqa.config.num_attention_heads // hkv
    future = torch.arange(n, n + 512)[None]
    cos, sin = gqa.model.rotary_emb(torch.zeros(1), future)
    for layer, (attention, keys, values, queries) in enumerate(_transformers_tensors(gqa, prompt)):
        mass = attention.view(hkv, groups, n, n).sum(1)  # (Hkv, rows, tokens)
        if name == "a2sf":
            scores = torch.einsum("r,hrs->hs", policy.forgetting_factor ** torch.arange(n - 1, -1, -1.0), mass)
        elif name == "h2o-vnorm":
            scores = mass.sum(1) * values.abs().sum(-1)
        elif name == "keydiff":
            scores = torch.stack([keydiff_oracle(k) for k in keys])
        elif name == "h2o-keydiff":
            scores = mass.sum(1) * (1 + torch.stack([keydiff_oracle(k) for k in keys]))
        else:
            scores = expected_attention_oracle(queries.float(), keys, values, cos[0].float(), sin[0].float(),
                                               policy.epsilon)
        kept = decoder.cache.layers[layer]
        got = [sorted(kept.positions[0, h][kept.active[0, h]].tolist()) for h in range(hkv)]
        assert got == _oracle_kept(scores, n, budget, policy.parks_leaving_token), layer


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("model_name", ["mha", "gqa"])
def test_drop_mask_batch_alone_and_the_fast_engine_agree_with_budgets_held(request, tokenizer, monkeypatch,
                                                                           model_name, name):
    model = request.getfixturevalue(model_name)
    prompts = random_prompts([64, 101, 47], seed=70)
    policy = make_policy(name, 0.1, 0.1)
    drop = _reference(model, tokenizer, prompts, policy, "drop")
    assert _reference(model, tokenizer, prompts, policy, "mask") == drop
    assert [_reference(model, tokenizer, [p], policy, "drop")[0] for p in prompts] == drop
    held = {}
    release = FastCache.release

    def spy(self, row):
        held[row] = [(layer.view()["positions"][row] >= 0).sum(-1).tolist() for layer in self.layers]
        release(self, row)

    monkeypatch.setattr(FastCache, "release", spy)
    assert _fast(model, tokenizer, prompts, policy, prefill_rows=2) == drop
    parked = 1 if policy.parks_leaving_token else 0
    heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    assert held == {row: [[policy.budget(len(p)).total - 1 + parked] * heads] * layers
                    for row, p in enumerate(prompts)}
    h2o = _reference(model, tokenizer, prompts, make_policy("h2o", 0.1, 0.1), "drop")
    assert drop != h2o


def test_expected_attention_without_rope_takes_the_queries_as_they_are():
    """A family without RoPE (OPT) has no rotation to undo or average: the statistics are the
    queries' own."""
    from h2o.engine.reference.attention import _query_statistics

    class OPTAttention(torch.nn.Module):
        pass

    g = torch.Generator().manual_seed(6)
    query = torch.randn(1, 2, 9, 4, generator=g)
    positions, valid = torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool)
    mean, cov = _query_statistics(OPTAttention(), query, positions, valid, 4, 512)
    rows = query[0, :, 4:]
    torch.testing.assert_close(mean[0], rows.mean(1))
    centered = rows - rows.mean(1, keepdim=True)
    torch.testing.assert_close(cov[0], centered.transpose(1, 2) @ centered / 5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_the_query_statistics_undo_each_rows_rope_and_average_the_coming_ones(family):
    """Against the family's own RoPE: queries rotated by transformers give back the statistics of
    the queries before it, turned by the mean rotation of the coming positions (GPT-NeoX rotates
    only its first dimensions)."""
    import importlib

    from conftest import tiny_llama
    from h2o.engine.reference.attention import _query_statistics
    from tiny_families import tiny_gpt_neox

    model = tiny_llama(kv_heads=2) if family == "llama" else tiny_gpt_neox()
    inner = model.model if family == "llama" else model.gpt_neox
    attention = inner.layers[0].self_attn if family == "llama" else inner.layers[0].attention
    rope = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    g = torch.Generator().manual_seed(8)
    d = model.config.hidden_size // model.config.num_attention_heads
    before = torch.randn(1, 4, 9, d, generator=g)
    positions = torch.arange(9)[None]
    cos, sin = inner.rotary_emb(before, positions)
    after = rope(before, before, cos, sin)[0]
    mean, cov = _query_statistics(attention, after, positions, torch.ones(1, 9, dtype=torch.bool), 2, 16)
    rows = before[0, :, 2:]
    centered = rows - rows.mean(1, keepdim=True)
    cos, sin = inner.rotary_emb(before, torch.arange(9, 25)[None])
    rot = cos.shape[-1]
    turn = torch.stack([rotate_half(e) for e in torch.eye(rot)], 1)
    rotation = torch.eye(d)
    rotation[:rot, :rot] = torch.stack([torch.diag(c) + torch.diag(s) @ turn for c, s in zip(cos[0], sin[0])]).mean(0)
    assert (rot < d) == (family == "gpt_neox")
    torch.testing.assert_close(mean[0], rows.mean(1) @ rotation.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cov[0], rotation @ (centered.transpose(1, 2) @ centered / 7) @ rotation.T,
                               rtol=1e-4, atol=1e-5)


# --- knobs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--forgetting_factor", "0", "--forgetting_factor must lie in (0, 1], got 0.0"),
    ("--forgetting_factor", "1.5", "--forgetting_factor must lie in (0, 1], got 1.5"),
    ("--epsilon", "-0.1", "--epsilon must be >= 0, got -0.1"),
])
def test_a_bad_knob_is_one_line_and_exit_2_before_any_weights_load(tmp_path, capsys, flag, value, message):
    policy = "a2sf" if flag == "--forgetting_factor" else "expected-attention"
    argv = ["--output_path", str(tmp_path / "x.jsonl"), "--model_name", str(tmp_path / "no-such-model"),
            "--enable_small_cache", "--policy", policy, flag, value]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"run_helm.py: error: {message}"


def test_the_knob_flags_reach_their_policies(tmp_path):
    from h2o.serve.options import ServeOptions

    base = ["--output_path", str(tmp_path / "x.jsonl"), "--enable_small_cache"]
    a2sf = ServeOptions.from_argv(base + ["--policy", "a2sf", "--forgetting_factor", "0.5"]).build_policy()
    assert a2sf.forgetting_factor == 0.5
    expected = ServeOptions.from_argv(base + ["--policy", "expected-attention", "--epsilon", "0"]).build_policy()
    assert expected.epsilon == 0.0
    assert ServeOptions.from_argv(base + ["--policy", "a2sf"]).build_policy().forgetting_factor == 0.1


def test_a_knob_for_another_policy_is_refused(tmp_path, capsys):
    argv = ["--output_path", str(tmp_path / "x.jsonl"), "--enable_small_cache", "--policy", "h2o",
            "--forgetting_factor", "0.5"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "run_helm.py: error: --forgetting_factor: only for --policy a2sf, not h2o"


def test_the_sweep_sets_the_new_knobs(tmp_path):
    from h2o.lab import sweep
    from h2o.serve.options import ServeOptions

    base = ServeOptions(str(tmp_path / "x.jsonl"))
    assert policy_spec("a2sf:0.5") == ("a2sf", 0.5) and policy_spec("expected-attention:0") == ("expected-attention", 0)
    assert Point("a2sf", 0.2, 0.5).serve_options(base).forgetting_factor == 0.5
    assert Point("expected-attention", 0.2, 0.05).eviction().policy.epsilon == 0.05
    assert Point("h2o-vnorm", 0.2).ratios() == Point("keydiff", 0.2).ratios() == (0.1, 0.1)
    with pytest.raises(ValueError, match="keydiff has no knob to set"):
        policy_spec("keydiff:1")
    assert sweep.main(["--reports", str(tmp_path), "--policies", "a2sf:2", "--budgets", "0.2"]) == 2
