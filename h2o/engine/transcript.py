"""One request's output as it grows, token by token, for both engines: when it ends (end of
text, a stop sequence, max_tokens) and the finished text, cut at the first stop sequence."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

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
    request is done; `finish` makes the `Completion`.

    The text grows by each token's new characters, so the work per token does not grow with the
    text: both texts compared start at the same token (`_prefix`), so that a tokenizer's handling
    of a leading space cancels out, and a token that ends inside a character (byte-level
    tokenizers) adds nothing until the character is whole. Stop sequences are looked for where
    the new characters could complete one (so a stop whose last token also begins a character
    that a later token completes is seen at that later token; `finish` cuts the text at the stop
    either way)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, eos: set[int]) -> None:
        self.tokenizer, self.sampling, self.eos = tokenizer, sampling, eos
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[dict[str, float]] = []
        self.reason: str | None = None
        self.text = ""  # the text of ids[:_read]
        self.pieces: list[str] = []  # each token's new characters ("" while a character is cut)
        self._prefix = self._read = 0
        self._longest_stop = max(map(len, sampling.stop), default=0)

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
        new = self._extend()
        if new and self._longest_stop:
            tail = self.text[max(0, len(self.text) - len(new) - self._longest_stop + 1):]
            if any(s in tail for s in self.sampling.stop):
                self.reason = "stop"
        if self.reason is None and len(self.ids) >= self.sampling.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def _extend(self) -> str:
        """The characters the tokens since `_read` add to the text, appended to it and to the
        newest token's piece; "" while they end inside a character. Where they change earlier
        characters (a tokenizer's clean-up of spaces), the text takes the change."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        after = decode(self.ids[self._prefix:])
        self.pieces.append("")
        if after.endswith("\ufffd"):
            return ""
        if after.startswith(before):
            new = after[len(before):]
        else:
            self.text, new = self.text[: len(self.text) - len(before)], after
        if not new:
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        self.pieces[-1] = new
        return new

    def finish(self) -> Completion:
        """Text, per-token pieces and offsets, cut at the first stop sequence."""
        tokenizer, ids = self.tokenizer, self.ids
        logprobs, tops, reason = self.logprobs, self.tops, self.reason or "length"
        text = tokenizer.decode(ids)
        pieces = list(self.pieces)
        if pieces and text.startswith(self.text):
            pieces[-1] += text[len(self.text):]  # what tokens that ended inside a character left
        if "".join(pieces) == text:
            offsets = list(accumulate(map(len, pieces[:-1]), initial=0))[: len(pieces)]
        else:  # a tokenizer whose text is not the sum of its pieces
            pieces, offsets = self._pieces_by_prefix()
        stop = self.sampling.stop
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            kept = sum(1 for o in offsets if o < cut)
            ids, pieces, offsets = ids[:kept], pieces[:kept], offsets[:kept]
            logprobs, tops = logprobs[:kept], tops[:kept]
        return Completion(text, pieces, ids, logprobs, tops, offsets, reason)

    def _pieces_by_prefix(self) -> tuple[list[str], list[int]]:
        """Each token's piece and offset as the text of every prefix gives them (one decode per token)."""
        pieces, offsets, text = [], [], ""
        for i in range(len(self.ids)):
            full = self.tokenizer.decode(self.ids[: i + 1])
            offsets.append(len(text))
            pieces.append(full[len(text):])
            text = full
        return pieces, offsets


def eos_ids(model, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The model's end-of-text tokens (its generation config's and the tokenizer's)."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
