"""Connecting to a Ray cluster: the one named in the config or ``RAY_ADDRESS``, or a local instance.

One command works on a laptop and on a cluster: with no address anywhere, volseg starts a local Ray
instance for the command and shuts it down afterwards; under ``ray job submit`` Ray sets
``RAY_ADDRESS`` and volseg joins that cluster.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from volseg.errors import ConfigError
from volseg.io.urls import parse_url

#: Whether the Ray workers' stdout and stderr are shown on the driver (``volseg -v``).
worker_logs = False
#: The level of Ray's own log lines on the driver (``volseg -q``: warnings only).
ray_log_level = logging.INFO


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int
    local: bool  # a Ray instance started by this command: no autoscaler will add nodes


@contextmanager
def connected(address: str | None = None) -> Iterator[ClusterResources]:
    """Use the connected cluster, else join ``address`` / ``RAY_ADDRESS``, else start a local one."""
    started = local = False
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        try:
            with _workers_in_this_interpreter(local=not target):
                ray.init(address=target, include_dashboard=False if not target else None,
                         log_to_driver=worker_logs, logging_level=ray_log_level)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {target!r}: {str(error).splitlines()[0]}",
                "check cluster.address (or RAY_ADDRESS), start the cluster with `ray start --head`, or "
                "leave both unset to run on a local Ray instance.",
            ) from None
        started, local = True, not target
    try:
        total = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        yield ClusterResources(total.get("CPU", 0.0), total.get("GPU", 0.0), nodes, local)
    finally:
        if started:
            ray.shutdown()


@contextmanager
def _workers_in_this_interpreter(local: bool) -> Iterator[None]:
    """A local instance's workers run this interpreter, in its environment.

    Under ``uv run`` Ray's uv hook (``RAY_ENABLE_UV_RUN_RUNTIME_ENV``, on by default) starts every worker
    through ``uv run`` again, which re-resolves the project per worker: `uv run volseg run configs/demo.yaml`
    took 93 s with the hook and 42 s without, on 2 cores. On this machine the environment is already here,
    so the hook is turned off while a local instance starts, unless the user set the variable. A cluster
    that volseg joins (``ray job submit``, ``cluster.address``) keeps the hook: its nodes may need the
    environment built.
    Ray reads the variable once, at import, into a constant of ``ray._private.ray_constants``; that
    constant is what is set here, and set back afterwards.
    """
    from ray._private import ray_constants

    if not local or "RAY_ENABLE_UV_RUN_RUNTIME_ENV" in os.environ:
        yield
        return
    before = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    try:
        yield
    finally:
        ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = before


def check_fits(cluster: ClusterResources, actors: int, cpus: float, gpus: float) -> None:
    """Refuse actors a local instance can never hold (they would wait forever); on a joined cluster
    an autoscaler may still add nodes, so only warn."""
    if actors * cpus <= cluster.cpus + 1e-9 and actors * gpus <= cluster.gpus + 1e-9:
        return
    what = (f"{actors} actors × {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
            + f" do not fit the cluster's {cluster.cpus:g} CPUs and {cluster.gpus:g} GPUs")
    if cluster.local:
        raise ConfigError(f"execution: {what}.",
                          "lower execution.actors or execution.cpus_per_actor / gpus_per_actor, or leave them "
                          "unset to fit the machine.")
    print(f"volseg: warning: {what} now; actors wait until an autoscaler adds nodes.", file=sys.stderr)


# --- paths on a cluster ---------------------------------------------------------------------------------

#: Seconds the nodes have to answer whether they see the outputs' folders.
SHARED_CHECK_SECONDS = 60.0


def check_shared_storage(outputs: Sequence[tuple[str, str]], min_nodes: int = 2) -> None:
    """On a cluster of at least ``min_nodes`` alive nodes, refuse local output paths (``(config field,
    path)``) that some node does not see: its actors would write blocks the driver never reads.

    The driver writes a marker file (a random name, deleted afterwards) in the nearest existing folder
    of each path, and one task per node, pinned to it, reports which markers it cannot read."""
    local = [(field, Path(parse_url(url).path)) for field, url in outputs if parse_url(url).scheme == "file"]
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < min_nodes or not local:
        return
    token = uuid.uuid4().hex
    markers: list[tuple[str, str]] = []
    try:
        for field, path in local:
            folder = next(p for p in (path, *path.parents) if p.is_dir())
            marker = folder / f".volseg-shared-{token}"
            try:
                marker.write_text(token)
            except OSError:  # a folder this process cannot write: creating the output says so, in one line
                continue
            markers.append((field, str(marker)))
        if not markers:
            return
        probe = ray.remote(num_cpus=0)(_unseen_markers)
        pending = {node["NodeManagerAddress"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote([m for _, m in markers], token) for node in nodes}
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=SHARED_CHECK_SECONDS)
        for address, ref in pending.items():
            if ref not in ready:
                continue  # a node too busy to answer: its actors would fail on their first write instead
            unseen = ray.get(ref)
            if unseen:
                field = next(f for f, m in markers if m == unseen[0])
                folder = str(Path(unseen[0]).parent)
                raise ConfigError(
                    f"{field} is a local path, but node {address} does not see {folder} as this node does (no "
                    "shared storage): the blocks its actors write would never reach the output.",
                    f"put {field} on storage every node mounts at the same path, or use a bucket URL (gs://, s3://).")
    finally:
        for _, marker in markers:
            Path(marker).unlink(missing_ok=True)


def _unseen_markers(markers: Sequence[str], token: str) -> list[str]:
    """The markers this node cannot read with ``token`` inside (runs on each node)."""
    unseen = []
    for marker in markers:
        try:
            if Path(marker).read_text() != token:
                unseen.append(marker)
        except OSError:
            unseen.append(marker)
    return unseen
