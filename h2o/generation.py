"""Batched autoregressive generation with a full or an evicting KV cache.

One prefill over the left-padded prompts, then one token per step for every sequence. Each
sequence has its own positions (padding never counts as a token), its own random generator
(seeded from the request, so results do not depend on batching or resuming) and its own stop
conditions. Greedy when the temperature is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from h2o.attention import ATTENTION_IMPLEMENTATIONS
from h2o.cache import EvictingCache, KVMode
from h2o.policies import Policy


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded (HELM's request fields)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int = 1
    seed: int = 0


@dataclass(frozen=True)
class Eviction:
    """A small KV cache: which policy, how it is enforced, and which attention computes it."""

    policy: Policy
    mode: KVMode = "drop"
    attention: str = "eager"


@dataclass
class Completion:
    text: str
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]
    finish_reason: str
    kv_cache: dict = field(default_factory=dict)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = logits.topk(min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the first over top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def _finish(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    logprobs: list[float],
    tops: list[dict[str, float]],
    stop: tuple[str, ...],
    reason: str,
) -> Completion:
    """Text, per-token pieces and offsets, cut at the first stop sequence."""
    pieces, offsets, text = [], [], ""
    for i in range(len(ids)):
        full = tokenizer.decode(ids[: i + 1])
        offsets.append(len(text))
        pieces.append(full[len(text):])
        text = full
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
        kept = sum(1 for o in offsets if o < cut)
        ids, pieces, offsets = ids[:kept], pieces[:kept], offsets[:kept]
        logprobs, tops = logprobs[:kept], tops[:kept]
    return Completion(text, pieces, ids, logprobs, tops, offsets, reason)


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prompts right-aligned in one (B, width) batch: token ids, which are real tokens, and
    each token's position (padding counts for nothing)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    ids, valid = ids.to(device), valid.to(device)
    return ids, valid, (valid.cumsum(-1) - 1).clamp(min=0)


class Decoder:
    """Forward passes for one batch and its KV cache: `prefill()` once, then `step(tokens)` for
    one token per sequence. Prompts are left-padded; positions count real tokens only."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], eviction: Eviction | None,
                 pad_id: int = 0) -> None:
        self.model, self.eviction = model, eviction
        device = model.device
        self.ids, self.valid, self.prompt_positions = left_pad(prompts, pad_id, device)
        self.lengths = self.valid.sum(-1)
        self.steps = 0
        config = model.config
        if eviction is None:
            self.cache = DynamicCache(config=config)
            self.attention, self.extra = "sdpa", {}
            self.mask = self.valid.long()
        else:
            self.cache = EvictingCache(
                eviction.policy, eviction.mode, config.num_hidden_layers, [len(p) for p in prompts], device
            )
            self.attention = ATTENTION_IMPLEMENTATIONS[eviction.attention]
            self.extra = {"eviction_cache": self.cache}
            self.mask = None

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, **kwargs) -> torch.Tensor:
        self.model.set_attn_implementation(self.attention)
        if self.eviction is not None:
            self.cache.begin(positions, valid)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, cache=self.cache,
                         use_cache=True, **self.extra, **kwargs)
        return out.logits[:, -1].float()

    def prefill(self) -> torch.Tensor:
        """Next-token logits after each prompt, (B, vocab)."""
        return self._forward(self.ids, self.prompt_positions, self.valid, logits_to_keep=1)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence, (B,); next-token logits, (B, vocab)."""
        ids = tokens.to(self.model.device)[:, None]
        positions = (self.lengths + self.steps)[:, None]
        self.steps += 1
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=-1)
        return self._forward(ids, positions, torch.ones_like(ids, dtype=torch.bool))


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    sampling: list[Sampling],
    eviction: Eviction | None = None,
) -> list[Completion]:
    """Generate one completion per prompt (token ids, no padding), all in one batch."""
    if len(prompts) != len(sampling):
        raise ValueError("one Sampling per prompt")
    batch = len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    decoder = Decoder(model, prompts, eviction, pad)
    logits = decoder.prefill()

    eos = _eos_ids(model, tokenizer)
    generators = [torch.Generator().manual_seed(s.seed) for s in sampling]
    out_ids: list[list[int]] = [[] for _ in prompts]
    out_logprobs: list[list[float]] = [[] for _ in prompts]
    out_tops: list[list[dict[str, float]]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * batch
    steps = max(s.max_new_tokens for s in sampling)

    for step in range(steps):
        logprobs = logits.log_softmax(-1)
        next_ids = torch.zeros(batch, dtype=torch.long)
        for row in range(batch):
            if reasons[row] is not None:
                continue
            token = _choose(logits[row], sampling[row], generators[row])
            next_ids[row] = token
            if token in eos:
                reasons[row] = "endoftext"
                continue
            out_ids[row].append(token)
            out_logprobs[row].append(float(logprobs[row, token]))
            top = logprobs[row].topk(max(1, sampling[row].top_logprobs))
            out_tops[row].append(
                {tokenizer.decode([i]): float(v) for v, i in zip(top.values.tolist(), top.indices.tolist())}
            )
            stop = sampling[row].stop
            if stop and any(s in tokenizer.decode(out_ids[row]) for s in stop):
                reasons[row] = "stop"
            elif len(out_ids[row]) >= sampling[row].max_new_tokens:
                reasons[row] = "length"
        if all(r is not None for r in reasons) or step == steps - 1:
            break
        logits = decoder.step(next_ids)

    completions = []
    for row in range(batch):
        done = _finish(tokenizer, out_ids[row], out_logprobs[row], out_tops[row],
                       sampling[row].stop, reasons[row] or "length")
        done.kv_cache = _kv_report(model, decoder.cache, eviction, row, len(prompts[row]), len(out_ids[row]))
        completions.append(done)
    return completions


def _kv_report(model, cache, eviction: Eviction | None, row: int, prompt_len: int, generated: int) -> dict:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    slot_bytes = 2 * head_dim * model.dtype.itemsize
    per_token = config.num_hidden_layers * config.num_key_value_heads * slot_bytes
    # The last token's key and value are never written: a full cache peaks one short of the end.
    full = (prompt_len + max(0, generated - 1)) * per_token
    if eviction is None:
        return {"policy": "full", "mode": "full", "prompt_tokens": prompt_len,
                "kv_bytes_peak": full, "kv_bytes_full": full}
    budget = cache.budgets[row]
    return {
        "policy": eviction.policy.name,
        "mode": eviction.mode,
        "heavy_ratio": eviction.policy.heavy_ratio,
        "recent_ratio": eviction.policy.recent_ratio,
        "heavy_budget": budget.heavy,
        "recent_budget": budget.recent,
        "prompt_tokens": prompt_len,
        "kv_bytes_peak": cache.peak_bytes()[row],
        "kv_bytes_full": full,
    }
