"""Data parallel over ranks: who owns which prompt groups, and metrics and loss divisors summed over ranks.

One object, `DP`, that `rl_step` and the trainer call the same way at every world size; with one rank every
method is the identity (no collective runs). The process group itself comes from
`trainer/fsdp.init_process_group_if_needed` (torchrun's env vars, or a world of 1).

    dp = DP.current()
    mine, first = dp.shard(prompts)               # this rank's block of the global batch, its first index
    everyone = dp.gather(samples)                 # all ranks' samples, in rank order (for reward metrics)
    mine = dp.balance(everyone)                   # whole prompt groups, balanced by tokens, same count per rank
    dp.sum(x); dp.mean_metrics(metrics)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridrl.types import Sample


@dataclass(frozen=True)
class DP:
    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> "DP":
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return DP(dist.get_rank(), dist.get_world_size())
        return DP()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> tuple[list, int]:
        """This rank's block of a list every rank holds whole, and the index of its first item."""
        k = -(-len(items) // self.world)
        return items[self.rank * k:(self.rank + 1) * k], self.rank * k

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world == 1:
            return list(items)
        import torch.distributed as dist
        out: list = [None] * self.world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def balance(self, samples: list[Sample]) -> list[Sample]:
        """This rank's share of all samples: whole prompt groups (group statistics stay on one rank), the same
        number of groups on every rank, tokens as even as a greedy longest-first packing makes them."""
        if self.world == 1:
            return list(samples)
        return [s for g in balanced_groups(samples, self.world)[self.rank] for s in g]

    def sum(self, x: float | torch.Tensor) -> float:
        if self.world == 1:
            return float(x)
        import torch.distributed as dist
        t = torch.tensor([float(x)], dtype=torch.float64, device=_device())
        dist.all_reduce(t)
        return float(t.item())

    def mean_metrics(self, metrics: dict) -> dict:
        """Every rank's metrics averaged (timing/*: the slowest rank); the same dict on every rank."""
        if self.world == 1:
            return metrics
        import torch.distributed as dist
        parts: list = [None] * self.world
        dist.all_gather_object(parts, metrics)
        out = {}
        for key in parts[0]:
            values = [float(p[key]) for p in parts if key in p]
            out[key] = max(values) if key.startswith("timing/") else sum(values) / len(values)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()


def _device() -> torch.device:
    import torch.distributed as dist
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def balanced_groups(samples: list[Sample], world: int) -> list[list[list[Sample]]]:
    """Split samples into `world` parts of whole groups (same `group` id), equal group counts, tokens balanced:
    groups longest first, each to the part with the fewest tokens among those not yet full."""
    groups: dict[int, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    if len(groups) % world:
        from hybridrl import HybridRLError
        raise HybridRLError(f"{len(groups)} prompt groups cannot be split evenly over {world} ranks: make "
                            "data.train_batch_size a multiple of the number of ranks")
    per_rank = len(groups) // world
    tokens = lambda g: sum(len(s.prompt_ids) + len(s.response_ids) for s in g)  # noqa: E731
    parts: list[list[list[Sample]]] = [[] for _ in range(world)]
    load = [0] * world
    for g in sorted(groups.values(), key=lambda g: (-tokens(g), g[0].group)):
        r = min((r for r in range(world) if len(parts[r]) < per_rank), key=lambda r: (load[r], r))
        parts[r].append(g)
        load[r] += tokens(g)
    for p in parts:
        p.sort(key=lambda g: g[0].group)      # keep the global order inside a rank
    return parts
