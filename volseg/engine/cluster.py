"""Connecting to a Ray cluster: the one named in the config or ``RAY_ADDRESS``, or a local instance.

One command works on a laptop and on a cluster: with no address anywhere, volseg starts a local Ray
instance for the command and shuts it down afterwards; under ``ray job submit`` Ray sets
``RAY_ADDRESS`` and volseg joins that cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from volseg.errors import ConfigError

#: Whether the Ray workers' stdout and stderr are shown on the driver (``volseg -v``).
worker_logs = False
#: The level of Ray's own log lines on the driver (``volseg -q``: warnings only).
ray_log_level = logging.INFO


@dataclass(frozen=True)
class ClusterResources:
    cpus: float
    gpus: float
    nodes: int
    joined_here: bool
    local: bool  # a Ray instance started by this command: no autoscaler will add nodes


@contextmanager
def connected(address: str | None = None) -> Iterator[ClusterResources]:
    """Use the connected cluster, else join ``address`` / ``RAY_ADDRESS``, else start a local one."""
    started = local = False
    if not ray.is_initialized():
        target = address or os.environ.get("RAY_ADDRESS")
        try:
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
        yield ClusterResources(total.get("CPU", 0.0), total.get("GPU", 0.0), nodes, started, local)
    finally:
        if started:
            ray.shutdown()


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
