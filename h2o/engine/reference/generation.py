"""The reference engine: batched autoregressive generation with a full or an evicting KV cache.

One prefill over the left-padded prompts, then one token per step for every sequence. Each
sequence has its own positions (padding never counts as a token) and its own stop conditions;
the choice of tokens (`h2o.engine.sampling`), the finished text (`h2o.engine.transcript`), the left
padding (`h2o.engine.decoding`) and the KV report (`h2o.engine.kv_report`) are shared with the
fast engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.decoding import left_pad
from h2o.engine.kv_report import kv_report
from h2o.engine.reference.attention import ATTENTION_IMPLEMENTATIONS
from h2o.engine.reference.evicting_cache import EvictingCache, KVMode
from h2o.engine.sampling import Sampler, Sampling
from h2o.engine.transcript import Completion, Transcript, eos_ids
from h2o.policies import Policy

__all__ = ["Completion", "Decoder", "Eviction", "Sampling", "generate"]


@dataclass(frozen=True)
class Eviction:
    """A small KV cache: which policy, how it is enforced, and which attention computes it."""

    policy: Policy
    mode: KVMode = "drop"
    attention: str = "eager"


class Decoder:
    """Forward passes for one batch and its KV cache: `prefill()` once, then `step(tokens)` for
    one token per sequence. Prompts are left-padded; positions count real tokens only. Budgets
    follow each prompt's length, or `budget_lengths` where the whole text is known beforehand."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], eviction: Eviction | None,
                 pad_id: int = 0, budget_lengths: list[int] | None = None) -> None:
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
                eviction.policy, eviction.mode, config.num_hidden_layers,
                budget_lengths if budget_lengths is not None else [len(p) for p in prompts], device
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
        if eviction is None:
            done.kv_cache = kv_report("reference", model, len(prompts[row]), len(transcript.ids))
        else:
            peak = peaks[row] if peaks[row] is not None else decoder.cache.peak_bytes()[row]
            done.kv_cache = kv_report("reference", model, len(prompts[row]), len(transcript.ids),
                                      policy=eviction.policy, mode=eviction.mode, budget=decoder.cache.budgets[row],
                                      peak_bytes=peak)
        completions.append(done)
    return completions
