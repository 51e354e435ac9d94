"""The serial executor: runs a stage's blocks in this process, overlapping I/O with compute.

While block *k* is computed, the reads of the next ``prefetch`` blocks are already in flight and the
write of block *k-1* is still draining (tensorstore does both on its own threads), so a serial run
spends its time in the model, not waiting for storage. The Ray executor (``volseg.actors``) has the
same ``run`` signature and gives the same bytes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from volseg.geometry import Block
from volseg.inference.job import BlockStage, Pending
from volseg.inference.ledger import BlockLedger

#: Called after each block is durably written: (block, seconds it took, who ran it).
BlockDone = Callable[[Block, float, str], None]


@dataclass
class RunStats:
    """What a run did: blocks and voxels written, wall time, each block's outcome, blocks retried, and
    blocks that failed every attempt (id → last error)."""

    blocks_done: int = 0
    voxels: int = 0
    seconds: float = 0.0
    outcomes: dict[int, Any] = field(default_factory=dict)
    retried: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    workers: int = 1
    startup_seconds: float = 0.0  # of ``seconds``: starting workers and shipping them the stage

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0

    def merge(self, other: RunStats) -> RunStats:
        """The stats of two passes run one after the other."""
        return RunStats(self.blocks_done + other.blocks_done, self.voxels + other.voxels,
                        self.seconds + other.seconds, {**self.outcomes, **other.outcomes},
                        self.retried + other.retried, {**self.failed, **other.failed},
                        max(self.workers, other.workers), self.startup_seconds + other.startup_seconds)


class SerialExecutor:
    """Runs blocks one after another in this process, with read-ahead and write-behind."""

    name = "serial"

    def __init__(self, prefetch: int = 2) -> None:
        self.prefetch = prefetch

    def run(self, stage: BlockStage, blocks: Iterable[Block], on_done: BlockDone | None = None,
            ledger: BlockLedger | None = None) -> RunStats:
        """Run ``stage`` on every block; mark each done in ``ledger`` once its writes are durable."""
        stats = RunStats()
        begin = time.perf_counter()
        reads: deque[tuple[Block, Pending]] = deque()
        writes: deque[tuple[Block, Sequence[Pending], Any, float]] = deque()
        upcoming = iter(blocks)

        def fill_reads() -> None:
            while len(reads) <= self.prefetch:
                block = next(upcoming, None)
                if block is None:
                    return
                reads.append((block, stage.read(block)))

        def drain_writes(keep: int) -> None:
            while len(writes) > keep:
                block, pending, outcome, started = writes.popleft()
                for p in pending:
                    p.result()
                if ledger is not None:
                    ledger.mark(stage.name, block.id, outcome)
                stats.outcomes[block.id] = outcome
                stats.blocks_done += 1
                stats.voxels += block.core.size
                if on_done is not None:
                    on_done(block, time.perf_counter() - started, self.name)

        fill_reads()
        while reads:
            block, pending_read = reads.popleft()
            started = time.perf_counter()
            data = pending_read.result()
            fill_reads()
            computed = stage.compute(block, data)
            writes.append((block, stage.write(block, computed), stage.outcome(block, computed), started))
            drain_writes(keep=1)
        drain_writes(keep=0)
        stats.seconds = time.perf_counter() - begin
        return stats
