"""The fast engine: H2O drop-mode eviction (and the full cache) with static shapes, for throughput
on a GPU.

`FastEngine` (h2o.engine.fast.engine) serves HELM requests behind run_helm.py: sampling, stop sequences,
logprobs and continuous batching, with the reference engine's results. `generate_fast`
(h2o.engine.fast.generate) is a greedy, fixed-length call of it, on token ids alone, that the
benchmarks time.

Contract of `generate_fast(model, prompts, max_new_tokens, policy)`:

- Greedy decoding of a batch of token-id prompts of any lengths (left-padded per prefill
  slice; padding never counts as a token). Returns the same tokens as the reference
  `h2o.engine.reference.generation.generate(..., [Sampling(max_new_tokens)] * n, Eviction(policy, "drop"))`,
  cut before the first end-of-text token: same budgets (`policy.budget` of each prompt), same
  scores (attention summed over query rows and the query heads sharing a KV head), same
  selection (`Policy.select`, the paper's recent window + heavy hitters, including the token
  that sits out one step after leaving the window). Slots are not kept in position order, so
  sums run in another order: results agree to rounding, and greedy tokens agree unless two
  logits or two scores tie to within it. Exactly equal scores (a token repeated with the
  same attention) are broken by slot order here and by top-k's order in the reference.
- Memory: one pool of fixed-size blocks for all layers, allocated once; each (layer,
  sequence) holds the blocks of its own heavy + recent + 1 slots there, for as long as
  the sequence runs. The prompts are prefilled in slices of at most
  `prefill_rows` times the longest prompt's tokens and compacted layer by layer, so the
  full-length keys and values of one layer of one slice are the most that ever exist at once.
- Policies: any `Policy` that keeps the base class's `select` (h2o, local, h2o-avg, sink,
  tova); the Triton kernels further need H2O's own `accumulate`, `rank` and parked leaving
  token (otherwise torch operations do the same work).
- Arithmetic: without the kernels (on the CPU, say) each pass goes through the reference
  attention of `h2o.engine.reference.attention` over the slots, so scores and outputs are the reference's own
  arithmetic; only the eviction differs in form (an argmin instead of a top-k).
- Models: those whose attention goes through transformers' `AttentionInterface` with a
  `Cache` (the LLaMA family); the cache reaches the attention as the `eviction_cache` keyword.
- On CUDA the decode steps between two host checks (model, eviction and the choice of tokens)
  are captured as one CUDA graph after one eager run, and replayed; with Triton, one fused
  kernel per layer does attention, scoring and eviction, and the prefill scores come from two
  kernels that never materialize the attention matrix.
"""

from h2o.engine.fast.slots import ATTENTION, FastCache, FastLayer, fast_eviction_attention
from h2o.engine.fast.engine import FastEngine
from h2o.engine.fast.generate import FastGeneration, TokenIdsOnly, generate_fast

__all__ = [
    "ATTENTION", "FastCache", "FastEngine", "FastGeneration", "FastLayer", "TokenIdsOnly",
    "fast_eviction_attention", "generate_fast",
]
