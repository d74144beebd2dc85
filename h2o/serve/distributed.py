"""Ranks started by `torchrun` or `accelerate launch` (torch.distributed): data parallel, tensor
parallel, or both.

The ranks form groups of `tp` consecutive ranks, each group holding one copy of the model (one rank
each without tensor parallel). Every group answers every groups-th outstanding request into its own
part file, resumable like a single run (`h2o.serve.results`), written by the group's first rank; rank 0,
which holds the output, then hands the parts' results to it and removes them. A single group
writes the output itself. A single process (no WORLD_SIZE in the environment) never touches
torch.distributed.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.utils.store import barrier as store_barrier

from h2o import jsonl
from h2o.serve import results

# Long enough for the slowest group to finish its share: torchrun ends every rank when one fails.
BARRIER_TIMEOUT_S = 7 * 24 * 3600

_store: dist.Store | None = None
# Each barrier and process group takes fresh store keys; every rank takes them in the same order.
_keys = itertools.count()


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1  # ranks per model copy (tensor parallel)

    @classmethod
    def from_env(cls, tp: int = 1) -> "Ranks":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)), tp)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def group(self) -> int:
        return self.rank // self.tp

    @property
    def groups(self) -> int:
        return self.world // self.tp

    @property
    def writes(self) -> bool:
        """The group's first rank writes its results; the others serve the same requests beside it."""
        return self.rank % self.tp == 0

    def share(self, items: list) -> list:
        return items[self.group :: self.groups]

    def part(self, output: str | Path) -> Path:
        return Path(f"{output}.part{self.group}-of-{self.groups}")


def start(ranks: Ranks, device: str) -> None:
    global _store
    if not ranks.parallel:
        return
    _store = next(dist.rendezvous("env://"))[0]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if ranks.tp > 1:
        # transformers shards the model over the default process group: make it this rank's group.
        store = dist.PrefixStore(f"h2o-lab/group{ranks.group}-{next(_keys)}/", _store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=ranks.rank % ranks.tp,
                                world_size=ranks.tp, **({"device_id": torch.device(device)} if cuda else {}))


def barrier(ranks: Ranks) -> None:
    """Every rank of every group."""
    if ranks.parallel:
        store_barrier(dist.PrefixStore(f"h2o-lab/barrier-{next(_keys)}/", _store), ranks.world, "all",
                      barrier_timeout=BARRIER_TIMEOUT_S)


def stop() -> None:
    global _store
    _store = None
    if dist.is_initialized():
        dist.destroy_process_group()


def merge(writer: results.ResultsWriter, todo: list[int], ranks: Ranks) -> None:
    """Rank 0: hand the parts' results to the output's writer, then remove the parts."""
    firsts = [replace(ranks, rank=group * ranks.tp) for group in range(ranks.groups)]
    for first in firsts:
        part, mine = first.part(writer.output), first.share(todo)
        lines = list(jsonl.objects(part, ValueError)) if mine else []  # no results, maybe no file
        if len(lines) != len(mine):
            raise ValueError(f"{part}: holds {len(lines)} of its {len(mine)} results")
        for index, line in zip(mine, lines):
            writer.add(index, line.record)
    for first in firsts:
        part = first.part(writer.output)
        for path in (part, Path(f"{part}.lock")):
            path.unlink(missing_ok=True)
