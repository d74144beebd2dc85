"""Decode and end-to-end throughput on one GPU: the fast H2O path (`h2o.engine.fast`) against
transformers' full cache, and against NVIDIA kvpress when its command is given.

LLaMA-7B shape with random fp16 weights (speed does not depend on weight values), prompts of
2048 random tokens, 128 new tokens, greedy. For each policy: batch 1, 8 and 32, then the largest
batch that fits in GPU memory. Per run: prefill seconds, decode tokens/s (tokens after the
first over the decode time), end-to-end tokens/s, peak allocated memory, KV bytes, and the
decode time as a fraction of the bandwidth floor (bytes of weights and KV read per step over
the measured device copy bandwidth). Writes <out>/<date>-<label>.json and .md and prints the
table last.

    python benchmarks/throughput.py --out benchmarks/results --label h100
    python benchmarks/throughput.py --peer-cmd "python /path/to/kvpress_gpu.py" ...   # + kvpress
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from h2o.engine.fast import ATTENTION, FastCache, FastEngine, TokenIdsOnly, generate_fast
from h2o.engine.fast import kernels
from h2o.engine.sampling import Sampling
from h2o.policies import make_policy

# The budgets of the comparison: 20% of the prompt, split as the paper does for H2O.
POLICIES = {"h2o": (0.1, 0.1), "local": (0.0, 0.2)}
GiB = 1 << 30
DEVICE = "cuda"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="folder for the .json and .md results")
    p.add_argument("--label", default="gpu", help="file-name suffix, e.g. the card")
    p.add_argument("--policies", default="full,h2o,local", help="comma list of full, h2o, local")
    p.add_argument("--batches", default="1,8,32,128", help="fast-path batches besides the largest that fits")
    p.add_argument("--full-batches", default="1,8,32", help="full-cache batches, then +8 until out of memory")
    p.add_argument("--no-max", action="store_true", help="skip the search for the largest batch")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128, help="new tokens per sequence")
    p.add_argument("--layers", type=int, default=32, help="fewer for a quick smoke run")
    p.add_argument("--prefill-rows", type=int, default=8, help="sequences per prefill slice (fast path)")
    p.add_argument("--profile", default="", help="comma list of batches: time eager and graph decode steps")
    p.add_argument("--peer-cmd", default="", help="shell command running the kvpress peer script")
    p.add_argument("--peer-batches", default="1,8,32,64,128,192,256")
    p.add_argument("--render", nargs="+", default=[], metavar="JSON",
                   help="no runs: merge these results files (e.g. a peers run and ours) into one table")
    return p


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": props.name,
        "memory_GiB": round(props.total_memory / GiB, 1),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "triton": getattr(kernels.triton, "__version__", None),
        "python": platform.python_version(),
    }


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    src = torch.empty(GiB, dtype=torch.float16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(23):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(stop) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * GiB / statistics.median(times)


def build_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: always the full 128 tokens
    return model


def prompts(batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch)
    return torch.randint(100, 30000, (batch, length), generator=g)


def freed() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


class Bench:
    def __init__(self, model: LlamaForCausalLM, args: argparse.Namespace, bandwidth: float) -> None:
        self.model, self.args, self.bandwidth = model, args, bandwidth
        c = model.config
        head_dim = c.hidden_size // c.num_attention_heads
        self.token_bytes = c.num_hidden_layers * c.num_key_value_heads * head_dim * 2 * 2
        # Read per decode step: every weight but the embedding table (only B rows of it are read).
        embedding = model.model.embed_tokens.weight
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding.nbytes

    def row(self, policy: str, batch: int, prefill: float, decode: float, kv_bytes: int, kv_read: int) -> dict:
        new = self.args.new
        floor = (self.weight_bytes + kv_read) / self.bandwidth * (new - 1)
        return {
            "policy": policy, "batch": batch, "prefill_s": round(prefill, 3), "decode_s": round(decode, 3),
            "decode_tok_s": round(batch * (new - 1) / decode, 1),
            "e2e_tok_s": round(batch * new / (prefill + decode), 1),
            "peak_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2),
            "kv_GiB": round(kv_bytes / GiB, 2), "kv_MiB_per_seq": round(kv_bytes / batch / (1 << 20), 1),
            "floor_fraction": round(floor / decode, 3),
        }

    def full(self, batch: int) -> dict:
        """transformers' own generate and DynamicCache, timed as the kvpress script times them."""
        args, model = self.args, self.model
        ids = prompts(batch, args.prompt).to(DEVICE)
        model.set_attn_implementation("sdpa")
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        freed()
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, **kwargs)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        prefill = t1 - t0
        held = batch * (args.prompt + args.new - 1) * self.token_bytes
        mean_read = int(batch * (args.prompt + args.new / 2) * self.token_bytes)
        return self.row("full", batch, prefill, (t2 - t1) - prefill, held, mean_read)

    def fast(self, name: str, batch: int) -> dict:
        args = self.args
        freed()
        result = generate_fast(self.model, prompts(batch, args.prompt).tolist(), args.new,
                               make_policy("h2o", *POLICIES[name]), prefill_rows=args.prefill_rows)
        # The fused step reads every slot's key and value, free or not.
        return self.row(name, batch, result.prefill_seconds, result.decode_seconds, result.kv_bytes, result.kv_bytes)

    def fits(self, name: str, batch: int) -> bool:
        """Whether the fast path's slots, one prefill slice and one decode step fit at `batch`."""
        freed()
        try:
            self._probe(name, batch)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            freed()

    @torch.inference_mode()
    def _probe(self, name: str, batch: int) -> None:
        args, model = self.args, self.model
        cache = FastCache(make_policy("h2o", *POLICIES[name]), model.config.num_hidden_layers,
                          [args.prompt] * batch, DEVICE)
        model.set_attn_implementation(ATTENTION)
        rows = min(batch, args.prefill_rows)
        ids = prompts(rows, args.prompt).to(DEVICE)
        positions = torch.arange(args.prompt, device=DEVICE).expand(rows, -1)
        cache.begin_prefill(slice(0, rows), positions, torch.ones_like(ids, dtype=torch.bool))
        model(input_ids=ids, position_ids=positions, cache=cache, eviction_cache=cache,
              use_cache=True, logits_to_keep=1)
        step = torch.full((batch, 1), args.prompt, device=DEVICE)
        cache.begin_decode(step)
        model(input_ids=torch.zeros_like(step), position_ids=step, cache=cache, eviction_cache=cache,
              use_cache=True)
        torch.cuda.synchronize()

    def largest(self, name: str) -> int:
        """The largest multiple of 8 that `fits`, starting from an estimate of the free memory."""
        args, c = self.args, self.model.config
        budget = make_policy("h2o", *POLICIES[name]).budget(args.prompt)
        per_seq = (budget.total + 1) * (self.token_bytes + c.num_hidden_layers * c.num_key_value_heads * 13)
        free = torch.cuda.get_device_properties(0).total_memory - torch.cuda.memory_allocated()
        batch = max(8, int((free - 4 * GiB) / per_seq) // 8 * 8)
        if self.fits(name, batch):
            while self.fits(name, batch + 8):
                batch += 8
        else:
            while batch > 8 and not self.fits(name, batch):
                batch -= 8
        return batch

    def profile(self, name: str, batch: int) -> dict:
        """Decode step times at `batch` on one prefilled cache: eager and CUDA graph, torch path
        and kernels, and the kernels of one eager step by GPU time."""
        args = self.args
        out = {"policy": name, "batch": batch}
        freed()
        # One step per `advance`; a run of one new token per request leaves every row prefilled.
        engine = FastEngine(self.model, TokenIdsOnly(), make_policy("h2o", *POLICIES[name]), batch, steps_per_check=1,
                            prefill_tokens=args.prefill_rows * args.prompt, use_kernels=True)
        engine.run(prompts(batch, args.prompt).tolist(), [Sampling(max_new_tokens=1)] * batch)
        for tag, use_kernels in (("torch", False), ("kernels", True)):
            # Both paths make the same decisions on the same state, so they can share it.
            engine.cache.use_kernels, engine.graph, engine.cuda_graph = use_kernels, None, False
            engine.advance()
            out[f"eager_ms_{tag}"] = _step_ms(engine, 5)
            if use_kernels:
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    engine.advance()
                    torch.cuda.synchronize()
                out["profile"] = prof.key_averages().table(sort_by="device_time_total", row_limit=14)
            engine.cuda_graph = True
            engine.advance()  # captures the step (eager ones ran above) and replays it
            out[f"graph_ms_{tag}"] = _step_ms(engine, 20)
        out["floor_ms"] = round((self.weight_bytes + engine.cache.kv_bytes()) / self.bandwidth * 1e3, 2)
        return out


def _step_ms(engine: FastEngine, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.advance()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / steps * 1e3, 2)


def peers(args: argparse.Namespace) -> list[dict]:
    """The kvpress script in its own process (its own transformers), one JSON object a line,
    echoed as it comes."""
    env = dict(os.environ, PROMPT=str(args.prompt), GEN=str(args.new), BS=args.peer_batches)
    rows = []
    with subprocess.Popen(args.peer_cmd, shell=True, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("{"):
                rows.append(json.loads(line))
    return rows


def run_policy(bench: Bench, name: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    run = bench.full if name == "full" else (lambda b: bench.fast(name, b))
    batches = [int(b) for b in (args.full_batches if name == "full" else args.batches).split(",") if b]
    for batch in batches:
        try:
            rows.append(run(batch))
        except torch.OutOfMemoryError:
            rows.append({"policy": name, "batch": batch, "oom": True})
            freed()
        print(json.dumps(rows[-1]), flush=True)
    if args.no_max:
        return rows
    if name == "full":
        # Grow by 8 until the first run out of memory.
        batch = max(batches)
        while not rows[-1].get("oom") and batch < 1024:
            batch += 8
            try:
                rows.append(bench.full(batch))
            except torch.OutOfMemoryError:
                rows.append({"policy": name, "batch": batch, "oom": True})
                freed()
            print(json.dumps(rows[-1]), flush=True)
        return rows
    batch = bench.largest(name)
    for _ in range(3):  # the probe is one step; the real run also holds a CUDA graph's memory
        try:
            rows.append(dict(bench.fast(name, batch), largest=True))
            print(json.dumps(rows[-1]), flush=True)
            rows.append({"policy": name, "batch": batch + 8, "probe_oom": True})
            break
        except torch.OutOfMemoryError:
            rows.append({"policy": name, "batch": batch, "oom": True})
            freed()
            batch -= 8
    return rows


def _best(rows: list[dict], policy: str, key: str) -> dict | None:
    done = [r for r in rows if r.get("policy") == policy and key in r]
    return max(done, key=lambda r: r[key]) if done else None


def summary(results: dict) -> list[str]:
    """The comparisons the benchmark exists for, computed from the rows above."""
    rows = results.get("rows", [])
    peers = [dict(r, batch=r["bs"]) for r in results.get("peers", []) if "bs" in r]
    h2o_decode, h2o_e2e = _best(rows, "h2o", "decode_tok_s"), _best(rows, "h2o", "e2e_tok_s")
    if h2o_decode is None:
        return []
    lines = ["", "Summary:", ""]
    largest = max(r["batch"] for r in rows if r.get("policy") == "h2o" and "decode_tok_s" in r)
    lines.append(f"- h2o's largest batch: {largest}.")
    full = _best(rows, "full", "decode_tok_s")
    if full:
        lines.append(f"- h2o's best decode, {h2o_decode['decode_tok_s']:,} tok/s (batch {h2o_decode['batch']}), is "
                     f"{h2o_decode['decode_tok_s'] / full['decode_tok_s']:.1f}x the full cache's best, "
                     f"{full['decode_tok_s']:,} (batch {full['batch']}).")
    for name in sorted({r["policy"] for r in peers}):
        decode, e2e = _best(peers, name, "decode_tok_s"), _best(peers, name, "e2e_tok_s")
        if decode:
            who = "the peer script's full cache" if name == "full" else f"kvpress {name}"
            lines.append(f"- against {who} at its best: decode {h2o_decode['decode_tok_s'] / decode['decode_tok_s']:.2f}x "
                         f"({decode['decode_tok_s']:,}, batch {decode['batch']}), end to end "
                         f"{h2o_e2e['e2e_tok_s'] / e2e['e2e_tok_s']:.2f}x ({e2e['e2e_tok_s']:,}, batch {e2e['batch']}).")
    for other in ("local", "full"):
        same = []
        for r in rows:
            twin = next((o for o in rows if o.get("policy") == other and o.get("batch") == r.get("batch")
                         and "decode_s" in o), None)
            if r.get("policy") == "h2o" and "decode_s" in r and twin:
                same.append(f"{r['batch']}: {r['decode_s'] / twin['decode_s'] - 1:+.1%}")
        if same:
            lines.append(f"- h2o's decode time over {other}'s at the same batch: {', '.join(same)}.")
    lines.append(f"- decode at h2o's best batch: {h2o_decode['floor_fraction']:.0%} of the bandwidth floor.")
    return lines


def table(results: dict) -> str:
    lines = [
        f"{results['env']['card']}, torch {results['env']['torch']}, transformers "
        f"{results['env']['transformers']}, {results['env']['date']}; copy bandwidth "
        f"{results['copy_bandwidth_GBs']:.0f} GB/s; prompt {results['prompt']}, {results['new']} new tokens",
        "",
        "| policy | batch | prefill s | decode tok/s | end-to-end tok/s | peak GiB | KV GiB | KV MiB/seq | floor fraction |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if r.get("oom") or r.get("probe_oom"):
            what = "out of memory" if r.get("oom") else "does not fit (probe)"
            lines.append(f"| {r['policy']} | {r['batch']} | {what} | | | | | | |")
            continue
        mark = " (largest)" if r.get("largest") else ""
        lines.append(
            f"| {r['policy']} | {r['batch']}{mark} | {r['prefill_s']} | {r['decode_tok_s']:,} | "
            f"{r['e2e_tok_s']:,} | {r['peak_GiB']} | {r['kv_GiB']} | {r['kv_MiB_per_seq']} | {r['floor_fraction']} |"
        )
    if results.get("peers"):
        peer = results.get("peer_env", {})
        lines += ["", f"Peers: kvpress {peer.get('kvpress')}, transformers {peer.get('transformers')}, "
                  f"attention {peer.get('attn')}, same torch and card:", "",
                  "| policy | batch | prefill s | decode tok/s | end-to-end tok/s | peak GB |", "|---|---|---|---|---|---|"]
        for r in results["peers"]:
            if "policy" not in r:
                continue
            if r.get("oom"):
                lines.append(f"| {r['policy']} | {r['bs']} | out of memory | | | |")
            else:
                lines.append(f"| {r['policy']} | {r['bs']} | {r['prefill_s']} | {r['decode_tok_s']:,} | "
                             f"{r['e2e_tok_s']:,} | {r['peak_GB']} |")
    lines += summary(results)
    for p in results.get("profiles", []):
        lines += ["", f"Decode step, {p['policy']} at batch {p['batch']}: eager {p['eager_ms_torch']} ms (torch) / "
                  f"{p['eager_ms_kernels']} ms (kernels); CUDA graph {p['graph_ms_torch']} ms (torch) / "
                  f"{p['graph_ms_kernels']} ms (kernels); floor {p['floor_ms']} ms"]
    return "\n".join(lines)


def render(paths: list[str], out: Path, label: str) -> None:
    """One table from several results files of one run on one card: environment, bandwidth and
    our rows from the last file that has rows, peers from any."""
    merged: dict = {"sources": paths, "rows": [], "profiles": []}
    for path in paths:
        results = json.loads(Path(path).read_text())
        for key in ("peers", "peer_env"):
            if results.get(key):
                merged[key] = results[key]
        if results.get("rows"):
            merged.update({k: v for k, v in results.items() if k not in ("peers", "peer_env")})
        merged.setdefault("env", results["env"])
        merged.setdefault("copy_bandwidth_GBs", results["copy_bandwidth_GBs"])
        merged.setdefault("prompt", results["prompt"])
        merged.setdefault("new", results["new"])
    stem = out / f"{merged['env']['date'][:10]}-{label}"
    stem.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n")
    text = table(merged)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)


def main() -> int:
    args = parser().parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        render(args.render, out, args.label)
        return 0
    results = {"env": environment(), "prompt": args.prompt, "new": args.new, "layers": args.layers,
               "command": " ".join(shlex.quote(a) for a in sys.argv)}
    print(json.dumps(results["env"]), flush=True)
    results["copy_bandwidth_GBs"] = copy_bandwidth() / 1e9
    print(f"copy bandwidth {results['copy_bandwidth_GBs']:.0f} GB/s", flush=True)
    if args.peer_cmd:  # before our model takes the memory
        rows = peers(args)
        results["peer_env"] = next((r for r in rows if "policy" not in r), {})
        results["peers"] = [r for r in rows if "policy" in r]
    results["rows"], results["profiles"] = [], []
    policies = [p for p in args.policies.split(",") if p]
    profiles = [int(b) for b in args.profile.split(",") if b]
    if policies or profiles:
        model = build_model(args.layers)
        bench = Bench(model, args, results["copy_bandwidth_GBs"] * 1e9)
        # Compile the kernels outside the timings (same prompt length: same specializations).
        for name in POLICIES:
            generate_fast(model, prompts(1, args.prompt).tolist(), 4, make_policy("h2o", *POLICIES[name]))
        for name in policies:
            results["rows"] += run_policy(bench, name, args)
        for batch in profiles:
            for name in POLICIES:
                results["profiles"].append(bench.profile(name, batch))
                print(results["profiles"][-1].pop("profile", ""), flush=True)
    stem = out / f"{datetime.date.today().isoformat()}-{args.label}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    stem.with_suffix(".md").write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
