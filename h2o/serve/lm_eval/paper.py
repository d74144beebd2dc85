"""The paper's three lm-eval steps, with its scripts' names and flags (h2o_hf/*.py):

1. `generate_task_data.py`: lm-eval runs a task against a model that records each
   (context, continuation) request as a line, and answers nothing real;
2. `run_lm_eval_harness.py`: each line scored with the full or the small cache, token
   log-probabilities written;
3. `evaluate_task_result.py`: lm-eval runs the task again against a model that looks each request
   up in those results and answers with the continuation's mean log-probability (the paper's,
   so its accuracy is length-normalised) or, with `--loglikelihood sum`, lm-eval's own sum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from h2o.serve.lm_eval.cli import refusing_bad_input
from h2o.serve.lm_eval.paper_io import key, read_requests, read_results, request_line, write_lines
from h2o.serve.lm_eval.tasks import BadInput, check_names, stage

if TYPE_CHECKING:  # the model module imports lm-eval and torch: only where a step needs them
    from h2o.serve.lm_eval.model import LabLM


def _evaluate(model: object, task: str, num_fewshot: int, limit: int | None = None) -> dict:
    """lm-eval's evaluation of one lab task with `model` (an lm-eval LM)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    check_names([task], "--task-name")
    with tempfile.TemporaryDirectory(prefix="h2o-lm-eval-tasks-") as folder:
        manager = TaskManager(include_path=str(stage([task], Path(folder))))
        return simple_evaluate(model=model, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                               task_manager=manager, random_seed=0, numpy_random_seed=1234,
                               torch_random_seed=1234, fewshot_random_seed=1234)


