"""Choosing the next token, for both engines: greedy, or temperature with top-k and top-p, and
the log-probabilities HELM asks for.

Random numbers are not drawn from a stateful generator but hashed from a counter: the noise for
token id `v` at a request's `step` is a function of (request key, step, v) alone. A request's
tokens therefore do not depend on its batch, its row, the order of the run, a resume or the
device, and both engines draw the same numbers. The draw is Gumbel-max, argmax(logits / T + G)
with G = -log(-log(U)): an exact sample from the filtered softmax(logits / T) that needs no
cumulative sum, so two engines whose logits differ by rounding pick the same token unless two
perturbed logits tie to within it. Everything is tensor operations on the logits' device, so a
CUDA graph can capture the choice with the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    """How one request is decoded (HELM's request fields). `seed` keys its random numbers."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    top_logprobs: int = 1
    seed: int = 0


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 0 <= x < 2**32, in int64 without overflow (16-bit halves)."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (C. Wellons' lowbias32), on int64 tensors."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def request_keys(seeds: list[int]) -> torch.Tensor:
    """The requests' 32-bit keys (int64 tensor) from their non-negative seeds of up to 64 bits."""
    low = torch.tensor([s & MASK32 for s in seeds], dtype=torch.long)
    high = torch.tensor([(s >> 32) & MASK32 for s in seeds], dtype=torch.long)
    return mix32(low ^ mix32(high + 0x3C6EF372))


def uniforms(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float64 in (0, 1): the counter-based noise of rows with `keys` at `steps` (B,)."""
    per_step = mix32(keys ^ mix32(steps + 0x632BE5AB))
    ids = torch.arange(vocab, device=keys.device)
    bits = mix32(mix32(per_step[:, None] ^ ids) + 0x68E31DA4)
    return (bits.double() + 0.5) / 2.0**32


@dataclass
class Choice:
    """One step's choice per row: token ids (B,), their log-probabilities (B,) and the `top` most
    likely tokens (B, top), all under the model's distribution before temperature."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.tokens, self.logprobs, self.top_logprobs, self.top_ids

    def tolist(self) -> tuple[list, ...]:
        """The four on the host, as nested lists (one copy each)."""
        return tuple(t.tolist() for t in self.tensors())


class Sampler:
    """The choice for a fixed set of rows, as tensors on `device`. Rows can be re-assigned to new
    requests in place (`assign`), so a captured CUDA graph keeps reading the same memory."""

    def __init__(self, rows: int, device: torch.device | str, top: int = 1, filtering: bool = False) -> None:
        self.keys = torch.zeros(rows, dtype=torch.long, device=device)
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top = max(1, top)
        # Sorting the vocabulary costs a few kernels a step: only when some request asks for it.
        self.filtering = filtering

    @classmethod
    def for_requests(cls, sampling: list[Sampling], device: torch.device | str) -> "Sampler":
        sampler = cls(len(sampling), device, max(s.top_logprobs for s in sampling),
                      any(s.top_k > 0 or s.top_p < 1 for s in sampling))
        sampler.assign(list(range(len(sampling))), sampling)
        return sampler

    def assign(self, rows: list[int], sampling: list[Sampling]) -> None:
        """Rows `rows` now decode the requests `sampling`."""
        if any(s.top_logprobs > self.top or ((s.top_k > 0 or s.top_p < 1) and not self.filtering)
               for s in sampling):
            raise ValueError("a request needs more than this sampler was built for")
        index = torch.tensor(rows, device=self.keys.device)
        device = self.keys.device
        self.keys[index] = request_keys([s.seed for s in sampling]).to(device)
        self.temperature[index] = torch.tensor([float(s.temperature) for s in sampling], device=device)
        self.top_p[index] = torch.tensor([float(s.top_p) for s in sampling], device=device)
        self.top_k[index] = torch.tensor([s.top_k for s in sampling], device=device)

    @staticmethod
    def _filter(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p over what is left (the smallest set whose mass reaches top_p)."""
        ordered, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        beyond_k = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        ordered = ordered.masked_fill(beyond_k, float("-inf"))
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs
        drop = beyond_k | (before >= top_p[:, None].double())
        return scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))

    def choose(self, logits: torch.Tensor, steps: torch.Tensor, rows: torch.Tensor | None = None) -> Choice:
        """Choose the next token from (B, vocab) logits of all rows, or of the rows `rows` (an
        index tensor); `steps` (B,) counts the tokens each row's request has generated so far."""
        pick = (lambda t: t) if rows is None else (lambda t: t[rows])
        keys, temperature = pick(self.keys), pick(self.temperature)
        logits = logits.float()
        greedy = logits.argmax(-1)
        scaled = logits.double() / temperature.clamp(min=1e-6)[:, None].double()
        if self.filtering:
            scaled = self._filter(scaled, pick(self.top_k), pick(self.top_p))
        gumbel = -torch.log(-torch.log(uniforms(keys, steps, logits.shape[-1])))
        sampled = (scaled + gumbel).argmax(-1)
        tokens = torch.where(temperature > 0, sampled, greedy)
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(self.top, dim=-1)
        return Choice(tokens, logprobs.gather(-1, tokens[:, None])[:, 0], top.values, top.indices)
