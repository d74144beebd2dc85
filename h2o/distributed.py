"""Data parallel over ranks started by `torchrun` or `accelerate launch` (torch.distributed).

Every rank answers every world_size-th outstanding request into its own part file, resumable like
a single run; rank 0 then merges the parts into the output in input order and removes them. A
single process (no WORLD_SIZE in the environment) never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from h2o import helm_io


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
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def barrier(ranks: Ranks) -> None:
    if ranks.parallel:
        dist.barrier()


def stop(ranks: Ranks) -> None:
    if ranks.parallel and dist.is_initialized():
        dist.destroy_process_group()


def merge(output: str | Path, todo: list[helm_io.Request], ranks: Ranks) -> None:
    """Rank 0: append the parts' results to `output` in input order, then remove the parts."""
    parts = [Ranks(r, ranks.world).part(output) for r in range(ranks.world)]
    lines = [p.read_text(encoding="utf-8").splitlines() for p in parts]
    if sum(len(x) for x in lines) != len(todo):
        raise ValueError(f"{output}: the ranks' parts hold {sum(len(x) for x in lines)} of {len(todo)} results")
    with open(output, "a", encoding="utf-8") as out:
        for i in range(len(todo)):
            out.write(lines[i % ranks.world][i // ranks.world] + "\n")
        out.flush()
        os.fsync(out.fileno())
    for p in parts:
        p.unlink()
