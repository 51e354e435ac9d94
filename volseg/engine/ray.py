"""The Ray executor: blocks run on predictor actors, with backpressure, retries and actor replacement.

Each :class:`BlockWorker` actor holds one GPU (``num_gpus``) or a few CPUs, receives every stage once
(the model's weights travel through the object store, not a shared file system) and runs up to
``in_flight`` blocks at a time on threads: reads and writes of one block overlap the model's work on
another, while a lock keeps one block at a time on the device. The driver takes blocks from a lazy
stream as actors have room and keeps at most ``in_flight`` blocks queued per actor, so its memory does
not grow with the number of blocks, a slow actor is never buried under work and a lost actor loses little.

Failures: a block whose task raises is retried (on any actor) up to ``max_attempts`` times; an actor
that dies (a killed process, a lost node) is replaced and its blocks go back into the queue, counted as
an attempt. Blocks that fail every attempt are reported by id in :attr:`RunStats.failed`; the rest of
the run completes. An actor answers for a block once its writes completed; only then does the driver
mark it done in the ledger.
Output bytes equal the serial executor's: a block's result depends only on the block.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from volseg.allocator import MALLOC_ENVIRONMENT
from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import BlockDone, BlockStage, RunStats, closing_pass, error_summary, write_block
from volseg.errors import VolsegError
from volseg.geometry import Block


class ActorSetupError(VolsegError):
    """Actors could not receive a stage (e.g. a path that exists on the driver's node only)."""


#: Seconds the driver waits for a result before checking on the actors again.
POLL_SECONDS = 1.0


class BlockWorker:
    """A Ray actor running blocks of the stages it was given (see the module docstring)."""

    def __init__(self, threads: int) -> None:
        from volseg.allocator import keep_freed_memory

        keep_freed_memory()
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if ray.get_gpu_ids() else "cpu"
        self.stages: dict[str, tuple[BlockStage, BlockLedger | None]] = {}
        self.compute_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id()}

    def set_stage(self, key: str, stage: BlockStage, ledger: BlockLedger | None) -> None:
        """Receive a stage, and the ledger whose leases its blocks confirm before they write."""
        stage.to(self.device)
        self.stages[key] = (stage, ledger)

    def process(self, key: str, block: Block) -> tuple[Any, float]:
        """Read, compute (one block at a time per actor), write; the outcome and seconds, once the
        writes are durable."""
        started = time.perf_counter()
        stage, ledger = self.stages[key]
        data = stage.read(block).result()
        with self.compute_lock:
            computed = stage.compute(block, data)
        for pending in write_block(stage, block, computed, ledger):
            pending.result()
        return stage.outcome(block, computed), time.perf_counter() - started


@dataclass
class _Slot:
    """One actor position: the live handle, its generation (bumped on replacement) and its queue."""

    handle: Any
    generation: int = 0
    in_flight: int = 0


