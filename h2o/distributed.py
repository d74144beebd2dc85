"""Data parallel over ranks started by `torchrun` or `accelerate launch` (torch.distributed).

Every rank answers every world_size-th outstanding request into its own part file, resumable like
a single run (`h2o.results`); rank 0, which holds the output, then hands the parts' results to
it and removes them. A
single process (no WORLD_SIZE in the environment) never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from h2o import jsonl, results


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def share(self, items: list) -> list:
        return items[self.rank :: self.world]

    def part(self, output: str | Path) -> Path:
        return Path(f"{output}.part{self.rank}-of-{self.world}")


def start(ranks: Ranks, device: str) -> None:
    if ranks.parallel:
        if device.startswith("cuda"):
            # NCCL's collectives (the barriers) run on the current device: this rank's own.
            torch.cuda.set_device(torch.device(device))
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()


def merge(writer: results.ResultsWriter, todo: list[int], ranks: Ranks) -> None:
    """Rank 0: hand the parts' results to the output's writer, then remove the parts."""
    for rank in range(ranks.world):
        part, mine = Ranks(rank, ranks.world).part(writer.output), Ranks(rank, ranks.world).share(todo)
        lines = list(jsonl.objects(part, ValueError))
        if len(lines) != len(mine):
            raise ValueError(f"{part}: holds {len(lines)} of its {len(mine)} results")
        for index, line in zip(mine, lines):
            writer.add(index, line.record)
    for rank in range(ranks.world):
        part = Ranks(rank, ranks.world).part(writer.output)
        for path in (part, Path(f"{part}.lock")):
            path.unlink(missing_ok=True)
