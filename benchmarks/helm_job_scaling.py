"""Data parallel scaling of the XSUM job: `torchrun --nproc_per_node N run_helm.py ...`, the
user's own command, on 1, 2, 4 (and 8) GPUs.

The job of helm_job.py (500 XSUM requests, max_tokens from full-cache summaries) on a LLaMA-7B
shape with random fp16 weights, saved once as a checkpoint folder with SmolLM2's tokenizer so that
every rank loads it as a user's model. Per run: the generated tokens of all ranks over the slowest
rank's generation seconds (model load apart), the wall seconds of the whole command (load and
merge included), and the scaling efficiency against N x one GPU. Writes
<out>/<date>-helm-job-scaling-<label>.json and .md.

    python benchmarks/helm_job_scaling.py --tokenizer <SmolLM2 tokenizer folder> --gpus 1,2,4 --label h100x4
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
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from helm_job import build_model, requests_file  # noqa: E402

GENERATED = re.compile(r"generated (\d+) tokens in ([\d.]+) s")
POLICIES = {"h2o": ["--enable_small_cache", "--heavy_ratio", "0.1", "--recent_ratio", "0.1"], "full": []}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--work", default="/tmp/h2o-lab-scaling", help="folder for the checkpoint and outputs")
    p.add_argument("--gpus", default="1,2,4")
    p.add_argument("--runs", default="h2o:256;full:64", help="policy:batch per rank;...")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--label", default="gpus")
    return p


def checkpoint(work: Path, tokenizer_folder: str) -> Path:
    folder = work / "llama-7b-random"
    if not (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        build_model(len(tokenizer), 32).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.cuda.empty_cache()
    return folder


def one(model: Path, inputs: Path, work: Path, gpus: int, policy: str, batch: int) -> dict:
    output = work / f"out-{policy}-{gpus}.jsonl"
    for stale in work.glob(f"{output.name}*"):
        stale.unlink()
    command = [shutil.which("torchrun") or "torchrun", "--nproc_per_node", str(gpus), "--master_port", "29611",
               str(ROOT / "run_helm.py"), "--input_path", str(inputs), "--output_path", str(output),
               "--model_name", str(model), "--fp16", "--batch_size", str(batch), *POLICIES[policy]]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    ranks = [(int(t), float(s)) for t, s in GENERATED.findall(done.stderr)]
    if done.returncode != 0 or len(ranks) != gpus:
        return {"policy": policy, "gpus": gpus, "batch": batch, "failed": done.stderr[-2000:]}
    lines = sum(1 for _ in output.open())
    tokens, seconds = sum(t for t, _ in ranks), max(s for _, s in ranks)
    return {"policy": policy, "gpus": gpus, "batch": batch, "results": lines, "generated": tokens,
            "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1), "wall_s": round(wall, 1),
            "rank_seconds": [round(s, 2) for _, s in ranks]}


def main() -> None:
    args = parser().parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = checkpoint(work, args.tokenizer)
    inputs = requests_file(AutoTokenizer.from_pretrained(args.tokenizer), args.n, work)
    rows = []
    for part in filter(None, args.runs.split(";")):
        policy, batch = part.split(":")
        for gpus in (int(g) for g in args.gpus.split(",")):
            row = one(model, inputs, work, gpus, policy, int(batch))
            single = next((r for r in rows if r["policy"] == policy and r["gpus"] == 1 and "tok_s" in r), None)
            if single and "tok_s" in row:
                row["efficiency"] = round(row["tok_s"] / (gpus * single["tok_s"]), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "card": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date'][:10]}-helm-job-scaling-{args.label}"
    (out / f"{stem}.json").write_text(json.dumps({"environment": env, "runs": rows}, indent=1) + "\n")
    table = [f"{env['gpus']}x {env['card']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}",
             "", "| policy | GPUs | batch per rank | generated | tok/s | seconds | efficiency | wall s (load, merge) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "tok_s" in r:
            table.append(f"| {r['policy']} | {r['gpus']} | {r['batch']} | {r['generated']} | {r['tok_s']:,} | "
                         f"{r['seconds']} | {r.get('efficiency', 1.0)} | {r['wall_s']} |")
        else:
            table.append(f"| {r['policy']} | {r['gpus']} | {r['batch']} | failed | | | | |")
    (out / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
