"""An independent, plain re-statement of H2O (and TOVA) decoding for one prompt, sharing no code
with h2o.engine.reference.attention, h2o.engine.reference.evicting_cache or h2o.policies: its own LLaMA forward pass (embedding, RMSNorm,
rotary embedding, grouped attention, SwiGLU MLP, lm_head) from a transformers LlamaForCausalLM's
weights, and per layer and KV head a plain dict of accumulated scores and a set of live tokens.

- budgets from the prompt length n: heavy = int(heavy_ratio * n), recent = max(1, int(recent_ratio * n));
- after every forward pass (the prefill included) each attended token's score grows by the
  softmax attention it received, summed over the pass's query rows and over the query heads
  that share its KV head;
- once t tokens are seen and t > heavy + recent, the next pass attends to the window (the
  tokens at positions >= t + 1 - recent, and the coming token) plus the `heavy` live tokens of
  highest score before position t - recent; the token at t - recent, just out of the window,
  sits out that pass but keeps its score and competes again next time; everything else is
  gone for good.
- TOVA: the newest query row's attention alone (summed over the KV head's query heads), a total
  budget of max(1, int((heavy_ratio + recent_ratio) * n)) of which one recent token, nothing parked.
"""

from __future__ import annotations

import math

import torch


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


@torch.no_grad()
def teacher_forced(plain: PlainLlama, prompt: list[int], continuation: list[int],
                   budget: tuple[int, int] | None, policy: str = "h2o") -> torch.Tensor:
    """Next-token logits along `continuation` fed token by token, (len(continuation), vocab):
    row i predicts continuation[i]. `budget` (heavy, recent); None keeps everything."""
    heavy, recent = budget if budget is not None else (1 << 40, 1 << 40)
    state = OracleState(plain, heavy, recent, policy)
    rows = [state.forward(prompt, list(range(len(prompt))))]
    for i, token in enumerate(continuation[:-1]):
        rows.append(state.forward([token], [len(prompt) + i]))
    return torch.stack(rows)
