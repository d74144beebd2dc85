"""The XSUM job as users run it, on one GPU: run_helm.py's own code path (`h2o.serve.serve.run`) over the
500 requests of data/xsum.jsonl, for the reference engine and the fast engine (full, h2o, local).
`--task multi_news` runs the 200 long requests of data/multi_news.jsonl instead, each with its own
max_tokens (512: the random weights never stop early, so every request generates all of them).

LLaMA-7B shape with random fp16 weights built on the GPU (speed does not depend on weight values;
the model is built once and its load reported apart), SmolLM2's tokenizer (so the prompts have
their real lengths) and the requests as HELM asks them (temperature 0.3, stop "###"), except that
each request's max_tokens is the token length of a full-cache summary in
reports/xsum-smollm2/summaries.jsonl (cycled over the 500), so that output lengths vary as real
ones do (XSUM only). Per run: generated tokens over generation seconds, the fast engine's prefill and decode
seconds, and the fraction of the compute floor (2 x parameters that multiply each token x
(prompt + generated tokens) over the card's measured fp16 matrix-product rate). Writes
<out>/<date>-helm-job-<label>.json and .md and prints the table.

    python benchmarks/helm_job.py --tokenizer <folder with SmolLM2's tokenizer> --label h100 [--task multi_news]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from h2o.lab.points import LOCAL, Point
from h2o.serve import helm_io, results
from h2o.serve.options import ServeOptions
from h2o.serve.prompts import encode_all
from h2o.serve.serve import run

ROOT = Path(__file__).resolve().parents[1]

# h2o: 10% heavy + 10% recent; local: 20% recent.
POINTS = {"full": Point("full", 1.0), "h2o": Point("h2o", 0.2), "local": Point(LOCAL, 0.2)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--label", default="gpu")
    p.add_argument("--task", default="xsum", choices=("xsum", "multi_news", "needle"), help="data/<task>.jsonl")
    p.add_argument("--n", type=int, default=500, help="the task's first requests (all it has, if fewer)")
    p.add_argument("--fast", default="full:64,128,256;h2o:64,128,256,384;local:128,256,384",
                   help="policy:batches;... for the fast engine (a batch may be auto: as many rows as the pool holds)")
    p.add_argument("--reference", default="h2o:32,64", help="policy:batches;... for the reference engine")
    p.add_argument("--reference-n", type=int, default=128, help="requests for the (slow) reference engine")
    p.add_argument("--reference-attention", default="sdpa", help="the reference engine's --attention")
    p.add_argument("--layers", type=int, default=32, help="fewer for a quick smoke run")
    p.add_argument("--memory_gib", type=float, default=None,
                   help="cap this process at G GiB of the card (a smaller card's memory); the KV pool sizes within it")
    return p


def requests_file(tokenizer, task: str, n: int, folder: Path) -> Path:
    """data/<task>.jsonl's first n requests; XSUM's with max_tokens from the committed full-cache
    summaries, the others' as they are."""
    lengths = None
    if task == "xsum":
        summaries = [json.loads(line)["full"] for line in (ROOT / "reports/xsum-smollm2/summaries.jsonl").open()]
        lengths = [max(1, len(tokenizer(text, add_special_tokens=False).input_ids)) for text in summaries]
    path = folder / f"{task}-job.jsonl"
    with path.open("w") as out, (ROOT / "data" / f"{task}.jsonl").open() as source:
        for i, line in enumerate(source):
            if i == n:
                break
            record = json.loads(line)
            if lengths:
                record["request"]["max_tokens"] = lengths[i % len(lengths)]
            out.write(json.dumps(record) + "\n")
    return path


def build_model(vocab: int, layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab,
                         max_position_embeddings=8192)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: each request runs to max_tokens or "###"
    return model


