"""Teacher-forced scoring: the log-probability of each given token of a text under a full or a
small KV cache, as lm-eval's loglikelihood requests need.

- the full cache: one forward over the text;
- mask mode: one forward under the paper's whole-text heavy-hitter mask
  (`h2o.engine.reference.whole_text_mask`), as the paper's `run_lm_eval_harness.py` scores;
- drop mode: real eviction through an `EvictingCache`, the text before `start` prefilled and each
  later token fed one at a time (`Decoder.step`), so a token is scored by what the small cache
  holds when it comes.

Budgets follow the whole text's length in both small-cache modes (the paper's
`int(ratio * attn_weights.shape[-1])` over the whole request), so the two read one budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from h2o.engine.decoding import left_pad
from h2o.engine.reference.generation import Decoder, Eviction
from h2o.engine.reference.whole_text_mask import ATTENTION, WholeTextMask


@dataclass(frozen=True)
class TokenScores:
    """The scored tokens of a text: each one's log-probability given the tokens before it, and
    the most likely token at its place with that token's log-probability."""

    tokens: list[int]
    logprobs: list[float]
    top_ids: list[int]
    top_logprobs: list[float]

    @property
    def greedy(self) -> bool:
        """Whether every scored token is the model's most likely one (lm-eval's `is_greedy`)."""
        return self.tokens == self.top_ids


def _scores(logprobs: torch.Tensor, tokens: list[int]) -> TokenScores:
    """From (len(tokens), vocab) log-probabilities, one row per scored token."""
    target = torch.tensor(tokens, device=logprobs.device)
    top_values, top_ids = logprobs.max(dim=-1)
    return TokenScores(list(tokens), logprobs.gather(-1, target[:, None])[:, 0].tolist(), top_ids.tolist(),
                       top_values.tolist())


def _one_forward(model: PreTrainedModel, texts: list[list[int]], starts: list[int],
                 eviction: Eviction | None, pad_id: int) -> list[TokenScores]:
    ids, valid, positions = left_pad(texts, pad_id, model.device)
    if eviction is None:
        model.set_attn_implementation("sdpa")
        extra = {"attention_mask": valid.long()}
    else:
        model.set_attn_implementation(ATTENTION)
        extra = {"whole_text_mask": WholeTextMask.build(eviction.policy, valid, model.config.num_hidden_layers)}
    # Left padding: a text's scored tokens are predicted by the last len - start + 1 columns but one.
    kept = max(len(text) - start for text, start in zip(texts, starts)) + 1
    logits = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=kept, **extra).logits
    out = []
    for row, (text, start) in enumerate(zip(texts, starts)):
        first = kept - (len(text) - start) - 1
        out.append(_scores(logits[row, first : kept - 1].float().log_softmax(-1), text[start:]))
    return out


def _token_by_token(model: PreTrainedModel, texts: list[list[int]], starts: list[int],
                    eviction: Eviction, pad_id: int) -> list[TokenScores]:
    decoder = Decoder(model, [t[:s] for t, s in zip(texts, starts)], eviction, pad_id,
                      budget_lengths=[len(t) for t in texts])
    steps = max(len(t) - s for t, s in zip(texts, starts))
    rows: list[list[torch.Tensor]] = [[] for _ in texts]
    logits = decoder.prefill()
    for step in range(steps):
        for row, (text, start) in enumerate(zip(texts, starts)):
            if start + step < len(text):
                rows[row].append(logits[row].log_softmax(-1))
        if step == steps - 1:
            break
        # A text already scored to its end feeds its last token again; what it computes is never read.
        feed = [text[min(start + step, len(text) - 1)] for text, start in zip(texts, starts)]
        logits = decoder.step(torch.tensor(feed))
    return [_scores(torch.stack(r), t[s:]) for r, t, s in zip(rows, texts, starts)]


@torch.inference_mode()
def score(model: PreTrainedModel, texts: list[list[int]], starts: list[int], eviction: Eviction | None = None,
          pad_id: int = 0) -> list[TokenScores]:
    """Score tokens `starts[i]`.. of each text (token ids; 1 <= start < len), in one batch: the full
    cache (`eviction` None), or `eviction.mode` "mask" (whole-text mask) or "drop"."""
    if len(texts) != len(starts):
        raise ValueError("one start per text")
    for text, start in zip(texts, starts):
        if not 1 <= start < len(text):
            raise ValueError(f"a scored token needs one before it: start {start} of a text of {len(text)} tokens")
    if eviction is not None and eviction.mode == "drop":
        return _token_by_token(model, texts, starts, eviction, pad_id)
    return _one_forward(model, texts, starts, eviction, pad_id)
