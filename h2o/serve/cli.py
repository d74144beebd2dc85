"""The command line behind run_helm.py: HELM requests through a model with a full or small KV cache."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from h2o.serve import distributed, helm_io, results
from h2o import models
from h2o.engine.reference.attention import ATTENTION_IMPLEMENTATIONS
from h2o.engine.reference.evicting_cache import KV_MODES
from h2o.engine.transcript import Completion
from h2o.engine import EngineOptions, FastEngine, make_engine
from h2o.engine.sampling import Sampling
from h2o.policies import POLICIES, Policy, WithSinks, make_policy

log = logging.getLogger("run_helm")
CHAT_TEMPLATE = ("auto", "on", "off")
ENGINES = ("auto", "reference", "fast")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    # The paper's flags, same names and defaults.
    p.add_argument("--input_path", default="data/xsum.jsonl", help="HELM requests, one JSON a line")
    p.add_argument("--output_path", default="", help="results jsonl (appended; reruns resume)")
    p.add_argument("--model_name", default=models.DEFAULT_MODEL,
                   help="hub id (local cache), model folder or .gguf file; default: embedded SmolLM2")
    p.add_argument("--model_arch", default="llama", help=f"one of {', '.join(models.SUPPORTED_ARCHS)}")
    p.add_argument("--cache_dir", default=None, help="Hugging Face cache folder for hub ids")
    p.add_argument("--enable_small_cache", action="store_true", help="evict with --policy; else full cache")
    p.add_argument("--heavy_ratio", type=float, default=0.1, help="heavy-hitter budget / prompt length")
    p.add_argument("--recent_ratio", type=float, default=0.1, help="recent-window budget / prompt length")
    p.add_argument("--sample_num", type=int, default=1000, help="use the first N requests")
    p.add_argument("--k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no_cuda", action="store_true", help="never use a GPU")
    p.add_argument("--fp16", action="store_true", help="same as --dtype float16")
    # Ours.
    p.add_argument("--kv_mode", choices=KV_MODES, default="drop",
                   help="drop: evict for real; mask: the paper's simulation (masks, keeps memory)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="h2o",
                   help="which tokens a small cache keeps (h2o is the paper's)")
    p.add_argument("--sink_size", type=int, default=4, help="first tokens kept by --policy sink and h2o-sink")
    p.add_argument("--shrink", type=float, default=None,
                   help="--policy h2o-shrink: a token's attention per later query, shrunk by this share "
                        "of the tokens seen (default 0.25)")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="fast: static slots, continuous batching, CUDA graphs; reference: the readable "
                        "oracle (mask mode, --attention); auto: fast wherever it can serve")
    p.add_argument("--attention", choices=sorted(ATTENTION_IMPLEMENTATIONS), default="eager",
                   help="attention kernel of the reference engine under the small cache")
    p.add_argument("--batch_size", type=int, default=1,
                   help="sequences decoded at once (the fast engine refills a row as soon as it ends)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(models.DTYPES), default="float32")
    p.add_argument("--tensor_parallel", nargs="?", type=int, const=distributed.Ranks.from_env().world, metavar="K",
                   help="under torchrun: shard the model over K ranks (default: all) by transformers' tensor-parallel "
                        "plan, each rank holding the cache of its own KV heads; N ranks hold N/K copies of the "
                        "model, which split the requests as data parallel does")
    p.add_argument("--device_map", default=None,
                   help="accelerate's placement across devices, e.g. auto (a model too large for one GPU)")
    p.add_argument("--chat_template", choices=CHAT_TEMPLATE, default="auto",
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    return p


def _check(args: argparse.Namespace) -> None:
    if not args.output_path:
        raise ValueError("--output_path is required")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.sample_num < 1:
        raise ValueError(f"--sample_num must be at least 1, got {args.sample_num}")
    if args.k < 0:
        raise ValueError(f"--k must be >= 0, got {args.k}")
    if args.tensor_parallel is not None:
        world = distributed.Ranks.from_env().world
        if args.device_map:
            raise ValueError("--tensor_parallel and --device_map each place the model: give one")
        if world < 2:
            raise ValueError("--tensor_parallel: start run_helm.py with torchrun --nproc_per_node N (N >= 2)")
        if not 2 <= args.tensor_parallel <= world or world % args.tensor_parallel:
            raise ValueError(f"--tensor_parallel {args.tensor_parallel}: K must be 2 to {world} and divide the "
                             f"{world} ranks")


def choose_engine(args: argparse.Namespace, policy: Policy | None) -> tuple[str, str]:
    """The engine that serves this run, and why, in a few words."""
    why_not = None
    if policy is not None and args.kv_mode == "mask":
        why_not = "mask mode is the paper's simulation"
    elif policy is not None and not FastEngine.serves(policy):
        why_not = f"policy {policy.name} has its own selection rule"
    elif args.device_map:
        why_not = "--device_map spreads the layers over devices"
    if args.engine == "fast" and why_not:
        raise ValueError(f"--engine fast: {why_not}; use --engine reference or auto")
    if args.engine == "reference" or why_not:
        return "reference", why_not or "--engine reference"
    return "fast", "--engine fast" if args.engine == "fast" else "it serves this run"


def _device(args: argparse.Namespace, ranks: distributed.Ranks) -> str:
    if ranks.parallel and not args.device and torch.cuda.is_available() and not args.no_cuda:
        return f"cuda:{ranks.local_rank}"  # one GPU per rank
    if args.device:
        if args.device.startswith("cuda") and (args.no_cuda or not torch.cuda.is_available()):
            raise ValueError(f"--device {args.device}: no CUDA device available")
        return args.device
    return "cuda" if torch.cuda.is_available() and not args.no_cuda else "cpu"


def encode(tokenizer, prompt: str, mode: str) -> tuple[list[int], bool]:
    """Token ids for a prompt, and whether the chat template wrapped it. Raw prompts get no special
    tokens, as in the paper."""
    templated = mode == "on" or (mode == "auto" and bool(tokenizer.chat_template))
    if templated:
        if not tokenizer.chat_template:
            raise ValueError("--chat_template on: this tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return tokenizer(prompt, add_special_tokens=False).input_ids, templated


def main(argv: list[str] | None = None, model: PreTrainedModel | None = None) -> int:
    """run_helm.py; `model`: the --model_name weights already loaded on --device in --dtype (a
    sweep's, loaded once for all its points), used instead of loading them again."""
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parser().parse_args(argv)
    output_writer = writer = None
    try:
        with results.stop_on_signals():
            _check(args)
            ranks = distributed.Ranks.from_env(args.tensor_parallel or 1)
            options = {"sink_size": args.sink_size} if issubclass(POLICIES[args.policy], WithSinks) else {}
            if args.shrink is not None:
                if POLICIES[args.policy].knob != "shrink":
                    raise ValueError(f"--shrink: only for --policy h2o-shrink, not {args.policy}")
                options["shrink"] = args.shrink
            policy = (make_policy(args.policy, args.heavy_ratio, args.recent_ratio, **options)
                      if args.enable_small_cache else None)
            requests = helm_io.read_requests(args.input_path)[: args.sample_num]
            device = _device(args, ranks)
            distributed.start(ranks, device)
            # Rank 0 holds the output (one writer) and repairs it before the others read it.
            if ranks.rank == 0:
                output_writer = writer = results.ResultsWriter(args.output_path, requests)
            distributed.barrier(ranks)
            todo = output_writer.todo() if output_writer else results.unfinished(args.output_path, requests)
            if not todo:
                log.info("%s already holds all %d results", args.output_path, len(requests))
                return 0
            if len(todo) < len(requests):
                log.info("resuming: %d of %d requests already answered in %s", len(requests) - len(todo),
                         len(requests), args.output_path)
            # Several groups: each its share, into a part; a group's other ranks serve what its first writes.
            mine, output = requests, args.output_path
            if ranks.groups > 1:
                mine, output = [requests[i] for i in ranks.share(todo)], ranks.part(args.output_path)
                if ranks.writes:
                    writer = results.ResultsWriter(output, mine)
                distributed.barrier(ranks)  # the part is repaired before the rest of its group reads it
            if not ranks.writes:
                writer = results.Discard(mine, results.unfinished(output, mine))
            engine, why = choose_engine(args, policy)
            tokenizer, config = models.load_tokenizer(args.model_name, args.model_arch)
            if args.tensor_parallel:
                models.check_tensor_parallel(config, ranks.tp)
            encoded = encode_all(args, tokenizer, config, [(i, writer.requests[i]) for i in writer.todo()])
            log.info("engine: %s (%s)", engine, why)
            torch.manual_seed(args.seed)
            loading = time.perf_counter()
            if model is None:
                model = models.load_model(args.model_name, device, "float16" if args.fp16 else args.dtype,
                                          args.device_map, tensor_parallel=args.tensor_parallel or 0)
            loaded = time.perf_counter() - loading
            served = run(args, model, tokenizer, encoded, policy, writer, engine)
            log.info("generated %d tokens in %.2f s: %.1f tok/s (model load %.2f s apart)",
                     served.generated, served.seconds, served.generated / max(served.seconds, 1e-9), loaded)
            if served.engine_stats:
                log.info("%s engine: prefill %.2f s, decode %.2f s", engine, served.engine_stats["prefill_s"],
                         served.engine_stats["decode_s"])
            distributed.barrier(ranks)
            if ranks.groups > 1 and ranks.rank == 0:
                distributed.merge(output_writer, todo, ranks)
    except (ValueError, FileNotFoundError) as error:
        print(f"run_helm.py: error: {error}", file=sys.stderr)
        return 2
    except (results.WriteError, results.Interrupted) as error:
        what = f"interrupted ({error})" if isinstance(error, results.Interrupted) else f"error: {error.strerror}"
        kept = output_writer or writer
        saved = f"; {_saved(kept)}" if isinstance(kept, results.ResultsWriter) else ""
        print(f"run_helm.py: {what}{saved}; rerun the same command to resume", file=sys.stderr)
        return 128 + error.signum if isinstance(error, results.Interrupted) else 1
    finally:
        for w in {id(w): w for w in (writer, output_writer) if w is not None}.values():
            w.close()
        distributed.stop()
    return 0


def _saved(writer: results.ResultsWriter) -> str:
    pending = f", {len(writer.pending)} more in {writer.journal}" if writer.pending else ""
    return f"{writer.done} of {len(writer.requests)} results in {writer.output}{pending}"


def encode_all(args, tokenizer, config, requests: list[tuple[int, helm_io.Request]]) -> list[Encoded]:
    """Each request's token ids; a prompt too long for the model is refused."""
    context = getattr(config, "max_position_embeddings", None)
    window = models.attention_window(config)
    encoded = []
    for index, request in requests:
        ids, templated = encode(tokenizer, request.prompt, args.chat_template)
        where = f"{args.input_path}:{request.line}"
        if not ids:
            raise ValueError(f"{where}: the prompt encodes to no tokens")
        if context and len(ids) + request.max_tokens > context:
            raise ValueError(
                f"{where}: prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the model's "
                f"context of {context}"
            )
        if window and len(ids) + request.max_tokens > window:
            # The caches attend over every slot they hold: a sliding window is not applied.
            raise ValueError(
                f"{where}: prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the model's "
                f"sliding attention window of {window}, which the lab does not apply"
            )
        encoded.append(Encoded(index, request, ids, templated))
    return encoded


@dataclass(frozen=True)
class Encoded:
    """A request to serve: its index in the writer's requests, the request, its prompt's token
    ids, and whether the chat template wrapped it."""

    index: int
    request: helm_io.Request
    ids: list[int]
    templated: bool


@dataclass
class Served:
    """What a run did: tokens generated, wall seconds, and the engine's split of them (prefill, decode)."""

    generated: int
    seconds: float
    engine_stats: dict[str, float] = field(default_factory=dict)


def run(args, model, tokenizer, encoded: list[Encoded], policy: Policy | None, writer: results.ResultsWriter,
        engine: str = "reference", halve_on_oom: bool = True) -> Served:
    """Serve the requests and hand each result to `writer` as soon as it exists. Out of GPU
    memory, the batch is halved and the requests without a result are served again (a request's
    result does not depend on its batch)."""
    batch, stats = args.batch_size, {}
    generated, started = 0, time.perf_counter()
    left = encoded
    with tqdm(total=len(encoded), unit="req") as bar:
        def keep(item: Encoded, done: Completion, seconds: float, size: int) -> None:
            nonlocal generated
            writer.add(item.index, helm_io.result_record(item.request, done, seconds, size, item.templated))
            generated += len(done.token_ids)
            bar.update(1)
            bar.set_postfix(tok_s=f"{generated / (time.perf_counter() - started):.1f}")

        while left:
            try:
                _serve(args, model, tokenizer, left, policy, engine, batch, keep, stats)
                break
            except torch.OutOfMemoryError:
                if batch == 1 or not halve_on_oom:
                    raise
                unanswered = set(writer.todo())
                left = [item for item in left if item.index in unanswered]
                log.warning("out of memory at batch %d: going on at batch %d with the %d requests left",
                            batch, batch // 2, len(left))
                batch //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    return Served(generated, time.perf_counter() - started, stats)


def _serve(args, model, tokenizer, encoded: list[Encoded], policy: Policy | None, engine: str, batch: int,
           keep, stats: dict) -> None:
    sampling = [
        Sampling(max_new_tokens=e.request.max_tokens, temperature=e.request.temperature, top_p=e.request.top_p,
                 top_k=args.k, stop=e.request.stop, top_logprobs=e.request.top_logprobs,
                 seed=args.seed * 1_000_003 + e.request.line)
        for e in encoded
    ]
    # Under tensor parallel the step holds collectives: no CUDA graph until one is measured there.
    options = EngineOptions(batch_size=batch, kv_mode=args.kv_mode, attention=args.attention,
                            cuda_graph=False if args.tensor_parallel else None)
    served = make_engine(engine, model, tokenizer, policy, options)
    try:
        served.run([e.ids for e in encoded], sampling, lambda i, done: keep(encoded[i], done, done.seconds, batch))
    finally:
        for name, value in getattr(served, "stats", {}).items():
            stats[name] = stats.get(name, 0) + value
