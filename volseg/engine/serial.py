"""The serial executor: runs a stage's blocks in this process, overlapping I/O with compute.

While block *k* is computed, the reads of the next ``prefetch`` blocks are already in flight and the
write of block *k-1* is still draining (tensorstore does both on its own threads), so a serial run
spends its time in the model, not waiting for storage. The Ray executor (:mod:`volseg.engine.ray`) has
the same ``run`` signature and gives the same bytes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import (
    FATAL_ERRORS,
    BlockDone,
    BlockStage,
    Pending,
    RunStats,
    closing_pass,
    error_summary,
    keeps_outcomes,
    write_block,
)
from volseg.geometry import Block


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
        """Run ``stage`` on every block (taken from ``blocks`` one at a time, as read-ahead needs them);
        mark each done in ``ledger`` once its writes are durable."""
        stats = RunStats()
        with closing_pass(stats, ledger):
            self._run(stage, blocks, on_done, ledger, stats)
        return stats

    def _run(self, stage: BlockStage, blocks: Iterable[Block], on_done: BlockDone | None,
             ledger: BlockLedger | None, stats: RunStats) -> None:
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
            stats.record(block, outcome if keeps_outcomes(stage) else None)
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
