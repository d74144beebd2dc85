"""Data-parallel scaling of the fast H2O path: tokens/s on 1..N GPUs, one torchrun rank a GPU.

    torchrun --nproc_per_node N benchmarks/scaling.py [--batch 128] [--prompt 2048] [--new 128]

Every rank builds the LLaMA-7B-shaped model of throughput.py (random fp16 weights) on its own
GPU and generates `--batch` prompts of its own with H2O at 10% + 10%, as `run_helm.py` does
under torchrun (requests split across ranks, no communication while generating). Rank 0 prints
one JSON line: the ranks' summed tokens over the slowest rank's time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from h2o.engine.fast import generate_fast
from h2o.policies import make_policy
from throughput import build_model, prompts  # a sibling script: run as one, its folder is on sys.path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128, help="prompts per GPU")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new", type=int, default=128)
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(32)
    policy = make_policy("h2o", 0.1, 0.1)
    generate_fast(model, prompts(2, 256).tolist(), 4, policy)  # compile kernels, warm allocator
    batch = prompts(args.batch + rank, args.prompt)[: args.batch].tolist()  # other prompts on each rank
    dist.barrier()
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = generate_fast(model, batch, args.new, policy)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stats = torch.tensor([seconds, out.decode_seconds, sum(map(len, out.token_ids))], device="cuda", dtype=torch.float64)
    slowest = stats.clone()
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    if rank == 0:
        tokens = stats[2].item()
        print(json.dumps({
            "gpus": world, "card": torch.cuda.get_device_name(), "batch_per_gpu": args.batch,
            "prompt": args.prompt, "new_tokens": args.new, "tokens": int(tokens),
            "seconds": round(slowest[0].item(), 3), "e2e_tok_s": round(tokens / slowest[0].item(), 1),
            "decode_tok_s": round(world * args.batch * (args.new - 1) / slowest[1].item(), 1),
        }), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