def generate_task_data(output_file: str, task: str, num_fewshot: int, limit: int | None = None) -> int:
    """Step 1: the task's requests, one line per distinct (context, continuation); their count."""
    from lm_eval.api.model import LM

    lines: dict[str, dict] = {}

    class Recorder(LM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            for context, continuation in (r.args for r in requests):
                line = request_line(context, continuation)
                lines.setdefault(key(line), line)
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            raise BadInput(f"--task-name {task}: asks for perplexity, which the paper's steps do not score")

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            raise BadInput(f"--task-name {task}: a generation task; these steps score loglikelihoods")

    _evaluate(Recorder(), task, num_fewshot, limit)
    write_lines(output_file, lines.values())
    return len(lines)


def run_requests(input_path: str, output_path: str, lm: LabLM) -> int:
    """Step 2: every request of `input_path` scored by `lm` (a `LabLM`), results written at once.
    The full cache and mask mode score every token after the first, in one forward (the paper's
    output); drop mode prefills the context and scores the continuation."""
    requests = read_requests(input_path)
    drop = lm.eviction is not None and lm.eviction.mode == "drop"
    pairs = [lm._encode_pair(r["context"], r["continuation"]) for r in requests]
    texts = [context + continuation for context, continuation in pairs]
    scored = lm.score_tokens(pairs if drop else [(text[:1], text[1:]) for text in texts])
    cache = lm.kv_cache()
    results = []
    for request, text, (_, continuation), one in zip(requests, texts, pairs, scored):
        unscored = [None] * (len(text) - len(one.logprobs))
        top = [{lm.tokenizer.convert_ids_to_tokens(i): v} for i, v in zip(one.top_ids, one.top_logprobs)]
        results.append({"request": request, "result": {
            "choices": [{"text": request["prompt"], "logprobs": {
                "tokens": lm.tokenizer.convert_ids_to_tokens(text), "token_logprobs": unscored + one.logprobs,
                "top_logprobs": unscored + top, "text_offset": []}, "finish_reason": "length"}],
            "continuation_tokens": len(continuation), "kv_cache": cache}})
    write_lines(output_path, results)
    return len(results)


def evaluate_results(result_file: str, task: str, num_fewshot: int, loglikelihood: str = "mean",
                     limit: int | None = None) -> dict:
    """Step 3: lm-eval's results for `task` from the scores in `result_file`."""
    from lm_eval.api.model import LM

    if loglikelihood not in ("mean", "sum"):
        raise BadInput(f"--loglikelihood: {loglikelihood!r} is not one of mean, sum")
    results = read_results(result_file)

    class Lookup(LM):
        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            answers = []
            for context, continuation in (r.args for r in requests):
                found = results.get(key(request_line(context, continuation)))
                if found is None:
                    raise BadInput(f"{result_file}: no result for the {task} request {(context + continuation)[-60:]!r}; "
                                   f"score generate_task_data.py's lines for --task-name {task} "
                                   f"--num-fewshot {num_fewshot}")
                logprobs = found["choices"][0]["logprobs"]
                n = found["continuation_tokens"]
                values = logprobs["token_logprobs"][-n:]
                tokens = logprobs["tokens"][-n:]
                greedy = all(next(iter(t)) == token for t, token in zip(logprobs["top_logprobs"][-n:], tokens))
                answers.append((sum(values) / n if loglikelihood == "mean" else sum(values), greedy))
            return answers

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            raise BadInput(f"--task-name {task}: asks for perplexity, which the paper's steps do not score")

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            raise BadInput(f"--task-name {task}: a generation task; these steps score loglikelihoods")

    return _evaluate(Lookup(), task, num_fewshot, limit)


def _command(prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
             argv: list[str] | None) -> int:
    """Run one step; bad input is one line and exit status 2."""
    args = parser.parse_args(argv)
    return refusing_bad_input(prog, lambda: run(args))


def _limit(parser: argparse.ArgumentParser) -> None:
    """`--limit`, the same in steps 1 and 3."""
    parser.add_argument("--limit", type=int, default=None, help="the first N documents of the task only")


def generate_main(argv: list[str] | None = None) -> int:
    """generate_task_data.py"""
    p = argparse.ArgumentParser(prog="generate_task_data.py", description="Step 1: a task's requests as lines.")
    p.add_argument("--output-file", default="input.jsonl")
    p.add_argument("--task-name", default="copa")
    p.add_argument("--num-fewshot", type=int, default=0)
    _limit(p)

    def run(args: argparse.Namespace) -> None:
        count = generate_task_data(args.output_file, args.task_name, args.num_fewshot, args.limit)
        print(f"{count} requests -> {args.output_file}")

    return _command("generate_task_data.py", p, run, argv)


def run_main(argv: list[str] | None = None) -> int:
    """run_lm_eval_harness.py"""
    from h2o import models
    from h2o.engine.reference.evicting_cache import KV_MODES
    from h2o.policies import POLICIES

    p = argparse.ArgumentParser(prog="run_lm_eval_harness.py",
                                description="Step 2: score request lines with the full or the small KV cache.")
    p.add_argument("--input-path", required=True)
    p.add_argument("--output-path", required=True)
    p.add_argument("--enable_small_cache", action="store_true", help="evict with --policy; else the full cache")
    p.add_argument("--model-name", default=models.DEFAULT_MODEL, help="model folder, .gguf or cached hub id")
    p.add_argument("--model-type", default="llama", help=f"one of {', '.join(models.SUPPORTED_ARCHS)}")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--heavy_ratio", type=float, default=0.1)
    p.add_argument("--recent_ratio", type=float, default=0.1)
    p.add_argument("--policy", default="h2o", choices=sorted(POLICIES))
    p.add_argument("--kv_mode", default="mask", choices=KV_MODES,
                   help="mask: the paper's whole-text mask, one forward; drop: real eviction, token by token")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")

    def run(args: argparse.Namespace) -> None:
        from h2o.serve.lm_eval.model import LabLM

        small = {"policy": args.policy, "heavy_ratio": args.heavy_ratio, "recent_ratio": args.recent_ratio,
                 "kv_mode": args.kv_mode} if args.enable_small_cache else {}
        read_requests(args.input_path)  # bad lines before the weights load
        lm = LabLM(pretrained=args.model_name, model_arch=args.model_type, cache_dir=args.cache_dir,
                   batch_size=args.batch_size, device=args.device, dtype=args.dtype, **small)
        count = run_requests(args.input_path, args.output_path, lm)
        print(f"{count} results -> {args.output_path}")

    return _command("run_lm_eval_harness.py", p, run, argv)


def evaluate_main(argv: list[str] | None = None) -> int:
    """evaluate_task_result.py"""
    p = argparse.ArgumentParser(prog="evaluate_task_result.py", description="Step 3: lm-eval's metrics from results.")
    p.add_argument("--result-file", default="result.jsonl")
    p.add_argument("--task-name", default="copa")
    p.add_argument("--model-type", default="llama", help="accepted for the paper's scripts; the results carry the tokens")
    p.add_argument("--debug", action="store_true", help="accepted for the paper's scripts")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--loglikelihood", default="mean", choices=("mean", "sum"),
                   help="mean: the paper's (length-normalised accuracy); sum: lm-eval's own")
    p.add_argument("--output", default=None, help="also write lm-eval's results as JSON here")
    _limit(p)

    def run(args: argparse.Namespace) -> None:
        from lm_eval.utils import make_table

        results = evaluate_results(args.result_file, args.task_name, args.num_fewshot, args.loglikelihood, args.limit)
        print(make_table(results))
        if args.output:
            write_json(args.output, {k: results[k] for k in ("results", "n-samples", "configs", "versions")
                                     if k in results})

    return _command("evaluate_task_result.py", p, run, argv)


def write_json(path: str, record: dict) -> None:
    """lm-eval's results as indented JSON."""
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
