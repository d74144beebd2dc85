"""The reference engine: batched autoregressive generation with a full or an evicting KV cache.

One prefill over the left-padded prompts, then one token per step for every sequence. Each
sequence has its own positions (padding never counts as a token) and its own stop conditions;
the choice of tokens (`h2o.engine.sampling`) and the finished text (`h2o.engine.transcript`) are shared with the
fast engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.reference.attention import ATTENTION_IMPLEMENTATIONS
from h2o.engine.reference.evicting_cache import EvictingCache, KVMode
from h2o.engine.transcript import Completion, Transcript, eos_ids
from h2o.policies import Policy
from h2o.engine.sampling import Sampler, Sampling

__all__ = ["Completion", "Decoder", "Eviction", "Sampling", "generate", "kv_bytes_per_token", "left_pad"]


@dataclass(frozen=True)
class Eviction:
    """A small KV cache: which policy, how it is enforced, and which attention computes it."""

    policy: Policy
    mode: KVMode = "drop"
    attention: str = "eager"


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
    stats: dict[str, float] | None = None,
) -> list[Completion]:
    """Generate one completion per prompt (token ids, no padding), all in one batch. `stats`, when
    given, gains the seconds of the prompt's forward (`prefill_s`) and of the steps (`decode_s`)."""
    if len(prompts) != len(sampling):
        raise ValueError("one Sampling per prompt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    began = time.perf_counter()
    decoder = Decoder(model, prompts, eviction, pad)
    logits = decoder.prefill()
    if stats is not None:
        logits.max().item()  # one sync a batch, so that the prefill's time is its own
        prefilled = time.perf_counter()
        stats["prefill_s"] = stats.get("prefill_s", 0.0) + prefilled - began

    eos = eos_ids(model, tokenizer)
    sampler = Sampler.for_requests(sampling, logits.device)
    transcripts = [Transcript(tokenizer, s, eos) for s in sampling]
    # Each row's KV peak when it ends: rows done early keep stepping for the others.
    peaks: list[int | None] = [None] * len(prompts)
    steps = max(s.max_new_tokens for s in sampling)
    for step in range(steps):
        choice = sampler.choose(logits, torch.full((len(prompts),), step, device=logits.device))
        tokens, chosen, top_values, top_ids = choice.tolist()
        ended = [row for row, transcript in enumerate(transcripts) if transcript.reason is None
                 and transcript.add(tokens[row], chosen[row], top_values[row], top_ids[row])]
        if ended and eviction is not None:
            now = decoder.cache.peak_bytes()
            for row in ended:
                peaks[row] = now[row]
        if all(t.reason is not None for t in transcripts) or step == steps - 1:
            break
        # Rows already done still take a step; what they compute is never read.
        logits = decoder.step(choice.tokens)
    if stats is not None:
        stats["decode_s"] = stats.get("decode_s", 0.0) + time.perf_counter() - prefilled

    completions = []
    for row, transcript in enumerate(transcripts):
        done = transcript.finish()
        done.kv_cache = _kv_report(model, decoder.cache, eviction, row, len(prompts[row]), len(transcript.ids),
                                   peaks[row])
        completions.append(done)
    return completions


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of one token's keys and values over all layers and KV heads."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads  # OPT, GPT-NeoX: none
    return config.num_hidden_layers * kv_heads * 2 * head_dim * model.dtype.itemsize


def _kv_report(model, cache, eviction: Eviction | None, row: int, prompt_len: int, generated: int,
               peak: int | None = None) -> dict:
    per_token = kv_bytes_per_token(model)
    # The last token's key and value are never written: a full cache peaks one short of the end.
    full = (prompt_len + max(0, generated - 1)) * per_token
    if eviction is None:
        return {"engine": "reference", "policy": "full", "mode": "full", "prompt_tokens": prompt_len,
                "kv_bytes_peak": full, "kv_bytes_full": full}
    budget = cache.budgets[row]
    return {
        "engine": "reference",
        "policy": eviction.policy.name,
        "mode": eviction.mode,
        "heavy_ratio": eviction.policy.heavy_ratio,
        "recent_ratio": eviction.policy.recent_ratio,
        "heavy_budget": budget.heavy,
        "recent_budget": budget.recent,
        "prompt_tokens": prompt_len,
        "kv_bytes_peak": peak if peak is not None else cache.peak_bytes()[row],
        "kv_bytes_full": full,
    }
