"""The serial executor: runs a job's blocks in this process, overlapping I/O with compute.

While block *k* is computed, the reads of the next ``prefetch`` blocks are already in flight and the
write of block *k-1* is still draining (tensorstore does both on its own threads), so a serial run
spends its time in the model, not waiting for storage. The Ray executor (``volseg.actors``) has the
same ``run`` signature.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from volseg.geometry import Block
from volseg.inference.job import Pending, SegmentationJob

#: Called after each block is durably written: (block, seconds it took).
BlockDone = Callable[[Block, float], None]


@dataclass
class RunStats:
    """What a run did: blocks and voxels written, wall time, and blocks that failed (by id)."""

    blocks_done: int = 0
    voxels: int = 0
    seconds: float = 0.0
    failed: list[int] = field(default_factory=list)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


class SerialExecutor:
    """Runs blocks one after another in this process, with read-ahead and write-behind."""

    def __init__(self, prefetch: int = 2) -> None:
        self.prefetch = prefetch

    def run(self, job: SegmentationJob, blocks: Iterable[Block],
            on_done: BlockDone | None = None) -> RunStats:
        blocks = list(blocks)
        stats = RunStats()
        begin = time.perf_counter()
        reads: deque[tuple[Block, Pending]] = deque()
        writes: deque[tuple[Block, Sequence[Pending], float]] = deque()
        upcoming = iter(blocks)

        def fill_reads() -> None:
            while len(reads) <= self.prefetch:
                block = next(upcoming, None)
                if block is None:
                    return
                reads.append((block, job.read(block)))

        def drain_writes(keep: int) -> None:
            while len(writes) > keep:
                block, pending, started = writes.popleft()
                for p in pending:
                    p.result()
                stats.blocks_done += 1
                stats.voxels += block.core.size
                if on_done is not None:
                    on_done(block, time.perf_counter() - started)

        fill_reads()
        while reads:
            block, pending_read = reads.popleft()
            started = time.perf_counter()
            data = pending_read.result()
            fill_reads()
            blended = job.compute(block, data)
            writes.append((block, job.write(block, blended), started))
            drain_writes(keep=1)
        drain_writes(keep=0)
        stats.seconds = time.perf_counter() - begin
        return stats
