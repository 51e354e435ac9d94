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
from volseg.inference.lease import LeaseLostError
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


#: Errors that stop a run instead of failing one block (another run took its outputs over).
FATAL_ERRORS: tuple[type[BaseException], ...] = (LeaseLostError,)


def error_summary(error: BaseException) -> str:
    """``Type: last line of the message`` (a remote error's last line is its own message, after the
    traceback Ray puts before it), at most 300 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


def write_block(stage: BlockStage, block: Block, computed: Any, ledger: BlockLedger | None) -> Sequence[Pending]:
    """Start a block's writes, once the run is known to still hold its outputs."""
    if ledger is not None:
        ledger.confirm_leases()
    return stage.write(block, computed)


class SerialExecutor:
    """Runs blocks one after another in this process, with read-ahead and write-behind.

    A block whose read, compute or write raises is tried again, up to ``max_attempts`` times in all;
    one that fails every attempt is reported in :attr:`RunStats.failed` (id → the last error, one
    line), and the other blocks still run, as on the Ray executor."""

    name = "serial"

    def __init__(self, prefetch: int = 2, max_attempts: int = 3) -> None:
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.device_kind = "cpu"  # where blocks are computed (``cuda`` when the stages' model is on a GPU)

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

        def finish(block: Block, outcome: Any, started: float) -> None:
            if ledger is not None:
                ledger.mark(stage.name, block.id, outcome)
            stats.outcomes[block.id] = outcome
            stats.blocks_done += 1
            stats.voxels += block.core.size
            if on_done is not None:
                on_done(block, time.perf_counter() - started, self.name)

        def drain_writes(keep: int) -> None:
            while len(writes) > keep:
                block, pending, outcome, started = writes.popleft()
                try:
                    for p in pending:
                        p.result()
                except FATAL_ERRORS:
                    raise
                except Exception as error:
                    self._retry(stage, block, error, stats, ledger, finish, started)
                    continue
                finish(block, outcome, started)

        fill_reads()
        while reads:
            block, pending_read = reads.popleft()
            started = time.perf_counter()
            try:
                data = pending_read.result()
                fill_reads()
                computed = stage.compute(block, data)
                writes.append((block, write_block(stage, block, computed, ledger), stage.outcome(block, computed),
                               started))
            except FATAL_ERRORS:
                raise
            except Exception as error:
                self._retry(stage, block, error, stats, ledger, finish, started)
                fill_reads()
                continue
            drain_writes(keep=1)
        drain_writes(keep=0)
        stats.seconds = time.perf_counter() - begin
        return stats

    def _retry(self, stage: BlockStage, block: Block, error: Exception, stats: RunStats,
               ledger: BlockLedger | None, finish: Callable[[Block, Any, float], None], started: float) -> None:
        """Run a block that failed once again, synchronously, until it succeeds or has failed
        ``max_attempts`` times (then it is reported in ``stats.failed``)."""
        for _ in range(self.max_attempts - 1):
            stats.retried += 1
            try:
                computed = stage.compute(block, stage.read(block).result())
                for pending in write_block(stage, block, computed, ledger):
                    pending.result()
                outcome = stage.outcome(block, computed)
            except FATAL_ERRORS:
                raise
            except Exception as again:
                error = again
                continue
            finish(block, outcome, started)
            return
        stats.failed[block.id] = error_summary(error)
