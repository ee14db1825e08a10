"""The learner as a data-parallel group: which rows of a batch each rank trains on, and the few
collectives that keep every whole-batch quantity whole.

N learner processes form one torch.distributed process group (the default group of each learner
process: gloo on CPUs, NCCL on GPUs). Each rank holds the rows ``[lo, hi)`` of the batch that
:func:`split_rows` gives it, and the whole batch's rewards and prompts (a few numbers and strings
per rollout). Whatever the single learner computes over the whole batch — per-prompt advantages
and their tracker, weight normalisation, effective sample size, AC-Flow's critic values — is
computed from the whole batch on every rank (rewards) or gathered first (``gather``: per-row
values such as the critic's), never per shard; gradients are averaged by torch's own
``DistributedDataParallel`` (``wrap``). So N learners train as one does, up to float32 reduction
order (tests/learner/test_group.py measures it).

Rank 0 publishes and writes checkpoints; every rank holds the same (replicated, DDP) state.
Pure torch: no Ray, no project imports.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
from torch import nn

__all__ = ["LearnerGroup", "Rows", "Sharding", "full_tensor", "local_like", "split_rows"]

Sharding = Literal["ddp", "fsdp"]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded) parameter or state: a DTensor is gathered
    (a collective: every rank calls it, in the same order), a plain tensor returned as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_like(like: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """``full`` (every rank holds it, e.g. read from a checkpoint) laid out as ``like``: this rank's
    shard as a DTensor when ``like`` is one (no communication), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    full = full.to(like.device)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


@dataclass(frozen=True)
class Rows:
    """A rank's rows ``[lo, hi)`` of a batch of ``total`` rollouts."""

    lo: int
    hi: int
    total: int

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def slice(self) -> slice:
        return slice(self.lo, self.hi)


def split_rows(total: int, world_size: int) -> list[Rows]:
    """Contiguous rows per rank, sizes differing by at most one (the lower ranks take the extra)."""
    if world_size < 1 or total < world_size:
        raise ValueError(f"cannot split a batch of {total} rollouts over {world_size} learner ranks "
                         "(every rank needs at least one)")
    q, r = divmod(total, world_size)
    out, lo = [], 0
    for rank in range(world_size):
        hi = lo + q + (1 if rank < r else 0)
        out.append(Rows(lo, hi, total))
        lo = hi
    return out


class LearnerGroup:
    """This process's place in the learner group: rank, world size and the collectives.

    ``LearnerGroup()`` is the single learner (rank 0 of 1): every method is then the identity and
    no process group is needed. ``LearnerGroup.join(...)`` initialises torch.distributed's default
    process group for the N learners (every rank calls it at the same time).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 sharding: Sharding = "ddp") -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        if sharding not in ("ddp", "fsdp"):
            raise ValueError(f"unknown sharding {sharding!r}; valid: 'ddp', 'fsdp'")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.sharding = sharding

    @classmethod
    def join(cls, address: str, port: int, rank: int, world_size: int, timeout_s: float,
             backend: str = "gloo", sharding: Sharding = "ddp") -> LearnerGroup:
        """Initialise the default process group of the N learners (rank 0 hosts the rendezvous at
        ``address:port``); NCCL groups exchange tensors on this process's GPU."""
        import torch.distributed as dist

        if world_size > 1:
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world_size, "cuda" if backend == "nccl" else "cpu", sharding)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Whether the policy's weights are sharded over the ranks (FSDP) rather than replicated."""
        return self.distributed and self.sharding == "fsdp"

    def shard(self, module: nn.Module) -> nn.Module:
        """Shard ``module`` (an ``SD3Velocity``) over the group with FSDP2 (``fully_shard``): each
        transformer block is one unit, the rest the root's. Its parameters become DTensors; every
        forward and backward is then a collective, so every rank must make the same calls."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in module.transformer.transformer_blocks:  # type: ignore[union-attr]
            fully_shard(block, mesh=mesh)
        return fully_shard(module, mesh=mesh)

    def rows(self, total: int) -> Rows:
        return split_rows(total, self.world_size)[self.rank]

    def sum(self, values: list[float]) -> list[float]:
        """Σ over ranks of each value (float64), the same on every rank."""
        return self._all_reduce(values, "SUM")

    def max(self, values: list[float]) -> list[float]:
        """The largest of each value over the ranks (float64), the same on every rank."""
        return self._all_reduce(values, "MAX")

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The whole batch's rows of a per-row tensor (rank order), on every rank: ``local`` holds
        this rank's ``rows(total)``. Shapes (n_rank, ...) → (total, ...), on ``local``'s device."""
        if not self.distributed:
            return local
        import torch.distributed as dist

        parts = split_rows(total, self.world_size)
        if local.shape[0] != parts[self.rank].size:
            raise ValueError(f"rank {self.rank} holds {local.shape[0]} rows, its share of {total} is "
                             f"{parts[self.rank].size}")
        width = max(p.size for p in parts)
        buf = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=self.device)
        buf[:local.shape[0]] = local.detach().to(self.device)
        out = [torch.empty_like(buf) for _ in parts]
        dist.all_gather(out, buf)
        return torch.cat([o[:p.size] for o, p in zip(out, parts, strict=True)]).to(local.device)

    def reshard(self, *modules: object) -> None:
        """Put FSDP modules back into their shards. FSDP2 leaves the root's own parameters whole
        after a forward that no backward follows (π_old's, the reference's, a frozen actor's), and
        the weights are then plain tensors until it reshards: do it before they are read or
        updated in place (EMA, refresh, publish, save)."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for m in modules:
            if isinstance(m, FSDPModule):
                m.reshard()

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` with its gradients averaged over the group by torch's
        ``DistributedDataParallel`` (only its trainable parameters: a LoRA adapter is all that
        moves); the module itself when there is no group. Buffers are constant (positional
        embeddings), so they are not re-broadcast every forward."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, forward_sync_buffers=False)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()
