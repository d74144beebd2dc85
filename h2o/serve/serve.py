"""A served run: HELM requests through a model with a full or small KV cache, each result on disk
as soon as it exists (`h2o.serve.results`), over one process or the ranks of torchrun
(`h2o.serve.distributed`). `serve` is what run_helm.py, the sweep and the tests call."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from h2o import models
from h2o.engine import EngineName, EngineOptions, FastEngine, make_engine
from h2o.engine.sampling import Sampling
from h2o.engine.transcript import Completion
from h2o.policies import Policy
from h2o.serve import distributed, helm_io, results
from h2o.serve.options import ServeOptions
from h2o.serve.prompts import Encoded, encode_all

log = logging.getLogger("run_helm")
Keep = Callable[[Encoded, Completion, int], None]


@dataclass
class Served:
    """What a run did: tokens generated, wall seconds, and the engine's split of them (prefill, decode)."""

    generated: int
    seconds: float
    engine_stats: dict[str, float] = field(default_factory=dict)


def serve(options: ServeOptions, model: PreTrainedModel | None = None) -> Served:
    """Answer the first `sample_num` requests of `input_path` into `output_path`, after the results
    it already holds. `model`: the `model_name` weights already loaded on the run's device in its
    dtype (a sweep's, loaded once for all its points), used instead of loading them again.

    Raises ValueError or FileNotFoundError for a bad input or output, before any result is
    written; `results.Stopped` (a signal, a failed write) once results may exist, its `saved`
    saying what the output keeps."""
    output_writer = writer = None
    try:
        with results.stop_on_signals():
            ranks = distributed.Ranks.from_env(options.tensor_parallel or 1)
            policy = options.build_policy()
            requests = helm_io.read_requests(options.input_path)[: options.sample_num]
            device = _device(options, ranks)
            distributed.start(ranks, device)
            # Rank 0 holds the output (one writer) and repairs it before the others read it.
            if ranks.rank == 0:
                output_writer = writer = results.ResultsWriter(options.output_path, requests)
            distributed.barrier(ranks)
            todo = output_writer.todo() if output_writer else results.unfinished(options.output_path, requests)
            if not todo:
                log.info("%s already holds all %d results", options.output_path, len(requests))
                return Served(0, 0.0)
            if len(todo) < len(requests):
                log.info("resuming: %d of %d requests already answered in %s", len(requests) - len(todo),
                         len(requests), options.output_path)
            # Several groups: each its share, into a part; a group's other ranks serve what its first writes.
            mine, output = requests, options.output_path
            if ranks.groups > 1:
                mine, output = [requests[i] for i in ranks.share(todo)], ranks.part(options.output_path)
                if ranks.writes:
                    writer = results.ResultsWriter(output, mine)
                distributed.barrier(ranks)  # the part is repaired before the rest of its group reads it
            if not ranks.writes:
                writer = results.Discard(mine, results.unfinished(output, mine))
            engine, why = choose_engine(options, policy)
            tokenizer, config = models.load_tokenizer(options.model_name, options.model_arch, options.cache_dir)
            if options.tensor_parallel:
                models.check_tensor_parallel(config, ranks.tp)
            encoded = encode_all(options, tokenizer, config, [(i, writer.requests[i]) for i in writer.todo()])
            log.info("engine: %s (%s)", engine, why)
            torch.manual_seed(options.seed)
            loading = time.perf_counter()
            if model is None:
                model = models.load_model(options.model_name, device, options.model_dtype(device, config),
                                          options.device_map, tensor_parallel=options.tensor_parallel or 0,
                                          cache_dir=options.cache_dir)
            loaded = time.perf_counter() - loading
            served = run(options, model, tokenizer, encoded, policy, writer, engine)
            log.info("generated %d tokens in %.2f s: %.1f tok/s (model load %.2f s apart)",
                     served.generated, served.seconds, served.generated / max(served.seconds, 1e-9), loaded)
            if served.engine_stats:
                log.info("%s engine: prefill %.2f s, decode %.2f s", engine, served.engine_stats["prefill_s"],
                         served.engine_stats["decode_s"])
            distributed.barrier(ranks)
            if ranks.groups > 1 and ranks.rank == 0:
                distributed.merge(output_writer, todo, ranks)
            return served
    except results.Stopped as error:
        kept = output_writer or writer
        if isinstance(kept, results.ResultsWriter):
            error.saved = kept.saved()
        raise
    finally:
        for w in {id(w): w for w in (writer, output_writer) if w is not None}.values():
            w.close()
        distributed.stop()