class RayExecutor:
    """Runs stages on ``actors`` BlockWorker actors of the connected Ray cluster (see module docstring)."""

    name = "ray"

    def __init__(self, actors: int, cpus_per_actor: float, gpus_per_actor: float, in_flight: int = 2,
                 max_attempts: int = 3, threads: int | None = None) -> None:
        self.num_actors = actors
        self.threads = threads or max(1, int(cpus_per_actor))
        self.device_kind = "cuda" if gpus_per_actor else "cpu"
        self.cpus_per_actor = cpus_per_actor
        self.gpus_per_actor = gpus_per_actor
        self.in_flight = in_flight
        self.max_attempts = max_attempts
        self.slots: list[_Slot] = []
        self.stages: dict[str, tuple[Any, BlockLedger | None]] = {}  # key → (stage in the object store, ledger)
        self.replaced = 0

    # -- actors --------------------------------------------------------------------------------------
    def _start_actor(self) -> Any:
        threads = self.threads
        environment = {**MALLOC_ENVIRONMENT, "OMP_NUM_THREADS": str(threads)}
        remote = ray.remote(BlockWorker).options(
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor, max_concurrency=self.in_flight + 1,
            max_restarts=0, runtime_env={"env_vars": environment})
        handle = remote.remote(threads)
        _set_up([handle.set_stage.remote(key, ref, ledger) for key, (ref, ledger) in self.stages.items()])
        return handle

    def _replace(self, slot: _Slot) -> None:
        ray.kill(slot.handle, no_restart=True)
        slot.handle = self._start_actor()
        slot.generation += 1
        slot.in_flight = 0
        self.replaced += 1

    def workers(self) -> list[dict[str, Any]]:
        """Each actor's pid, device and node (for tests and the run summary)."""
        return ray.get([slot.handle.describe.remote() for slot in self.slots])

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
            stats.workers, stats.startup_seconds = len(self.slots), time.perf_counter() - begin
            dispatch = _Dispatch(itertools.chain([first], upcoming), self.max_attempts, stats)
            while dispatch.has_work():
                self._fill(key, dispatch)
                ready = _ready(list(dispatch.running))
                for ref, result in zip(ready, _results(ready), strict=True):
                    self._collect(ref, result, stage, dispatch, ledger, on_done)
        return stats

    def _ship(self, stage: BlockStage, ledger: BlockLedger | None) -> str:
        """Give every actor the stage (starting the actors on the first run); the stage's key."""
        key = f"{stage.name}-{len(self.stages)}"
        self.stages[key] = (ray.put(stage), ledger)
        if self.slots:
            _set_up([slot.handle.set_stage.remote(key, *self.stages[key]) for slot in self.slots])
        else:
            self.slots = [_Slot(self._start_actor()) for _ in range(self.num_actors)]
        return key

    def _fill(self, key: str, dispatch: _Dispatch) -> None:
        """Give each actor blocks until it holds ``in_flight`` of them (or none are left)."""
        for slot in self.slots:
            while slot.in_flight < self.in_flight:
                block = dispatch.next_block()
                if block is None:
                    return
                dispatch.running[slot.handle.process.remote(key, block)] = (slot, slot.generation, block)
                slot.in_flight += 1

    def _collect(self, ref: Any, result: Any, stage: BlockStage, dispatch: _Dispatch, ledger: BlockLedger | None,
                 on_done: BlockDone | None) -> None:
        """One finished task (``result``: its value, or the error it raised): mark its block done, or give
        it back for a retry (replacing a dead actor)."""
        slot, generation, block = dispatch.running.pop(ref)
        if generation == slot.generation:
            slot.in_flight -= 1
        if isinstance(result, RayActorError):
            dispatch.give_back(block, f"actor died: {error_summary(result)}")
            if generation == slot.generation:
                self._replace(slot)
            return
        if isinstance(result, RayTaskError):
            dispatch.give_back(block, error_summary(result.cause if result.cause is not None else result))
            return
        outcome, seconds = result
        if ledger is not None:
            ledger.mark(stage.name, block.id, outcome)
        dispatch.stats.record(block, outcome)
        if on_done is not None:
            on_done(block, seconds, f"actor {self.slots.index(slot)}")


class _Dispatch:
    """The blocks of one run: a lazy stream, the blocks given back for a retry (run first), the tasks
    in flight, and the attempts of blocks that failed (only those: nothing here grows with the run)."""

    def __init__(self, blocks: Iterator[Block], max_attempts: int, stats: RunStats) -> None:
        self.upcoming = blocks
        self.retries: deque[Block] = deque()
        self.running: dict[Any, tuple[_Slot, int, Block]] = {}
        self.attempts: Counter[int] = Counter()
        self.max_attempts = max_attempts
        self.stats = stats
        self.exhausted = False

    def next_block(self) -> Block | None:
        if self.retries:
            return self.retries.popleft()
        block = None if self.exhausted else next(self.upcoming, None)
        self.exhausted = block is None
        return block

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


def _set_up(calls: list[Any]) -> None:
    """Wait for actors to receive a stage; one that cannot (a volume or file its node cannot reach)
    stops the run with one line saying so, not a remote traceback."""
    try:
        ray.get(calls)
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
