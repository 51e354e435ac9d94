"""The Ray executor: blocks run on predictor actors, with backpressure, retries and actor replacement.

Each :class:`BlockWorker` actor holds one GPU (``num_gpus``) or a few CPUs, receives every stage once
(the model's weights travel through the object store, not a shared file system) and runs up to
``in_flight`` tasks at a time on threads: reads and writes of one block overlap the model's work on
another, while a lock keeps one block at a time on the device. The driver takes blocks from a lazy
stream as actors have room and keeps at most ``in_flight`` tasks queued per actor, so its memory does
not grow with the number of blocks, a slow actor is never buried under work and a lost actor loses little.

A task carries one block, or several when blocks are quick: the driver sizes tasks from the seconds
blocks have taken so far, so that a task takes about :data:`TASK_SECONDS` (at most :data:`MAX_BATCH`
blocks). A block of seconds of GPU work goes alone; tiny blocks share one task's cost (about half a
millisecond of the driver's time), which is what lets one driver feed dozens of actors.

Actors start without the driver waiting for them: a block goes to an actor once it is placed and holds
every stage, so actors that wait for resources (an autoscaling cluster adding nodes) join the run when
they are placed. Unless ``execution.actors`` fixes their number, the executor also sizes the actor pool
to the cluster every :data:`GROW_SECONDS` and adds actors as nodes join.

Failures: a block that raises is retried (on any actor) up to ``max_attempts`` times; an actor that dies
(a killed process, a lost node) is replaced and its blocks go back into the queue, counted as an
attempt. Blocks that fail every attempt are reported by id in :attr:`RunStats.failed`; the rest of the
run completes. An actor answers for a block once its writes completed; only then does the driver mark
it done in the ledger. Output bytes equal the serial executor's: a block's result depends only on the
block.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from volseg.allocator import MALLOC_ENVIRONMENT
from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import (
    FATAL_ERRORS,
    BlockDone,
    BlockStage,
    RunStats,
    closing_pass,
    error_summary,
    keeps_outcomes,
    write_block,
)
from volseg.errors import VolsegError
from volseg.geometry import Block


class ActorSetupError(VolsegError):
    """Actors could not receive a stage (e.g. a path that exists on the driver's node only)."""


#: Seconds the driver waits for a result before checking on the actors again.
POLL_SECONDS = 1.0
#: The seconds of block work one task aims at, and the most blocks it carries.
TASK_SECONDS = 0.05
MAX_BATCH = 64
#: How often a growing pool compares itself with the cluster's resources.
GROW_SECONDS = 10.0
#: After this long with no actor placed, say that the run waits for the cluster.
PLACEMENT_WARNING_SECONDS = 60.0

#: One block's answer from an actor: (written, outcome or error summary, seconds).
BlockAnswer = tuple[bool, Any, float]


class BlockWorker:
    """A Ray actor running blocks of the stages it was given (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        from volseg.allocator import keep_freed_memory

        keep_freed_memory()
        self.threads = max(1, threads)
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.stages: dict[str, tuple[BlockStage, BlockLedger | None]] = {}
        self.compute_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id()}

    def set_stage(self, key: str, stage: BlockStage, ledger: BlockLedger | None) -> None:
        """Receive a stage, and the ledger whose leases its blocks confirm before they write. torch is
        set to the actor's threads only once a stage brought it in (unpickling a model imports it): an
        actor of stages without a model (instances, meshes, merges, a no-op) never loads torch."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        stage.to(self.device)
        self.stages[key] = (stage, ledger)

    def process(self, key: str, blocks: list[Block]) -> list[BlockAnswer]:
        """Run ``blocks`` one after the other; one answer each. A block that raises is answered with its
        error and the others still run; an error that ends the run (another run took the outputs over)
        fails the task."""
        stage, ledger = self.stages[key]
        return [self._run(stage, ledger, block) for block in blocks]

    def _run(self, stage: BlockStage, ledger: BlockLedger | None, block: Block) -> BlockAnswer:
        """Read, compute (one block at a time per actor), write; the outcome, once the writes are durable."""
        started = time.perf_counter()
        try:
            data = stage.read(block).result()
            with self.compute_lock:
                computed = stage.compute(block, data)
            for pending in write_block(stage, block, computed, ledger):
                pending.result()
            return True, stage.outcome(block, computed), time.perf_counter() - started
        except FATAL_ERRORS:
            raise
        except Exception as error:  # this block's attempt failed; the driver retries it
            return False, error_summary(error), time.perf_counter() - started


@dataclass
class _Slot:
    """One actor position: the live handle, its generation (bumped on replacement), the ``set_stage``
    calls it has not answered yet (blocks go to it once there are none) and its tasks in flight."""

    handle: Any
    setup: list[Any] = field(default_factory=list)
    generation: int = 0
    in_flight: int = 0

    @property
    def ready(self) -> bool:
        return not self.setup


class RayExecutor:
    """Runs stages on BlockWorker actors of the connected Ray cluster (see the module docstring):
    ``actors`` of them, or with ``grow`` at least that many and more as the cluster's resources grow."""

    name = "ray"

    def __init__(self, actors: int, cpus_per_actor: float, gpus_per_actor: float, in_flight: int = 2,
                 max_attempts: int = 3, threads: int | None = None, grow: bool = False) -> None:
        self.num_actors = actors
        self.threads = threads or max(1, int(cpus_per_actor))
        self.device_kind = "cuda" if gpus_per_actor else "cpu"
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.in_flight = in_flight
        self.max_attempts = max_attempts
        self.grow = grow
        self.slots: list[_Slot] = []
        self.stages: dict[str, tuple[Any, BlockLedger | None]] = {}  # key → (stage in the object store, ledger)
        self.replaced = 0
        self.block_seconds: float | None = None  # running mean of a block's seconds on an actor
        self._next_plan = 0.0

    # -- actors --------------------------------------------------------------------------------------
    def _new_slot(self) -> _Slot:
        """Start an actor (without waiting for it to be placed) and send it every stage."""
        threads = self.threads
        environment = {**MALLOC_ENVIRONMENT, "OMP_NUM_THREADS": str(threads)}
        remote = ray.remote(BlockWorker).options(
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor, max_concurrency=self.in_flight + 1,
            max_restarts=0, runtime_env={"env_vars": environment})
        handle = remote.remote(threads)
        return _Slot(handle, [handle.set_stage.remote(key, ref, ledger) for key, (ref, ledger) in self.stages.items()])

    def _replace(self, slot: _Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        fresh = self._new_slot()
        slot.handle, slot.setup = fresh.handle, fresh.setup
        slot.generation += 1
        slot.in_flight = 0
        self.replaced += 1

    def _grow(self) -> None:
        """With ``grow``: add the actors that the cluster's resources now hold beyond the pool's."""
        if not self.grow or time.monotonic() < self._next_plan:
            return
        self._next_plan = time.monotonic() + GROW_SECONDS
        resources = ray.cluster_resources()
        fits, _, _ = plan_actors(None, self.cpus_per_actor, self.gpus_per_actor, resources.get("CPU", 0.0),
                                 resources.get("GPU", 0.0))
        self.slots += [self._new_slot() for _ in range(fits - len(self.slots))]

    def placed(self) -> int:
        """How many actors are placed and hold every stage shipped so far (noting the ``set_stage`` calls
        answered since last time). An actor that could not set a stage up stops the run with one line
        (see :func:`_raise_setup_error`)."""
        pending = [ref for slot in self.slots for ref in slot.setup]
        if pending:
            answered = set(ray.wait(pending, num_returns=len(pending), timeout=0)[0])
            for slot in self.slots:
                done = [ref for ref in slot.setup if ref in answered]
                if done:
                    _raise_setup_error(done)
                    slot.setup = [ref for ref in slot.setup if ref not in answered]
        return sum(slot.ready for slot in self.slots)

    def workers(self) -> list[dict[str, Any]]:
        """Each placed actor's pid, device and node (for tests and the run summary)."""
        return ray.get([slot.handle.describe.remote() for slot in self.slots if slot.ready])

    def close(self) -> None:
        for slot in self.slots:
            ray.kill(slot.handle, no_restart=True)
        self.slots.clear()
        self.stages.clear()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running ---------------------------------------------------------------------------------------
    def run(self, stage: BlockStage, blocks: Iterable[Block], on_done: BlockDone | None = None,
            ledger: BlockLedger | None = None) -> RunStats:
        """Run ``stage`` on every block across the actors; same contract as the serial executor's."""
        stats = RunStats(workers=len(self.slots))
        with closing_pass(stats, ledger):
            upcoming = iter(blocks)
            first = next(upcoming, None)
            if first is None:
                return stats
            begin = time.perf_counter()
            key = self._ship(stage, ledger)
            dispatch = _Dispatch(itertools.chain([first], upcoming), self.max_attempts, stats)
            warned = False
            while dispatch.has_work():
                self._grow()
                placed = self.placed()
                if placed == len(self.slots) and not stats.startup_seconds:  # every actor holds the stage
                    stats.startup_seconds = time.perf_counter() - begin
                elif not placed and not warned and time.perf_counter() - begin > PLACEMENT_WARNING_SECONDS:
                    warned = True
                    print(f"volseg: waiting for the Ray cluster to place actors (0 of {len(self.slots)} placed "
                          f"after {PLACEMENT_WARNING_SECONDS:.0f} s; each needs {self.resources}).",
                          file=sys.stderr)
                self._fill(key, dispatch)
                ready = _ready(list(dispatch.running) or [ref for slot in self.slots for ref in slot.setup])
                finished = [ref for ref in ready if ref in dispatch.running]
                for ref, result in zip(finished, _results(finished), strict=True):
                    self._collect(ref, result, stage, dispatch, ledger, on_done)
            stats.workers = len(self.slots)
        return stats

    @property
    def resources(self) -> str:
        """What one actor holds, e.g. ``1 GPU`` or ``2 CPU``."""
        return f"{self.gpus_per_actor:g} GPU" if self.gpus_per_actor else f"{self.cpus_per_actor:g} CPU"

    def _ship(self, stage: BlockStage, ledger: BlockLedger | None) -> str:
        """Send every actor the stage (starting the actors on the first run); the stage's key."""
        key = f"{stage.name}-{len(self.stages)}"
        ref = ray.put(stage)
        self.stages[key] = (ref, ledger)
        if self.slots:
            for slot in self.slots:
                slot.setup.append(slot.handle.set_stage.remote(key, ref, ledger))
        else:
            self.slots = [self._new_slot() for _ in range(self.num_actors)]
        return key

    def batch_size(self) -> int:
        """Blocks per task: as many as take about :data:`TASK_SECONDS` (one until a block has finished)."""
        if self.block_seconds is None:
            return 1
        return max(1, min(MAX_BATCH, int(TASK_SECONDS / max(self.block_seconds, 1e-6))))

    def _fill(self, key: str, dispatch: _Dispatch) -> None:
        """Give each placed actor tasks until it holds ``in_flight`` of them (or no blocks are left)."""
        size = self.batch_size()
        for slot in self.slots:
            while slot.ready and slot.in_flight < self.in_flight:
                blocks = dispatch.take(size)
                if not blocks:
                    return
                dispatch.running[slot.handle.process.remote(key, blocks)] = (slot, slot.generation, blocks)
                slot.in_flight += 1

    def _collect(self, ref: Any, result: Any, stage: BlockStage, dispatch: _Dispatch, ledger: BlockLedger | None,
                 on_done: BlockDone | None) -> None:
        """One finished task (``result``: its answers, or the error it raised): mark its written blocks
        done, and give the others back for a retry (replacing a dead actor)."""
        slot, generation, blocks = dispatch.running.pop(ref)
        if generation == slot.generation:
            slot.in_flight -= 1
        if isinstance(result, RayActorError):
            for block in blocks:
                dispatch.give_back(block, f"actor died: {error_summary(result)}")
            if generation == slot.generation:
                self._replace(slot)
            return
        if isinstance(result, RayTaskError):
            error = error_summary(result.cause if result.cause is not None else result)
            for block in blocks:
                dispatch.give_back(block, error)
            return
        worker = f"actor {self.slots.index(slot)}"
        for block, (written, value, seconds) in zip(blocks, result, strict=True):
            self.block_seconds = seconds if self.block_seconds is None else 0.9 * self.block_seconds + 0.1 * seconds
            if not written:
                dispatch.give_back(block, value)
                continue
            if ledger is not None:
                ledger.mark(stage.name, block.id, value)
            dispatch.stats.record(block, value if keeps_outcomes(stage) else None)
            if on_done is not None:
                on_done(block, seconds, worker)


class _Dispatch:
    """The blocks of one run: a lazy stream, the blocks given back for a retry (run first), the tasks
    in flight, and the attempts of blocks that failed (only those: nothing here grows with the run)."""

    def __init__(self, blocks: Iterator[Block], max_attempts: int, stats: RunStats) -> None:
        self.upcoming = blocks
        self.retries: deque[Block] = deque()
        self.running: dict[Any, tuple[_Slot, int, list[Block]]] = {}
        self.attempts: Counter[int] = Counter()
        self.max_attempts = max_attempts
        self.stats = stats
        self.exhausted = False

    def take(self, count: int) -> list[Block]:
        """Up to ``count`` blocks: retries first, then the stream's next ones."""
        taken: list[Block] = []
        while len(taken) < count and self.retries:
            taken.append(self.retries.popleft())
        if not self.exhausted and len(taken) < count:
            taken += itertools.islice(self.upcoming, count - len(taken))
            self.exhausted = len(taken) < count
        return taken

    def has_work(self) -> bool:
        return bool(self.running or self.retries) or not self.exhausted

    def give_back(self, block: Block, error: str) -> None:
        """A failed attempt: retry the block first, or report it once it failed ``max_attempts`` times."""
        self.attempts[block.id] += 1
        if self.attempts[block.id] >= self.max_attempts:
            self.stats.failed[block.id] = error
        else:
            self.stats.retried += 1
            self.retries.append(block)


def _ready(refs: list[Any]) -> list[Any]:
    """The finished tasks among ``refs``: waits up to :data:`POLL_SECONDS` for one, then takes every
    other one already finished (one wait per batch, not per block)."""
    if not refs:
        return []
    ready, rest = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
    if ready and rest:
        ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
    return ready


def _results(refs: list[Any]) -> list[Any]:
    """The values of finished tasks in one call; where one raised, each task's value or error."""
    try:
        return ray.get(refs)
    except (RayActorError, RayTaskError):
        return [_result(ref) for ref in refs]


def _result(ref: Any) -> Any:
    try:
        return ray.get(ref)
    except (RayActorError, RayTaskError) as error:
        return error


def _raise_setup_error(answered: list[Any]) -> None:
    """Stop the run with one line if an actor could not set a stage up (a volume or file its node cannot
    reach), not with a remote traceback."""
    try:
        ray.get(answered)
    except RayError as error:
        raise ActorSetupError(
            f"A Ray actor could not set up its work: {error_summary(getattr(error, 'cause', None) or error)}",
            "every volume and file a run uses must be reachable from every node at the same path or URL "
            "(a bucket, or a shared file system mounted alike); check the paths, or run with "
            "execution.executor: serial.",
        ) from None


def plan_actors(actors: int | None, cpus_per_actor: float | None, gpus_per_actor: float | None,
                cluster_cpus: float, cluster_gpus: float, threads: int = 2) -> tuple[int, float, float]:
    """(actors, cpus, gpus per actor): by default one actor per GPU with up to 4 CPUs for its I/O;
    on a CPU-only cluster actors of ``threads`` CPUs (their torch threads; fewer on a smaller
    machine) filling its CPUs."""
    gpus = gpus_per_actor if gpus_per_actor is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    if gpus > 0:
        default = int(cluster_gpus // gpus)
        cpus = cpus_per_actor or max(1.0, min(4.0, cluster_cpus // max(1, default)))
    else:
        cpus = cpus_per_actor or max(1.0, min(float(threads), cluster_cpus))
        default = int(cluster_cpus // cpus)
    return actors or max(1, default), float(cpus), float(gpus)
