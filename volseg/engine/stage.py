"""The stage contract: what every block of one pass does, and what runs a pass, independent of who runs it.

A :class:`BlockStage` splits a block's work into steps an executor can overlap: ``read`` (async),
``compute``, ``write`` (async) and ``outcome`` (a small JSON value the executor returns and the done-mark
keeps). An :class:`Executor` (:mod:`volseg.engine.serial` in this process, :mod:`volseg.engine.ray` on
Ray actors) only decides which block runs where and when. A stage pickles small (volumes as their specs,
a model as its weights), so Ray ships it to each actor once. :func:`run_stage` runs one pass: the
blocks not yet marked done in the ledger, as a lazy stream, by any executor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from volseg.engine.lease import LeaseLostError
from volseg.engine.ledger import BlockLedger, DoneMarks
from volseg.geometry import Block, BlockGrid, Box


class Pending(Protocol):
    def result(self) -> Any: ...


@dataclass(frozen=True)
class Resolved:
    """A :class:`Pending` whose value is already there (the read of a stage that reads nothing)."""

    value: Any = None

    def result(self) -> Any:
        return self.value


class BlockStage(Protocol):
    """One pass over blocks. ``name`` keys its done-marks; ``read_box`` is the box of voxels (volume
    coordinates) a block may read, core and context: what it reads never reaches past it, so anything
    routed to a block by place (prompts, relabel tables) is what lies in that box. ``compute`` may use the
    torch device an executor assigns with ``to(device)`` (stages without a model ignore it).

    A stage whose outcomes are read back from the done-marks by whoever needs them (the instance merge
    reads each super-block's from storage) sets ``keep_outcomes = False``: the executor then keeps none
    in the driver, which holds nothing per block (see :func:`keeps_outcomes`)."""

    name: str

    def read_box(self, block: Block) -> Box: ...

    def read(self, block: Block) -> Pending: ...

    def compute(self, block: Block, data: Any) -> Any: ...

    def write(self, block: Block, computed: Any) -> Sequence[Pending]: ...

    def outcome(self, block: Block, computed: Any) -> Any: ...

    def to(self, device: str) -> None: ...


def keeps_outcomes(stage: BlockStage) -> bool:
    """Whether the driver keeps ``stage``'s outcomes in :attr:`RunStats.outcomes` (default yes)."""
    return bool(getattr(stage, "keep_outcomes", True))


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
    startup_seconds: float = 0.0  # of ``seconds``: until every worker had started and held the stage

    def record(self, block: Block, outcome: Any) -> None:
        """Count a block durably written; its outcome is kept unless ``None`` (a pass of millions of
        blocks without outcomes keeps nothing per block)."""
        self.blocks_done += 1
        self.voxels += block.core.size
        if outcome is not None:
            self.outcomes[block.id] = outcome

    def merge(self, other: RunStats) -> RunStats:
        """The stats of two passes run one after the other."""
        return RunStats(self.blocks_done + other.blocks_done, self.voxels + other.voxels,
                        self.seconds + other.seconds, {**self.outcomes, **other.outcomes},
                        self.retried + other.retried, {**self.failed, **other.failed},
                        max(self.workers, other.workers), self.startup_seconds + other.startup_seconds)


class Executor(Protocol):
    """What runs a stage over blocks: :class:`~volseg.engine.serial.SerialExecutor` or
    :class:`~volseg.engine.ray.RayExecutor`."""

    def run(self, stage: BlockStage, blocks: Iterable[Block], on_done: BlockDone | None = None,
            ledger: BlockLedger | None = None) -> RunStats: ...


#: Errors that stop a run instead of failing one block (another run took its outputs over).
FATAL_ERRORS: tuple[type[BaseException], ...] = (LeaseLostError,)


def error_summary(error: BaseException) -> str:
    """``Type: last line of the message`` (a remote error's last line is its own message, after the
    traceback Ray puts before it), at most 300 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:300]


@contextmanager
def closing_pass(stats: RunStats, ledger: BlockLedger | None) -> Iterator[None]:
    """Time a pass into ``stats.seconds`` and write its last done-marks when it ends, however it ends
    (Ctrl-C and errors included: every block marked is durably written)."""
    begin = time.perf_counter()
    try:
        yield
    finally:
        stats.seconds = time.perf_counter() - begin
        if ledger is not None:
            ledger.flush()


def write_block(stage: BlockStage, block: Block, computed: Any, ledger: BlockLedger | None) -> Sequence[Pending]:
    """Start a block's writes, once the run is known to still hold its outputs."""
    if ledger is not None:
        ledger.confirm_leases()
    return stage.write(block, computed)


def run_block(stage: BlockStage, block: Block) -> Any:
    """All of a block's steps, synchronously; returns its outcome once its writes are durable."""
    computed = stage.compute(block, stage.read(block).result())
    for pending in stage.write(block, computed):
        pending.result()
    return stage.outcome(block, computed)


@dataclass
class StageResult:
    """One pass: its stats (outcomes of every block, including those done before) and how many
    blocks a previous run had already finished."""

    name: str
    stats: RunStats
    resumed: int


#: Told, before a pass starts, how many blocks it still has to run.
PassStart = Callable[[int], None]


def pending_blocks(grid: BlockGrid, done: DoneMarks | None = None) -> Iterator[Block]:
    """The blocks of ``grid`` not in ``done``, in id order (the grid's C order), each made only when the
    executor asks for it: the driver never holds the list, whatever the number of blocks."""
    ids = range(grid.num_blocks) if done is None else done.pending(grid.num_blocks)
    return (grid.block(block_id) for block_id in ids)


def run_stage(executor: Executor, stage: BlockStage, grid: BlockGrid, ledger: BlockLedger | None = None,
              on_done: BlockDone | None = None, on_start: PassStart | None = None) -> StageResult:
    """Run ``stage`` on the blocks of ``grid`` not marked done in ``ledger`` (all of them without one),
    as a lazy stream; the result's outcomes include those of the blocks done before, read from their
    marks. ``on_start`` is told how many blocks are left before the first one runs."""
    done = ledger.done(stage.name, outcomes=keeps_outcomes(stage)) if ledger is not None else DoneMarks()
    if on_start is not None:
        on_start(grid.num_blocks - len(done))
    stats = executor.run(stage, pending_blocks(grid, done), on_done=on_done, ledger=ledger)
    stats.outcomes = {**done.outcomes, **stats.outcomes}
    return StageResult(stage.name, stats, len(done))
