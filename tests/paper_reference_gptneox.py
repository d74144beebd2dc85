"""An independent re-statement of the paper's GPT-NeoX code (FMInference/H2O,
h2o_hf/utils_hh/modify_gptneox.py, `GPTNeoXAttention_Mask`) with the GPT-NeoX model of the
transformers it ran on, for greedy decoding of one prompt; used only to check mask mode against
it. It reads the weights of a transformers `GPTNeoXForCausalLM` and runs none of its code, nor any
of h2o's.

The paper's GPT-NeoX file, as restated here (where it differs from its LLaMA file,
`paper_reference.py`):

- one fused query/key/value projection, split per head as [query | key | value];
- rotary embedding on the first int(head_size * rotary_pct) dimensions of queries and keys only
  (cos and sin tabulated in float32 for every position, cast to the model's dtype);
- q.k is `baddbmm(zeros, q, k^T, beta=1, alpha=1 / norm_factor)` over (sequence x head, rows,
  keys), norm_factor = sqrt(head_size) computed in float32: one multiply by a float32 reciprocal
  inside the matrix product (LLaMA divides the product by sqrt(head_dim) afterwards);
- the causal mask is a `torch.where` to exactly the dtype's minimum, then the model's additive
  padding mask, (1 - attention_mask) * minimum, is added (zero here: one prompt, no padding);
  then the next-step mask m, shaped (1, heads, 1, keys + 1): scores * m + (1 - m) * minimum;
- softmax in the scores' own dtype (no float32 upcast for float16), then cast to the values' dtype;
- scores: the probabilities summed over the batch and the query rows, in that dtype; a batch of
  one is asserted, as in the LLaMA file;
- the state logic is LLaMA's, line for line, including a recent budget of 0 (the mask starts all
  zero, the heavy top-k runs over every existing column, the coming token is masked from itself,
  and `score_mask[:, -0:] = 1` keeps every score).

The model around it, as transformers 4.2x built GPT-NeoX: embeddings, blocks of
x + attention(LayerNorm(x)) + MLP(LayerNorm(x)) (parallel residual; sequential where the config
says so), a final LayerNorm and the output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from paper_reference_opt import greedy

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class NeoXPaperLayer:
    """One layer's weights and the paper's per-layer H2O state."""

    def __init__(self, weights: dict, prefix: str, config, heavy_ratio: float | None, recent_ratio: float | None):
        self.w = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
        self.heads = config.num_attention_heads
        self.head_size = config.hidden_size // self.heads
        rotary_pct = config.rope_parameters.get("partial_rotary_factor", 1.0)
        self.rotary_ndims = int(self.head_size * rotary_pct)
        self.eps = config.layer_norm_eps
        self.norm_factor = torch.sqrt(torch.tensor(self.head_size, dtype=torch.float32)).to(torch.get_default_dtype())
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.enabled = heavy_ratio is not None
        self.masks_next = None
        self.previous_scores = None
        self.past = None

    def linear(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], eps=self.eps)

    def attention(self, hidden, cos, sin, positions, padding_mask) -> torch.Tensor:
        hs, rot = self.head_size, self.rotary_ndims
        qkv = self.linear(hidden, "attention.query_key_value")
        qkv = qkv.view(*qkv.shape[:-1], self.heads, 3 * hs)
        query = qkv[..., :hs].permute(0, 2, 1, 3)
        key = qkv[..., hs: 2 * hs].permute(0, 2, 1, 3)
        value = qkv[..., 2 * hs:].permute(0, 2, 1, 3)

        cos = cos.to(hidden.dtype)[positions].unsqueeze(1)
        sin = sin.to(hidden.dtype)[positions].unsqueeze(1)
        q_rot, q_pass = query[..., :rot], query[..., rot:]
        k_rot, k_pass = key[..., :rot], key[..., rot:]
        query = torch.cat(((q_rot * cos) + (rotate_half(q_rot) * sin), q_pass), dim=-1)
        key = torch.cat(((k_rot * cos) + (rotate_half(k_rot) * sin), k_pass), dim=-1)
        if self.past is not None:
            key = torch.cat((self.past[0], key), dim=-2)
            value = torch.cat((self.past[1], value), dim=-2)
        self.past = (key, value)

        out = self._attn(query, key, value, padding_mask)
        out = out.permute(0, 2, 1, 3).contiguous()
        out = out.view(out.size(0), out.size(1), self.heads * hs)
        return self.linear(out, "attention.dense")

    def _attn(self, query, key, value, padding_mask):
        batch, heads, q_len, hs = query.size()
        k_len = key.size(-2)
        causal = torch.tril(torch.ones(k_len, k_len, dtype=torch.bool))[None, None, k_len - q_len: k_len, :k_len]
        query = query.view(batch * heads, q_len, hs)
        key = key.view(batch * heads, k_len, hs)
        scores = torch.zeros(batch * heads, q_len, k_len, dtype=query.dtype)
        alpha = torch.tensor(1.0, dtype=self.norm_factor.dtype) / self.norm_factor
        scores = torch.baddbmm(scores, query, key.transpose(1, 2), beta=1.0, alpha=alpha)
        scores = scores.view(batch, heads, q_len, k_len)
        minimum = torch.finfo(scores.dtype).min
        scores = torch.where(causal, scores, torch.tensor(minimum, dtype=scores.dtype))
        scores = scores + padding_mask
        if self.masks_next is not None:
            scores = scores * self.masks_next + (1 - self.masks_next) * minimum
        probs = F.softmax(scores, dim=-1).to(value.dtype)
        if self.enabled:
            self._update(probs)
        return torch.matmul(probs, value)

    def _update(self, probs: torch.Tensor) -> None:
        current = probs.sum(0).sum(1)  # (heads, keys)
        if self.previous_scores is not None:
            current[:, :-1] += self.previous_scores
        else:
            self.heavy = int(self.heavy_ratio * current.shape[-1])
            self.recent = int(self.recent_ratio * current.shape[-1])
            self.budget = self.heavy + self.recent
        assert probs.shape[0] == 1
        self.previous_scores = current
        mask = torch.ones(current.shape[0], current.shape[1] + 1).to(probs.dtype)
        if current.shape[-1] > self.budget:
            if self.recent != 0:
                mask[:, : -self.recent] = 0
                candidates = self.previous_scores[:, : -self.recent]
            else:
                mask[:, :] = 0
                candidates = self.previous_scores
            if self.heavy != 0:
                keep = candidates.topk(k=self.heavy, dim=-1, largest=True).indices
                mask = mask.scatter(-1, keep, 1)
        self.masks_next = mask.clone().unsqueeze(0).unsqueeze(2)
        score_mask = mask[:, :-1]
        score_mask[:, -self.recent:] = 1
        self.previous_scores = self.previous_scores * score_mask


class NeoXPaperModel:
    """A GPT-NeoX model from a transformers model's weights."""

    def __init__(self, model, heavy_ratio: float | None, recent_ratio: float | None) -> None:
        c = model.config
        self.w = {name: t.detach() for name, t in model.state_dict().items()}
        self.parallel = c.use_parallel_residual
        self.eps = c.layer_norm_eps
        self.activation = ACTIVATIONS[c.hidden_act]
        self.layers = [NeoXPaperLayer(self.w, f"gpt_neox.layers.{i}.", c, heavy_ratio, recent_ratio)
                       for i in range(c.num_hidden_layers)]
        # The rotary table, as the paper's transformers cached it: every position, in float32.
        dim = self.layers[0].rotary_ndims
        base = c.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        t = torch.arange(c.max_position_embeddings, dtype=inv_freq.dtype)
        emb = torch.cat((torch.einsum("i,j->ij", t, inv_freq),) * 2, dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()
        self.seen = 0

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits of the last position after feeding `ids` (the prompt, then one token at a time)."""
        n, past = len(ids), self.seen
        self.seen += n
        hidden = F.embedding(torch.tensor([ids]), self.w["gpt_neox.embed_in.weight"])
        positions = torch.arange(past, past + n)[None]
        attention_mask = torch.ones(1, past + n)[:, None, None, :].to(hidden.dtype)
        padding_mask = (1.0 - attention_mask) * torch.finfo(hidden.dtype).min
        for layer in self.layers:
            attended = layer.attention(layer.norm(hidden, "input_layernorm"), self.cos, self.sin, positions,
                                       padding_mask)
            if self.parallel:
                mlp = self._mlp(layer, layer.norm(hidden, "post_attention_layernorm"))
                hidden = mlp + attended + hidden
            else:
                attended = attended + hidden
                hidden = self._mlp(layer, layer.norm(attended, "post_attention_layernorm")) + attended
        w = self.w
        hidden = F.layer_norm(hidden, hidden.shape[-1:], w["gpt_neox.final_layer_norm.weight"],
                              w["gpt_neox.final_layer_norm.bias"], eps=self.eps)
        return F.linear(hidden, w["lm_head.weight"])[0, -1]

    def _mlp(self, layer: NeoXPaperLayer, x: torch.Tensor) -> torch.Tensor:
        return layer.linear(self.activation(layer.linear(x, "mlp.dense_h_to_4h")), "mlp.dense_4h_to_h")


@torch.inference_mode()
def paper_greedy_gptneox(model, prompt: list[int], new_tokens: int, heavy_ratio: float | None,
                         recent_ratio: float | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the paper's simulation for one prompt, and the logits each was chosen
    from; ratios None: the full cache (no H2O state at all)."""
    return greedy(NeoXPaperModel(model, heavy_ratio, recent_ratio).forward, prompt, new_tokens)
