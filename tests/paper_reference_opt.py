"""An independent re-statement of the paper's OPT code (FMInference/H2O,
h2o_hf/utils_hh/modify_opt.py, `OPTAttention_Mask`) with the OPT decoder of the transformers it
ran on, for greedy decoding of one prompt; used only to check mask mode against it. It reads the
weights of a transformers `OPTForCausalLM` and runs none of its code, nor any of h2o's.

The paper's OPT file, as restated here (where it differs from its LLaMA file, `paper_reference.py`):

- the query is multiplied by head_dim**-0.5 right after its projection, before q.k (LLaMA divides
  q.k by sqrt(head_dim)); q.k is one `bmm` over (sequence x head, rows, keys);
- the decoder's additive mask (dtype minimum above the diagonal in the prefill, zeros when
  decoding) is added and the sum clamped at the dtype's minimum; then the next-step mask m, one
  row per (sequence x head), shaped (heads, 1, keys + 1): weights * m + (1 - m) * minimum;
- softmax in float32 only for float16 weights (bfloat16 and float32 stay in their own dtype),
  the probabilities back in the weights' dtype;
- scores: the probabilities summed over the query rows per (sequence x head), in that dtype
  (LLaMA's file also sums over the batch and asserts a batch of one; this one does neither);
- the state logic is LLaMA's, line for line: budgets int(ratio * n) from the first pass's key
  count; once the keys outnumber heavy + recent, the next pass sees the last `recent` columns
  (the coming token's among them) plus the top `heavy` scores left of them; scores are zeroed
  outside that mask, except the last `recent` existing columns. With a recent budget of 0 the
  mask starts all zero, the heavy top-k runs over every existing column, the coming token is
  masked from itself, and `score_mask[:, -0:] = 1` keeps every score: nothing is ever zeroed.

The decoder around it, as transformers 4.2x built it for OPT: token embeddings plus learned
positions (cumsum of the attention mask - 1, offset by 2), pre-LayerNorm blocks (attention, then
fc1 / activation / fc2), a final LayerNorm, the lm_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class OPTPaperLayer:
    """One decoder layer's weights and the paper's per-layer H2O state."""

    def __init__(self, weights: dict, prefix: str, heads: int, heavy_ratio: float | None, recent_ratio: float | None):
        self.w = {name[len(prefix):]: t for name, t in weights.items() if name.startswith(prefix)}
        self.heads = heads
        self.heavy_ratio, self.recent_ratio = heavy_ratio, recent_ratio
        self.enabled = heavy_ratio is not None
        self.masks_next = None
        self.previous_scores = None
        self.past = None

    def linear(self, x, name):
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def attention(self, hidden: torch.Tensor, decoder_mask: torch.Tensor) -> torch.Tensor:
        bsz, tgt, embed = hidden.shape
        h, d = self.heads, embed // self.heads
        scaling = d**-0.5
        shape = lambda t: t.view(bsz, -1, h, d).transpose(1, 2).contiguous()  # noqa: E731

        query = self.linear(hidden, "self_attn.q_proj") * scaling
        key = shape(self.linear(hidden, "self_attn.k_proj"))
        value = shape(self.linear(hidden, "self_attn.v_proj"))
        if self.past is not None:
            key = torch.cat([self.past[0], key], dim=2)
            value = torch.cat([self.past[1], value], dim=2)
        self.past = (key, value)

        flat = (bsz * h, -1, d)
        query = shape(query).view(*flat)
        key, value = key.view(*flat), value.view(*flat)
        src = key.size(1)
        weights = torch.bmm(query, key.transpose(1, 2))
        minimum = torch.finfo(weights.dtype).min
        weights = weights.view(bsz, h, tgt, src) + decoder_mask
        weights = torch.max(weights, torch.tensor(minimum))
        weights = weights.view(bsz * h, tgt, src)
        if self.masks_next is not None:
            weights = weights * self.masks_next + (1 - self.masks_next) * minimum
        if weights.dtype == torch.float16:
            probs = F.softmax(weights, dim=-1, dtype=torch.float32).to(torch.float16)
        else:
            probs = F.softmax(weights, dim=-1)
        if self.enabled:
            self._update(probs)
        out = torch.bmm(probs, value).view(bsz, h, tgt, d).transpose(1, 2).reshape(bsz, tgt, embed)
        return self.linear(out, "self_attn.out_proj")

    def _update(self, probs: torch.Tensor) -> None:
        current = probs.sum(1)  # (sequence x head, keys)
        if self.previous_scores is not None:
            current[:, :-1] += self.previous_scores
        else:
            self.heavy = int(self.heavy_ratio * current.shape[-1])
            self.recent = int(self.recent_ratio * current.shape[-1])
            self.budget = self.heavy + self.recent
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
        self.masks_next = mask.clone().unsqueeze(1)
        score_mask = mask[:, :-1]
        score_mask[:, -self.recent:] = 1
        self.previous_scores = self.previous_scores * score_mask


class OPTPaperModel:
    """An OPT decoder (pre-LayerNorm, as every OPT but 350m) from a transformers model's weights."""

    def __init__(self, model, heavy_ratio: float | None, recent_ratio: float | None) -> None:
        c = model.config
        if not c.do_layer_norm_before or c.word_embed_proj_dim != c.hidden_size:
            raise NotImplementedError("restated for pre-LayerNorm OPT without embedding projections")
        self.w = {name: t.detach() for name, t in model.state_dict().items()}
        self.activation = ACTIVATIONS[c.activation_function]
        self.layers = [OPTPaperLayer(self.w, f"model.decoder.layers.{i}.", c.num_attention_heads, heavy_ratio,
                                     recent_ratio) for i in range(c.num_hidden_layers)]
        self.seen = 0

    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits of the last position after feeding `ids` (the prompt, then one token at a time)."""
        tgt, past = len(ids), self.seen
        self.seen += tgt
        hidden = F.embedding(torch.tensor([ids]), self.w["model.decoder.embed_tokens.weight"])
        mask = torch.ones(1, past + tgt, dtype=torch.long)
        positions = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() - 1
        hidden = hidden + F.embedding(positions[:, past:] + 2, self.w["model.decoder.embed_positions.weight"])
        minimum = torch.finfo(hidden.dtype).min
        decoder_mask = torch.zeros(tgt, past + tgt, dtype=hidden.dtype)
        if tgt > 1:
            decoder_mask = torch.full((tgt, tgt), minimum).triu(1)  # the prefill: past is 0
        for layer in self.layers:
            hidden = hidden + layer.attention(layer.norm(hidden, "self_attn_layer_norm"), decoder_mask[None, None])
            x = layer.norm(hidden, "final_layer_norm")
            x = layer.linear(self.activation(layer.linear(x, "fc1")), "fc2")
            hidden = hidden + x
        w = self.w
        hidden = F.layer_norm(hidden, hidden.shape[-1:], w["model.decoder.final_layer_norm.weight"],
                              w["model.decoder.final_layer_norm.bias"])
        return F.linear(hidden, self.w["lm_head.weight"])[0, -1]


@torch.inference_mode()
def paper_greedy_opt(model, prompt: list[int], new_tokens: int, heavy_ratio: float | None,
                     recent_ratio: float | None) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of the paper's simulation for one prompt, and the logits each was chosen
    from; ratios None: the full cache (no H2O state at all)."""
    return greedy(OPTPaperModel(model, heavy_ratio, recent_ratio).forward, prompt, new_tokens)


def greedy(forward, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding with a restatement's `forward(new ids) -> next-token logits` (it keeps its
    own cache): the tokens, and the logits each was chosen from."""
    tokens, logits, ids = [], [], prompt
    for _ in range(new_tokens):
        out = forward(ids)
        logits.append(out)
        tokens.append(int(out.argmax()))
        ids = tokens[-1:]
    return tokens, logits
