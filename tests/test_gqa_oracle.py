"""H2O decoding with grouped-query attention against an independent, plain re-statement.

The oracle below shares no code with h2o.attention, h2o.cache or h2o.policies: it runs its own
LLaMA forward pass (embedding, RMSNorm, rotary embedding, grouped attention, SwiGLU MLP, lm_head)
from the weights of a transformers LlamaForCausalLM, one prompt at a time, and keeps, per layer
and KV head, a plain dict of accumulated scores and a set of live tokens. What it restates:

- budgets from the prompt length n: heavy = int(heavy_ratio * n), recent = max(1, int(recent_ratio * n));
- after every forward pass (the prefill included) each attended token's score grows by the
  softmax attention it received, summed over the pass's query rows and over the query heads
  that share its KV head;
- once t tokens are seen and t > heavy + recent, the next pass attends to the window (the
  tokens at positions >= t + 1 - recent, and the coming token) plus the `heavy` live tokens of
  highest score before position t - recent; the token at t - recent, just out of the window,
  sits out that pass but keeps its score and competes again next time; everything else is
  gone for good.

TOVA (the newest query row's attention alone, one recent token, nothing parked) is restated
beside it, since its GQA scoring (the newest row summed over a KV head's query heads) has no
other check.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT, random_prompts, tiny_llama
from h2o.cache import EvictingCache
from h2o.fast import generate_fast
from h2o.generation import Eviction, Sampling, generate
from h2o.policies import make_policy

NEW_TOKENS = 20


class PlainLlama:
    """A LLaMA decoder from a transformers model's weights, in plain float32 torch."""

    def __init__(self, model) -> None:
        c = model.config
        assert c.hidden_act == "silu" and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False)
        rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
        assert rope.get("rope_type", "default") == "default", rope
        w = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
        self.layers = c.num_hidden_layers
        self.hq, self.hkv = c.num_attention_heads, c.num_key_value_heads
        self.d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.embed = w["model.embed_tokens.weight"]
        self.lm_head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
        self.final_norm = w["model.norm.weight"]
        self.w = [{name: w[f"model.layers.{i}.{name}.weight"] for name in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
            for i in range(self.layers)]
        self.inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, self.d, 2, dtype=torch.float32) / self.d))

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rotate(self, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """x: (heads, rows, d), rotated by each row's absolute position (the rotate-half form)."""
        angles = torch.tensor(positions, dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        half = self.d // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin


class OracleState:
    """Per layer: every key and value ever computed (by position). Per (layer, KV head): which
    tokens are attended next (`active`), which are still in memory (`live`), and their scores."""

    def __init__(self, plain: PlainLlama, heavy: int, recent: int, policy: str) -> None:
        self.plain, self.heavy, self.recent, self.policy = plain, heavy, recent, policy
        self.keys = [{} for _ in range(plain.layers)]  # position -> (hkv, d)
        self.values = [{} for _ in range(plain.layers)]
        self.active = [[set() for _ in range(plain.hkv)] for _ in range(plain.layers)]
        self.live = [[set() for _ in range(plain.hkv)] for _ in range(plain.layers)]
        self.score = [[{} for _ in range(plain.hkv)] for _ in range(plain.layers)]
        self.seen = 0

    def select(self, layer: int, head: int) -> None:
        t, heavy, recent = self.seen, self.heavy, self.recent
        live, score = self.live[layer][head], self.score[layer][head]
        if t <= heavy + recent:
            self.active[layer][head] = set(live)
            return
        window = {p for p in live if p >= t + 1 - recent}
        if self.policy == "h2o":
            parked = {t - recent} & live if heavy > 0 else set()
            candidates = [p for p in live if p < t - recent]
        else:  # tova: the leaving token competes at once
            parked = set()
            candidates = [p for p in live if p < t + 1 - recent]
        chosen = set(sorted(candidates, key=lambda p: (-score[p], p))[:heavy])
        self.active[layer][head] = window | chosen
        self.live[layer][head] = window | chosen | parked
        for p in list(score):
            if p not in self.live[layer][head]:
                del score[p]

    def forward(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """One pass over new tokens at `positions`; the last row's next-token logits."""
        plain = self.plain
        groups = plain.hq // plain.hkv
        rows = len(ids)
        x = plain.embed[torch.tensor(ids)]
        self.seen += rows
        for i, w in enumerate(plain.w):
            h = plain.norm(x, w["input_layernorm"])
            q = (h @ w["self_attn.q_proj"].T).view(rows, plain.hq, plain.d).transpose(0, 1)
            k = (h @ w["self_attn.k_proj"].T).view(rows, plain.hkv, plain.d).transpose(0, 1)
            v = (h @ w["self_attn.v_proj"].T).view(rows, plain.hkv, plain.d).transpose(0, 1)
            q, k = plain.rotate(q, positions), plain.rotate(k, positions)
            for r, p in enumerate(positions):
                self.keys[i][p], self.values[i][p] = k[:, r], v[:, r]
            out = torch.zeros(plain.hq, rows, plain.d)
            for g in range(plain.hkv):
                self.live[i][g].update(positions)
                self.active[i][g].update(positions)
                columns = sorted(self.active[i][g])
                keys = torch.stack([self.keys[i][p][g] for p in columns])
                values = torch.stack([self.values[i][p][g] for p in columns])
                future = torch.tensor(columns)[None, :] > torch.tensor(positions)[:, None]
                received = torch.zeros(len(columns), dtype=torch.float64)
                newest = torch.zeros(len(columns), dtype=torch.float64)
                for head in range(g * groups, (g + 1) * groups):  # the query heads sharing KV head g
                    logits = (q[head] @ keys.T) / math.sqrt(plain.d)
                    probs = logits.masked_fill(future, float("-inf")).softmax(-1)
                    out[head] = probs @ values
                    received += probs.double().sum(0)
                    newest += probs[-1].double()
                gained = received if self.policy == "h2o" else newest
                score = self.score[i][g]
                for p, s in zip(columns, gained.tolist()):
                    score[p] = (score.get(p, 0.0) if self.policy == "h2o" else 0.0) + s
                self.select(i, g)
            x = x + out.transpose(0, 1).reshape(rows, -1) @ w["self_attn.o_proj"].T
            h = plain.norm(x, w["post_attention_layernorm"])
            gate = h @ w["mlp.gate_proj"].T
            x = x + (gate * torch.sigmoid(gate) * (h @ w["mlp.up_proj"].T)) @ w["mlp.down_proj"].T
        return plain.norm(x[-1], plain.final_norm) @ plain.lm_head.T


def oracle_budget(policy: str, n: int, heavy_ratio: float, recent_ratio: float) -> tuple[int, int]:
    if policy == "tova":
        total = max(1, int((heavy_ratio + recent_ratio) * n))
        return total - 1, 1
    return int(heavy_ratio * n), max(1, int(recent_ratio * n))


@torch.no_grad()
def oracle_greedy(plain: PlainLlama, prompt: list[int], new_tokens: int, heavy_ratio: float,
                  recent_ratio: float, eos: set[int] = frozenset(), policy: str = "h2o") -> list[int]:
    """Greedy tokens under the restated eviction, cut before the first end-of-text token."""
    state = OracleState(plain, *oracle_budget(policy, len(prompt), heavy_ratio, recent_ratio), policy)
    logits = state.forward(prompt, list(range(len(prompt))))
    out = []
    for step in range(new_tokens):
        token = int(logits.argmax())
        if token in eos:
            break
        out.append(token)
        if step < new_tokens - 1:
            logits = state.forward([token], [len(prompt) + step])
    return out


def eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


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
def plain_models(gqa, gqa1):
    return {"gqa": (gqa, PlainLlama(gqa)), "gqa1": (gqa1, PlainLlama(gqa1))}


@pytest.mark.parametrize("model_name", ["gqa", "gqa1"])
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
@pytest.mark.parametrize("model_name", ["gqa", "gqa1"])
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
@pytest.mark.parametrize("model_name", ["gqa", "gqa1"])
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
@pytest.mark.parametrize("model_name", ["gqa", "gqa1"])
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
    from h2o.run import encode

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