def choose_engine(options: ServeOptions, policy: Policy | None) -> tuple[EngineName, str]:
    """The engine that serves this run, and why, in a few words."""
    why_not = None
    if policy is not None and options.kv_mode == "mask":
        why_not = "mask mode is the paper's simulation"
    elif policy is not None and not FastEngine.serves(policy):
        why_not = f"policy {policy.name} has its own selection rule"
    elif options.device_map:
        why_not = "--device_map spreads the layers over devices"
    if options.engine == "fast" and why_not:
        raise ValueError(f"--engine fast: {why_not}; use --engine reference or auto")
    if options.engine == "reference" or why_not:
        return "reference", why_not or "--engine reference"
    return "fast", "--engine fast" if options.engine == "fast" else "it serves this run"


def _device(options: ServeOptions, ranks: distributed.Ranks) -> str:
    if ranks.parallel and not options.device and torch.cuda.is_available() and not options.no_cuda:
        return f"cuda:{ranks.local_rank}"  # one GPU per rank
    if options.device:
        if options.device.startswith("cuda") and (options.no_cuda or not torch.cuda.is_available()):
            raise ValueError(f"--device {options.device}: no CUDA device available")
        return options.device
    return "cuda" if torch.cuda.is_available() and not options.no_cuda else "cpu"


def run(options: ServeOptions, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoded: list[Encoded],
        policy: Policy | None, writer: results.ResultsWriter | results.Discard, engine: EngineName = "reference",
        halve_on_oom: bool = True) -> Served:
    """Serve the requests and hand each result to `writer` as soon as it exists. Out of GPU
    memory on the reference engine, the batch is halved and the requests without a result are
    served again (a request's result does not depend on its batch); the fast engine backs off and
    grows back by itself, and raises only what one request alone cannot get."""
    batch, stats = batch_rows(options.batch_size, engine, model), {}
    generated, started = 0, time.perf_counter()
    left = encoded
    with tqdm(total=len(encoded), unit="req") as bar:
        def keep(item: Encoded, done: Completion, size: int) -> None:
            nonlocal generated
            writer.add(item.index, helm_io.result_record(item.request, done, size, item.templated, time.time()))
            generated += len(done.token_ids)
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.1f}")

        while left:
            try:
                _serve(options, model, tokenizer, left, policy, engine, batch, keep, stats)
                break
            except torch.OutOfMemoryError:
                if engine == "fast" or batch is None or batch == 1 or not halve_on_oom:
                    raise
                unanswered = set(writer.todo())
                left = [item for item in left if item.index in unanswered]
                log.warning("out of memory at batch %d: going on at batch %d with the %d requests left",
                            batch, batch // 2, len(left))
                batch //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return Served(generated, time.perf_counter() - started, stats)


def batch_rows(batch_size: int | None, engine: EngineName, model: PreTrainedModel) -> int | None:
    """--batch_size for the engine: auto (None) stays None for the fast engine on a GPU (it
    fills its KV pool), and is 1 elsewhere."""
    if batch_size is None and not (engine == "fast" and model.device.type == "cuda"):
        return 1
    return batch_size


def _serve(options: ServeOptions, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, encoded: list[Encoded],
           policy: Policy | None, engine: EngineName, batch: int | None, keep: Keep, stats: dict[str, float]) -> None:
    sampling = [
        Sampling(max_new_tokens=e.request.max_tokens, temperature=e.request.temperature, top_p=e.request.top_p,
                 top_k=options.k, stop=e.request.stop, top_logprobs=e.request.top_logprobs,
                 seed=options.seed * 1_000_003 + e.request.line)
        for e in encoded
    ]
    # Under tensor parallel the step holds collectives: no CUDA graph until one is measured there.
    engine_options = EngineOptions(batch_size=batch, kv_mode=options.kv_mode, attention=options.attention,
                                   cuda_graph=False if options.tensor_parallel else None,
                                   gpu_memory_fraction=options.gpu_memory_fraction)
    served = make_engine(engine, model, tokenizer, policy, engine_options)
    try:
        # auto: the rows the fast engine's pool gave it, known once its run has started.
        served.run([e.ids for e in encoded], sampling,
                   lambda i, done: keep(encoded[i], done, batch or served.cache.batch))
    finally:
        for name, value in getattr(served, "stats", {}).items():
            stats[name] = stats.get(name, 0) + value
