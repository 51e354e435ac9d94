"""The Ray executor: blocks run on predictor actors, with backpressure, retries and actor replacement.

Each :class:`BlockWorker` actor holds one GPU (``num_gpus``) or a few CPUs, receives every stage once
(the model's weights travel through the object store, not a shared file system) and runs up to
``in_flight`` blocks at a time on threads: reads and writes of one block overlap the model's work on
another, while a lock keeps one block at a time on the device. The driver keeps at most ``in_flight``
blocks queued per actor, so a slow actor is never buried under work and a lost actor loses little.

Failures: a block whose task raises is retried (on any actor) up to ``max_attempts`` times; an actor
that dies (a killed process, a lost node) is replaced and its blocks go back into the queue, counted as
an attempt. Blocks that fail every attempt are reported by id in :attr:`RunStats.failed`; the rest of
the run completes. A block is marked done in the ledger by the actor, after its writes completed.
Output bytes equal the serial executor's: a block's result depends only on the block.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from volseg.allocator import MALLOC_ENVIRONMENT
from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import BlockDone, BlockStage, RunStats, error_summary, write_block
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
        self.stages: dict[str, BlockStage] = {}
        self.compute_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": self.device, "node": ray.get_runtime_context().get_node_id()}

    def set_stage(self, key: str, stage: BlockStage) -> None:
        stage.to(self.device)
        self.stages[key] = stage

    def process(self, key: str, block: Block, ledger: BlockLedger | None) -> tuple[Any, float]:
        """Read, compute (one block at a time per actor), write, mark done; the outcome and seconds."""
        started = time.perf_counter()
        stage = self.stages[key]
        data = stage.read(block).result()
        with self.compute_lock:
            computed = stage.compute(block, data)
        for pending in write_block(stage, block, computed, ledger):
            pending.result()
        outcome = stage.outcome(block, computed)
        if ledger is not None:
            ledger.mark(stage.name, block.id, outcome)
        return outcome, time.perf_counter() - started


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
        self.stages: dict[str, Any] = {}
        self.replaced = 0

    # -- actors --------------------------------------------------------------------------------------
    def _start_actor(self) -> Any:
        threads = self.threads
        environment = {**MALLOC_ENVIRONMENT, "OMP_NUM_THREADS": str(threads)}
        remote = ray.remote(BlockWorker).options(
            num_cpus=self.cpus_per_actor, num_gpus=self.gpus_per_actor, max_concurrency=self.in_flight + 1,
            max_restarts=0, runtime_env={"env_vars": environment})
        handle = remote.remote(threads)
        _set_up([handle.set_stage.remote(key, ref) for key, ref in self.stages.items()])
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
        begin = time.perf_counter()
        blocks = list(blocks)
        if not blocks:
            return RunStats(workers=len(self.slots))
        key = f"{stage.name}-{len(self.stages)}"
        self.stages[key] = ray.put(stage)
        if self.slots:
            _set_up([slot.handle.set_stage.remote(key, self.stages[key]) for slot in self.slots])
        else:
            self.slots = [_Slot(self._start_actor()) for _ in range(self.num_actors)]

        stats = RunStats(workers=len(self.slots), startup_seconds=time.perf_counter() - begin)
        queue: deque[Block] = deque(blocks)
        attempts: Counter[int] = Counter()
        running: dict[Any, tuple[_Slot, int, Block]] = {}

        def give_back(block: Block, error: str) -> None:
            attempts[block.id] += 1
            if attempts[block.id] >= self.max_attempts:
                stats.failed[block.id] = error
            else:
                stats.retried += 1
                queue.appendleft(block)

        while queue or running:
            for slot in self.slots:
                while queue and slot.in_flight < self.in_flight:
                    block = queue.popleft()
                    ref = slot.handle.process.remote(key, block, ledger)
                    running[ref] = (slot, slot.generation, block)
                    slot.in_flight += 1
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                slot, generation, block = running.pop(ref)
                if generation == slot.generation:
                    slot.in_flight -= 1
                try:
                    outcome, seconds = ray.get(ref)
                except RayActorError as error:
                    give_back(block, f"actor died: {error_summary(error)}")
                    if generation == slot.generation:
                        self._replace(slot)
                    continue
                except RayTaskError as error:
                    give_back(block, error_summary(error.cause if error.cause is not None else error))
                    continue
                stats.outcomes[block.id] = outcome
                stats.blocks_done += 1
                stats.voxels += block.core.size
                if on_done is not None:
                    on_done(block, seconds, f"actor {self.slots.index(slot)}")
        stats.seconds = time.perf_counter() - begin
        return stats


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