def matmul_rate() -> float:
    """fp16 matrix-product FLOP/s of this card (8192^3, median of 10 after warm-up)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn_like(a)
    times = []
    for i in range(13):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        stop.record()
        stop.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(stop) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2]


def one_run(model, tokenizer, inputs: Path, engine: str, policy: str, batch: int | None, n: int, attention: str,
            floor_rate: float, multiplied: int) -> dict:
    options = POINTS[policy].serve_options(ServeOptions(
        output_path=str(inputs.with_suffix(".out.jsonl")), input_path=str(inputs), batch_size=batch, sample_num=n,
        engine=engine, fp16=True, attention=attention))
    output = Path(options.output_path)
    output.unlink(missing_ok=True)
    requests = helm_io.read_requests(options.input_path)[:n]
    encoded = encode_all(options, tokenizer, model.config, list(enumerate(requests)))
    prompt_tokens = sum(len(e.ids) for e in encoded)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"engine": engine, "policy": policy, "batch": "auto" if batch is None else batch, "requests": n}
    try:
        torch.cuda.synchronize()
        with results.ResultsWriter(output, requests) as writer:
            served = run(options, model, tokenizer, encoded, options.build_policy(), writer, engine, halve_on_oom=False)
    except torch.OutOfMemoryError:
        return {**row, "oom": True}
    floor = 2 * multiplied * (prompt_tokens + served.generated) / floor_rate
    row.update(generated=served.generated, prompt_tokens=prompt_tokens, seconds=round(served.seconds, 2),
               tok_s=round(served.generated / served.seconds, 1), floor_fraction=round(floor / served.seconds, 3),
               peak_GiB=round(torch.cuda.max_memory_allocated() / (1 << 30), 1))
    stats = served.engine_stats
    row.update(prefill_s=round(stats["prefill_s"], 2), decode_s=round(stats["decode_s"], 2))
    if "prompt_tokens" in stats:  # the fast engine's own counts
        row.update(padding=round(1 - stats["prompt_tokens"] / max(1, stats["padded_tokens"]), 3),
                   prefill_TFLOPs=round(2 * multiplied * stats["prompt_tokens"] / stats["prefill_s"] / 1e12, 1),
                   backoffs=stats["backoffs"], rows=stats["rows"],
                   busy_rows=round(stats["busy_row_steps"] / max(1, stats["steps"]), 1))
    output.unlink(missing_ok=True)
    return row


def plan(text: str) -> list[tuple[str, int]]:
    runs = []
    for part in filter(None, text.split(";")):
        policy, batches = part.split(":")
        runs += [(policy, None if b == "auto" else int(b)) for b in batches.split(",")]  # auto: what the pool holds
    return runs


def markdown(env: dict, rows: list[dict]) -> str:
    requests = ("XSUM requests (temperature 0.3), max_tokens from full-cache summaries" if env["task"] == "xsum"
                else f"{env['task']} requests as exported (greedy, their max_tokens)")
    lines = [f"{env['card']}, torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, "
             f"{env['date']}; fp16 matrix product {env['matmul_TFLOPs']} TFLOP/s; LLaMA-7B shape, random fp16, "
             f"SmolLM2 tokenizer, {requests}",
             "", "| engine | policy | batch | requests | generated | tok/s | seconds | prefill s | decode s "
             "| prefill TFLOP/s | padding | floor fraction | peak GiB | rows | busy rows a step | out-of-memory back-offs |",
             "|" + "---|" * 16]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['engine']} | {r['policy']} | {r['batch']} | {r['requests']} | out of memory |"
                         + " |" * 11)
            continue
        cells = [r["engine"], r["policy"], r["batch"], r["requests"], r["generated"], f"{r['tok_s']:,}",
                 r["seconds"], r.get("prefill_s", ""), r.get("decode_s", ""), r.get("prefill_TFLOPs", ""),
                 r.get("padding", ""), r["floor_fraction"], r["peak_GiB"], r.get("rows", ""), r.get("busy_rows", ""),
                 r.get("backoffs", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parser().parse_args()
    if args.memory_gib is not None:
        # Before anything is allocated; the fast engine's pool sizing reads the cap back.
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * (1 << 30) / total))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rate = matmul_rate()
    loading = time.perf_counter()
    model = build_model(len(tokenizer), args.layers)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - loading
    # Weights that multiply every token: all but the input embedding table (a lookup).
    multiplied = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "triton": getattr(sys.modules.get("triton"), "__version__", None), "python": platform.python_version(),
           "matmul_TFLOPs": round(rate / 1e12, 1), "model_build_s": round(load_s, 1), "layers": args.layers,
           "task": args.task}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-helm-job-{args.label}" + ("" if args.task == "xsum" else f"-{args.task}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        inputs = requests_file(tokenizer, args.task, args.n, Path(folder))
        available = sum(1 for _ in inputs.open())
        # Warm-up: kernels compiled, allocator settled.
        one_run(model, tokenizer, inputs, "fast", "h2o", 8, 8, "eager", rate, multiplied)
        for engine, runs, n in (("fast", plan(args.fast), available),
                                ("reference", plan(args.reference), min(args.reference_n, available))):
            for policy, batch in runs:
                row = one_run(model, tokenizer, inputs, engine, policy, batch, n, args.reference_attention, rate,
                              multiplied)
                print(json.dumps(row), flush=True)
                rows.append(row)
                write_tables(out / stem, env, rows)  # a stopped benchmark keeps every run it finished
    print(markdown(env, rows))


def write_tables(stem: Path, env: dict, rows: list[dict]) -> None:
    results.write_whole(stem.with_name(stem.name + ".json"),
                        json.dumps({"environment": env, "runs": rows}, indent=1) + "\n")
    results.write_whole(stem.with_name(stem.name + ".md"), markdown(env, rows))


if __name__ == "__main__":
    main()
