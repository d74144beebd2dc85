"""The engines: token ids and decoding settings in, completions out, behind one interface.

- `reference/`: the readable oracle (the paper's arithmetic; mask and drop modes), batches of
  similar lengths decoded in lock step.
- `fast/`: its optimized twin (static slots, continuous batching, CUDA graphs, Triton), tested
  against it.

What both need (sampling, transcripts, left padding, KV accounting) lives beside them in this
package and is written once. Serving (`h2o.serve`) builds an engine with `make_engine` and never
asks which one it got.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o.engine.fast.engine import FastEngine
from h2o.engine.interface import Engine, EngineName, EngineOptions, OnDone
from h2o.engine.reference.engine import ReferenceEngine
from h2o.engine.sampling import Sampling
from h2o.engine.transcript import Completion
from h2o.policies import Policy


def make_engine(name: EngineName, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, policy: Policy | None,
                options: EngineOptions) -> Engine:
    """The engine `name` for this model and policy (None: the full cache)."""
    if name == "fast":
        return FastEngine(model, tokenizer, policy, options.batch_size, cuda_graph=options.cuda_graph,
                          gpu_memory_fraction=options.gpu_memory_fraction)
    if options.batch_size is None:
        raise ValueError("the reference engine needs a batch size")
    return ReferenceEngine(model, tokenizer, policy, options)


__all__ = ["Completion", "Engine", "EngineName", "EngineOptions", "FastEngine", "OnDone", "ReferenceEngine",
           "Sampling", "make_engine"]
