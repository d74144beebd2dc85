"""Models too large for one GPU (and one that fits, as the baseline), through the user's own
command: `run_helm.py` on one GPU, with `--device_map auto` over N, under `torchrun --tensor_parallel`
over N, or data parallel under torchrun.

The model is a checkpoint folder of the paper's shapes (LLaMA 7B/13B/30B/65B, OPT-30B) with random
fp16 weights (speed does not depend on their values) and SmolLM2's tokenizer, written straight
into safetensors shards from a pool of random numbers: a 130 GB model is written at the disk's
speed, with no model in memory. Jobs: `xsum` (the 500 requests of data/xsum.jsonl, max_tokens
from the committed full-cache summaries, as helm_job.py) or `synthetic:P:N:R` (R greedy requests of
P random tokens and N new tokens). Per run: generated tokens, generation seconds, the engine's
prefill and decode seconds, decode tok/s (tokens after each request's first over the decode
seconds), the batch it ended at (out of memory halves it) and model load seconds. With
`--same-tokens A,B` the greedy texts of two placements are compared request by request.

    python benchmarks/big_models.py --shape llama-13b --tokenizer <SmolLM2 tokenizer folder> \\
        --job synthetic:2048:128:32 --runs "1:h2o:32;dm2:h2o:32;tp2:h2o:32" --out <folder> --label h100x2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helm_job import requests_file  # a sibling script: run as one, its folder is on sys.path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    "tiny": ("llama", dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)),  # smoke runs
    "llama-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)),
    "llama-13b": ("llama", dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)),
    "llama-30b": ("llama", dict(hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52)),
    "llama-65b": ("llama", dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64)),
    "opt-30b": ("opt", dict(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56,
                            word_embed_proj_dim=7168, max_position_embeddings=2048)),
}
POLICIES = {"h2o": ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"], "full": []}
SHARD_BYTES = 4 << 30
GENERATED = re.compile(r"generated (\d+) tokens in ([\d.]+) s: [\d.]+ tok/s \(model load ([\d.]+) s apart\)")
SPLIT = re.compile(r"(\w+) engine: prefill ([\d.]+) s, decode ([\d.]+) s")
HALVED = re.compile(r"out of memory at batch \d+: going on at batch (\d+)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    p.add_argument("--work", default="/tmp/h2o-lab-big", help="folder for checkpoints, requests and outputs")
    p.add_argument("--job", default="xsum", help="xsum[:R] or synthetic:P:N:R")
    p.add_argument("--runs", required=True,
                   help="placement:policy:batch;... with placement 1, dmN (device_map auto), tpN or dpN")
    p.add_argument("--same-tokens", default="", help="A,B: two placements whose greedy texts are compared")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--label", default="gpu")
    return p


def checkpoint(work: Path, shape: str, tokenizer_folder: str) -> Path:
    """A checkpoint folder of `shape` with random fp16 weights (norms 1, biases 0, as transformers
    initialises them), written shard by shard from one pool of random numbers."""
    folder = work / f"{shape}-random"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    arch, dims = SHAPES[shape]
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), dtype="float16", **dims)
    if arch == "llama":
        config.max_position_embeddings = 8192
    with torch.device("meta"):
        names = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    pool = (torch.randn(1 << 26, generator=torch.Generator().manual_seed(0)) * 0.02).half().numpy().tobytes()
    ones = torch.ones(1 << 16, dtype=torch.float16).numpy().tobytes()
    zeros = bytes(len(ones))
    index, shard, size = {}, [], 0
    shards: list[list[tuple[str, torch.Size]]] = []
    for name, shape_ in names.items():
        nbytes = shape_.numel() * 2
        if shard and size + nbytes > SHARD_BYTES:
            shards.append(shard)
            shard, size = [], 0
        shard.append((name, shape_))
        size += nbytes
    shards.append(shard)
    for number, shard in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape_ in shard:
            header[name] = {"dtype": "F16", "shape": list(shape_), "data_offsets": [offset, offset + shape_.numel() * 2]}
            offset += shape_.numel() * 2
            index[name] = file
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(folder / file, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for name, shape_ in shard:
                source = ones if name.endswith("norm.weight") else zeros if name.endswith("bias") else pool
                left = shape_.numel() * 2
                while left:
                    piece = source[: min(left, len(source))]
                    f.write(piece)
                    left -= len(piece)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_requests(tokenizer, prompt: int, new: int, count: int, folder: Path) -> Path:
    """`count` greedy requests of about `prompt` random tokens, `new` tokens each, no stop."""
    generator = torch.Generator().manual_seed(1)
    path = folder / f"synthetic-{prompt}-{new}-{count}.jsonl"
    with path.open("w") as out:
        for _ in range(count):
            ids = torch.randint(1000, len(tokenizer) - 1000, (prompt,), generator=generator).tolist()
            text = tokenizer.decode(tokenizer(tokenizer.decode(ids), add_special_tokens=False).input_ids[:prompt])
            request = {"prompt": text, "temperature": 0.0, "n": 1, "max_tokens": new, "stop": [], "top_p": 1,
                       "top_k_per_token": 1, "echo_prompt": False}
            out.write(json.dumps({"request": request}) + "\n")
    return path


def one(model: Path, arch: str, inputs: Path, work: Path, placement: str, policy: str, batch: int) -> dict:
    kind, gpus = (placement, 1) if placement == "1" else (placement[:2], int(placement[2:]))
    output = work / f"out-{placement}-{policy}-{batch}.jsonl"
    for stale in work.glob(f"{output.name}*"):
        stale.unlink()
    flags = ["--input_path", str(inputs), "--output_path", str(output), "--model_name", str(model),
             "--model_arch", arch, "--fp16", "--batch_size", str(batch), *POLICIES[policy]]
    if kind in ("tp", "dp"):
        command = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", str(gpus), "--master_port", "29612",
                   str(ROOT / "run_helm.py"), *flags, *(["--tensor_parallel"] if kind == "tp" else [])]
    else:
        command = [sys.executable, str(ROOT / "run_helm.py"), *flags, *(["--device_map", "auto"] if kind == "dm" else [])]
    env = {**os.environ, "TQDM_DISABLE": "1",
           "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in range(gpus))}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    row = {"placement": placement, "policy": policy, "batch": batch, "wall_s": round(wall, 1)}
    generated, split = GENERATED.findall(done.stderr), SPLIT.findall(done.stderr)
    if done.returncode != 0 or not generated:
        return {**row, "failed": done.stderr[-1500:]}
    if kind != "dp":  # tensor parallel: every rank serves every request; one rank's numbers
        generated, split = generated[:1], split[:1]
    requests = sum(1 for _ in output.open())
    tokens = sum(int(g[0]) for g in generated)
    seconds = max(float(g[1]) for g in generated)
    decode = max(float(s[2]) for s in split)
    halved = [int(b) for b in HALVED.findall(done.stderr)]
    return {**row, "engine": split[0][0], "batch_end": min(halved, default=batch), "requests": requests,
            "generated": tokens, "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1),
            "prefill_s": round(max(float(s[1]) for s in split), 2), "decode_s": round(decode, 2),
            "decode_tok_s": round((tokens - requests) / decode, 1), "load_s": max(float(g[2]) for g in generated),
            "output": str(output)}


def same_tokens(a: dict, b: dict) -> dict:
    def texts(row: dict) -> list[str]:
        return [json.loads(line)["result"]["choices"][0]["text"] for line in open(row["output"])]
    left, right = texts(a), texts(b)
    return {"compared": f"{a['placement']} vs {b['placement']} ({a['policy']}, batch {a['batch']})",
            "requests": len(left), "identical": sum(x == y for x, y in zip(left, right))}


def main() -> None:
    args = parser().parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    model = checkpoint(work, args.shape, args.tokenizer)
    written = round(time.perf_counter() - began, 1)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    job = args.job.split(":")
    if job[0] == "xsum":
        inputs = requests_file(tokenizer, "xsum", int(job[1]) if len(job) > 1 else 500, work)
    else:
        inputs = synthetic_requests(tokenizer, int(job[1]), int(job[2]), int(job[3]), work)
    rows = []
    for part in filter(None, args.runs.split(";")):
        placement, policy, batch = part.split(":")
        row = one(model, SHAPES[args.shape][0], inputs, work, placement, policy, int(batch))
        print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
        rows.append(row)
    compared = []
    if args.same_tokens:
        a, b = args.same_tokens.split(",")
        pairs = [(x, y) for x in rows for y in rows if x["placement"] == a and y["placement"] == b
                 and x["policy"] == y["policy"] and x["batch"] == y["batch"] and "output" in x and "output" in y]
        compared = [same_tokens(x, y) for x, y in pairs]
        for c in compared:
            print(json.dumps(c), flush=True)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "card": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "shape": args.shape, "job": args.job,
           "checkpoint_write_s": written}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-{args.shape}-{args.job.split(':')[0]}-{args.label}"
    for row in rows:
        row.pop("output", None)
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "runs": rows, "same_tokens": compared},
                                                 indent=1) + "\n")
    table = [f"{args.shape}, job {args.job}; {env['gpus']}x {env['card']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, {env['date']}", "",
             "| placement | policy | batch (end) | engine | generated | tok/s | prefill s | decode s | decode tok/s | load s |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "failed" in r:
            table.append(f"| {r['placement']} | {r['policy']} | {r['batch']} | failed | | | | | | |")
        else:
            table.append(f"| {r['placement']} | {r['policy']} | {r['batch']} ({r['batch_end']}) | {r['engine']} | "
                         f"{r['generated']} | {r['tok_s']:,} | {r['prefill_s']} | {r['decode_s']} | "
                         f"{r['decode_tok_s']:,} | {r['load_s']} |")
    table += [f"\nsame greedy texts, {c['compared']}: {c['identical']} of {c['requests']}" for c in compared]
    (out / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
