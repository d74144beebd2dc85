"""One request's output as it grows, token by token, for both engines: when it ends (end of
text, a stop sequence, max_tokens) and the finished text, cut at the first stop sequence."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from h2o.engine.sampling import Sampling


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
    seconds: float = 0.0  # from the request's start to its end, where the engine knows it


class Transcript:
    """The tokens chosen so far for one request. `add` takes the next choice and says whether the
    request is done; `finish` makes the `Completion`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, eos: set[int]) -> None:
        self.tokenizer, self.sampling, self.eos = tokenizer, sampling, eos
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[dict[str, float]] = []
        self.reason: str | None = None

    def add(self, token: int, logprob: float, top_logprobs: list[float], top_ids: list[int]) -> bool:
        """Record one chosen token (an end-of-text token ends the request unrecorded); True once done."""
        if token in self.eos:
            self.reason = "endoftext"
            return True
        self.ids.append(token)
        self.logprobs.append(logprob)
        wanted = max(1, self.sampling.top_logprobs)
        decode = self.tokenizer.decode
        self.tops.append({decode([i]): v for v, i in zip(top_logprobs[:wanted], top_ids[:wanted])})
        stop = self.sampling.stop
        if stop and any(s in decode(self.ids) for s in stop):
            self.reason = "stop"
        elif len(self.ids) >= self.sampling.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def finish(self) -> Completion:
        """Text, per-token pieces and offsets, cut at the first stop sequence."""
        tokenizer, ids = self.tokenizer, self.ids
        logprobs, tops, reason = self.logprobs, self.tops, self.reason or "length"
        pieces, offsets, text = [], [], ""
        for i in range(len(ids)):
            full = tokenizer.decode(ids[: i + 1])
            offsets.append(len(text))
            pieces.append(full[len(text):])
            text = full
        stop = self.sampling.stop
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            kept = sum(1 for o in offsets if o < cut)
            ids, pieces, offsets = ids[:kept], pieces[:kept], offsets[:kept]
            logprobs, tops = logprobs[:kept], tops[:kept]
        return Completion(text, pieces, ids, logprobs, tops, offsets, reason)


def eos_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The model's end-of-text tokens (its generation config's and the tokenizer's)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
