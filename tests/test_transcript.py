"""The transcript's text grows by each token's new characters: its stops, texts, pieces and
offsets equal those of decoding the whole text at every token (the way it was first written,
restated below), on word-level, SentencePiece-style and byte-level tokenizers."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import tiny_tokenizer
from h2o.engine.sampling import Sampling
from h2o.engine.transcript import Completion, Transcript


def _metaspace() -> PreTrainedTokenizerFast:
    """Words that begin with SentencePiece's space mark, and pieces that continue a word."""
    words = ["<pad>", "<eos>"] + [f"\u2581w{i}" for i in range(20)] + [f"x{i}" for i in range(10)] + ["\u2581", "é"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    core.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _bytes() -> PreTrainedTokenizerFast:
    """One token per byte, as byte-level BPE before its merges: a character of several bytes
    spans tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE({c: i + 2 for i, c in enumerate(alphabet)} | {"<pad>": 0, "<eos>": 1}, []))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


TOKENIZERS = {"words": tiny_tokenizer, "metaspace": _metaspace, "bytes": _bytes}


class WholeText(Transcript):
    """The oracle: the whole text decoded at every token, and every prefix's text at the end."""

    def add(self, token, logprob, top_logprobs, top_ids):
        if token in self.eos:
            self.reason = "endoftext"
            return True
        self.ids.append(token)
        self.logprobs.append(logprob)
        decode = self.tokenizer.decode
        wanted = max(1, self.sampling.top_logprobs)
        self.tops.append({decode([i]): v for v, i in zip(top_logprobs[:wanted], top_ids[:wanted])})
        if self.sampling.stop and any(s in decode(self.ids) for s in self.sampling.stop):
            self.reason = "stop"
        elif len(self.ids) >= self.sampling.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def finish(self):
        ids, logprobs, tops, reason = self.ids, self.logprobs, self.tops, self.reason or "length"
        pieces, offsets, text = [], [], ""
        for i in range(len(ids)):
            full = self.tokenizer.decode(ids[: i + 1])
            offsets.append(len(text))
            pieces.append(full[len(text):])
            text = full
        cut = min((text.find(s) for s in self.sampling.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            kept = sum(1 for o in offsets if o < cut)
            ids, pieces, offsets, logprobs, tops = ids[:kept], pieces[:kept], offsets[:kept], logprobs[:kept], tops[:kept]
        return Completion(text, pieces, ids, logprobs, tops, offsets, reason)


def _ids(tokenizer, rng, n):
    if tokenizer.decoder is None or "ByteLevel" not in str(tokenizer.backend_tokenizer.decoder):
        return [rng.randrange(2, len(tokenizer)) for _ in range(n)]
    # Real text, so that characters of two and three bytes span tokens.
    text = "".join(rng.choice(["a", "b", " ", "é", "€", "z", "ß", "\n"]) for _ in range(n))
    return tokenizer(text, add_special_tokens=False).input_ids[:n]


def _run(cls, tokenizer, ids, sampling):
    transcript = cls(tokenizer, sampling, {1})
    ends = [transcript.add(i, -0.5, [-0.5], [i]) for i in ids]
    steps = ends.index(True) + 1 if True in ends else None
    return steps, transcript.finish()


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_incremental_text_and_stops_equal_whole_text_decoding(name):
    tokenizer = TOKENIZERS[name]()
    rng = random.Random(5)
    straddled = 0
    for trial in range(60):
        ids = _ids(tokenizer, rng, rng.randint(1, 40))
        whole = tokenizer.decode(ids)
        stops = []
        if trial % 3 and len(whole) > 3:  # a stop taken from the text, often across tokens
            start = rng.randrange(len(whole) - 2)
            stops = [whole[start:start + rng.randint(2, 4)]]
            straddled += not any(stops[0] == tokenizer.decode([i]) for i in ids)
        sampling = Sampling(max_new_tokens=len(ids), stop=tuple(stops))
        expected_steps, expected = _run(WholeText, tokenizer, ids, sampling)
        steps, done = _run(Transcript, tokenizer, ids, sampling)
        assert steps == expected_steps, (ids, stops)
        assert (done.text, done.finish_reason) == (expected.text, expected.finish_reason), ids
        if name == "bytes":
            # Whole characters where the prefixes' texts gave a replacement mark for a cut one:
            # the tokens kept are the fewest whose text holds the text.
            kept = len(done.token_ids)
            assert done.token_ids == ids[:kept] and tokenizer.decode(ids[:kept]).startswith(done.text)
            assert kept == 0 or not tokenizer.decode(ids[: kept - 1]).rstrip("\ufffd").startswith(done.text) \
                or not done.text
            assert "\ufffd" not in "".join(done.tokens).rstrip("\ufffd")
            assert done.text_offset == [sum(map(len, done.tokens[:i])) for i in range(len(done.tokens))]
            assert "".join(done.tokens).startswith(done.text)
        else:
            assert (done.tokens, done.text_offset, done.token_ids) == (
                expected.tokens, expected.text_offset, expected.token_ids), ids
    assert straddled >= 10


def test_a_character_cut_across_tokens_comes_whole_in_one_piece():
    tokenizer = _bytes()
    ids = tokenizer("a€b", add_special_tokens=False).input_ids
    assert len(ids) == 5  # a, the three bytes of €, b
    transcript = Transcript(tokenizer, Sampling(max_new_tokens=10), {1})
    for i in ids:
        transcript.add(i, 0.0, [0.0], [i])
    done = transcript.finish()
    assert done.text == "a€b" and done.tokens == ["a", "", "", "€", "b"] and done.text_offset == [0, 1, 1, 1, 2]
