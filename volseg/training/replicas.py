"""Data parallelism inside the training loop: which crops of a step a replica computes, the random
streams of every crop, and loss statistics summed over the replicas.

Every step has one **global batch** (``batch_size`` crops per domain), cut into equal contiguous shards::

    step t, one domain, batch_size 8, 2 replicas:   [c0 c1 c2 c3 | c4 c5 c6 c7]
                                                        rank 0        rank 1

Crop ``i`` of step ``t`` draws its box, prompt subsets, augmentation and contrastive points from its own
streams, spawned from ``SeedSequence(seed, spawn_key=(domain, t, i))``. So a crop is the same crop, with
the same views, whichever replica computes it and whether or not the run was resumed: ``W`` replicas of
``batch_size / W`` crops see exactly the batch one process sees, and resuming needs no random state.

The losses are batch statistics (sums over all pixels of the batch, see :mod:`volseg.training.losses`); each
sums its statistics over the replicas with :meth:`Replica.total` before dividing, so every replica
computes the loss of the global batch and, after ``DistributedDataParallel`` averages the gradients, the
update is the one-process update of the global batch (to float rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from volseg.errors import ConfigError

#: The ``domain`` key of the crop streams.
SOURCE_STREAM, TARGET_STREAM = 0, 1
#: The stream of the adaptation guard's probe crops (:mod:`volseg.training.promptdas.guard`).
GUARD_STREAM = 2
#: The stream of the target crops the teacher's BatchNorm statistics are calibrated on.
CALIBRATION_STREAM = 3


@dataclass(frozen=True)
class SampleRandom:
    """The random streams of one 2D sample: ``rng`` (prompt subsets, contrastive points) and
    ``generator`` (augmentation)."""

    rng: np.random.Generator
    generator: torch.Generator

    @classmethod
    def from_seed(cls, seed: np.random.SeedSequence) -> SampleRandom:
        numpy_seed, torch_seed = seed.spawn(2)
        return cls(np.random.default_rng(numpy_seed),
                   torch.Generator().manual_seed(int(torch_seed.generate_state(1)[0])))

    @classmethod
    def spawn(cls, seed: int, n: int) -> list[SampleRandom]:
        """``n`` independent streams from ``seed`` (for batches built outside the training loop)."""
        return [cls.from_seed(s) for s in np.random.SeedSequence(seed).spawn(n)]


def crop_streams(seed: int, domain: int, step: int, index: int, slices: int
                 ) -> tuple[np.random.Generator, list[SampleRandom]]:
    """The streams of crop ``index`` of the global batch of ``step``: one for its box, one
    :class:`SampleRandom` per z slice (each slice is one 2D sample)."""
    box, *samples = np.random.SeedSequence(seed, spawn_key=(domain, step, index)).spawn(1 + slices)
    return np.random.default_rng(box), [SampleRandom.from_seed(s) for s in samples]


@dataclass(frozen=True)
class Replica:
    """This process's place among ``world_size`` data-parallel replicas; the default, rank 0 of 1, is one
    process training alone (then nothing here communicates)."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0 … {self.world_size - 1}")

    def shard(self, global_batch: int) -> range:
        """The indices, in the global batch, of the crops this replica computes."""
        if global_batch % self.world_size:
            raise ConfigError(
                f"batch_size {global_batch} is not a multiple of cluster.workers {self.world_size}; the global "
                "batch is split evenly among the workers.",
                "set batch_size to a multiple of cluster.workers, or change cluster.workers.")
        n = global_batch // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)

    def total(self, local: torch.Tensor) -> torch.Tensor:
        """The sum of ``local`` (statistics of this replica's shard) over all replicas.

        Its value is the global sum; its gradient is that of ``world_size · local``, so that once
        ``DistributedDataParallel`` has averaged the replicas' gradients, a loss ``f(total(s))`` has the
        gradient ``f'(S) · Σ_r ∂s_r`` of the one-process loss ``f(S)``. The sum is all-reduced without
        autograd, so replicas need not agree on which statistics have gradients.
        """
        if self.world_size == 1:
            return local
        summed = local.detach().clone()
        torch.distributed.all_reduce(summed)
        return summed + self.world_size * (local - local.detach())

    def same_everywhere(self, values: torch.Tensor) -> bool:
        """Whether every replica holds exactly (bit for bit) the same ``values``."""
        if self.world_size == 1:
            return True
        low, high = values.detach().clone(), values.detach().clone()
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        return bool(torch.equal(low, high))

    def share_buffers(self, module: nn.Module) -> None:
        """Give every replica rank 0's running statistics of norm layers (BatchNorm's running mean and
        variance, which each replica updates from its own shard on CPU; SyncBatchNorm on GPUs keeps them
        equal), so that the EMA teachers that average them stay identical. Other buffers never change."""
        if self.world_size == 1:
            return
        buffers = [b for m in module.modules() if getattr(m, "track_running_stats", False)
                   for b in m.buffers(recurse=False) if b.is_floating_point()]
        if not buffers:
            return
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        torch.distributed.broadcast(flat, src=0)
        start = 0
        for b in buffers:
            b.copy_(flat[start : start + b.numel()].view_as(b))
            start += b.numel()


#: One process training alone.
ONE_PROCESS = Replica()
