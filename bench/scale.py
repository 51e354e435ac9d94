"""The driver at petascale: memory and start-up against the number of blocks, on metadata-only volumes.

    uv run python bench/scale.py                      # 10^4, 10^5, 10^6 and 10^7 blocks
    uv run python bench/scale.py --sizes 4 5          # 10^4 and 10^5 only
    uv run python bench/scale.py --ray-blocks 0       # without the Ray dispatch rows
    uv run python bench/scale.py --sizes --ray-actors 16 64   # the Ray rows only

Each size runs in a fresh process (so peak RSS is that size's), on zarr v3 volumes whose chunks are never
written: the input is a uint8 array of 100 × 100 × (N / 10^4) blocks of 16 × 1024 × 1024 voxels (10^7 blocks:
16000 × 102400 × 102400 voxels), the output an OME-Zarr created by volseg with one chunk per block, and
the done-marks live beside it as in a run. The stage is a no-op (reads, computes and writes nothing), so
what is timed is the driver alone: opening the volumes, the block grid, reading the ledger, the lazy block
stream, the serial executor, marking blocks done. Per size it measures:

- seconds from the start (volumes opened, ledger read) to the first block done, on a fresh output;
- dispatch blocks/s of the no-op stage over the first ``--dispatch-blocks`` blocks (every block marked done);
- seconds to resume with 10% and with 100% of the blocks marked done (marks written beforehand as a run
  writes them, one object per super-block): from the start to the first block left (10%), or to the end of
  a pass with nothing left (100%);
- the process's peak RSS over all of that (with everything `volseg run` imports, torch included), and its
  growth per 10× blocks.

A second table runs the no-op stage on Ray actors (each of ``--ray-actors`` counts in a fresh process and a
fresh local Ray instance declaring one CPU per actor, however many cores the machine has) over
``--ray-blocks`` blocks, and reports dispatch blocks/s once every actor started (the executor packs quick
blocks several to a task, see :mod:`volseg.engine.ray`), and the blocks per task it settled on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

import volseg.commands.run  # noqa: F401  (what `volseg run` imports: torch, the models; a realistic baseline)
from volseg.engine.ledger import SUPER_BLOCK, BlockLedger, encode_group
from volseg.engine.stage import Resolved, RunStats, run_stage
from volseg.geometry import Block, BlockGrid, Box
from volseg.io import create_volume, open_volume

BLOCK = (16, 1024, 1024)
PLANE_BLOCKS = (100, 100)  # blocks along y and x; the number of blocks sets the depth
SIGNATURE = "scale-bench"


class NoOpStage:
    """A stage that reads, computes and writes nothing: what is left is the driver's work per block."""

    name = "segment"

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Resolved:
        return Resolved()

    def compute(self, block: Block, data: Any) -> None:
        return None

    def write(self, block: Block, computed: Any) -> list[Resolved]:
        return []

    def outcome(self, block: Block, computed: Any) -> None:
        return None

    def to(self, device: str) -> None:
        return None


class Enough(Exception):
    """Raised from the progress callback to end a pass after the blocks a measurement needs."""


def metadata_only_input(folder: Path, blocks: int) -> str:
    """A zarr v3 uint8 array of ``blocks`` blocks of :data:`BLOCK` voxels, chunk = block, no chunk written."""
    depth = blocks // math.prod(PLANE_BLOCKS)
    shape = [depth * BLOCK[0], PLANE_BLOCKS[0] * BLOCK[1], PLANE_BLOCKS[1] * BLOCK[2]]
    path = folder / "input.zarr"
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}},
            create=True, dtype=ts.uint8, shape=shape, chunk_layout=ts.ChunkLayout(chunk_shape=list(BLOCK))).result()
    return str(path)


def open_run(input_url: str, output_url: str) -> tuple[BlockGrid, BlockLedger]:
    """What a run's driver does before its first block: open the input, create (or reopen) the output,
    build the grid, and the ledger beside the output."""
    source = open_volume(input_url)
    create_volume(output_url, shape=source.shape, dtype="uint8", voxel_size_nm=(8.0, 8.0, 8.0),
                  chunk_shape=BLOCK, exist_ok=True)
    grid = BlockGrid.aligned(source.bounds, BLOCK, 0, source.bounds, BLOCK)
    return grid, BlockLedger.beside(output_url, SIGNATURE)


def timed_pass(input_url: str, output_url: str, stop_after: int) -> dict[str, float]:
    """Seconds from the start to the first block done, and blocks/s from then until ``stop_after``
    blocks were done (or the pass ended)."""
    from volseg.engine.serial import SerialExecutor

    begin = time.perf_counter()
    times: list[float] = []
    left: list[int] = []

    def on_done(block: Block, seconds: float, worker: str) -> None:
        times.append(time.perf_counter())
        if len(times) >= stop_after:
            raise Enough

    grid, ledger = open_run(input_url, output_url)
    with contextlib.suppress(Enough):
        run_stage(SerialExecutor(), NoOpStage(), grid, ledger, on_done=on_done, on_start=left.append)
    end = time.perf_counter()
    first = times[0] - begin if times else end - begin
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return {"first_s": first, "blocks_per_s": rate, "blocks": len(times), "pass_s": end - begin, "left": left[0]}


def mark_first(output_url: str, num_blocks: int, share: float) -> None:
    """Marks for the first ``share`` of the blocks, as a run leaves them: whole super-blocks, one object each."""
    ledger = BlockLedger.beside(output_url, SIGNATURE)
    writes = []
    for group in range(math.ceil(num_blocks * share / SUPER_BLOCK)):
        bits = np.arange(SUPER_BLOCK) < num_blocks - group * SUPER_BLOCK
        writes.append(ledger.store.write(ledger.group_key(NoOpStage.name, group),
                                         json.dumps(encode_group(bits, {})).encode()))
        if len(writes) >= 512:
            wait_all(writes)
    wait_all(writes)


def wait_all(writes: list[Any]) -> None:
    while writes:
        writes.pop().result()


def child(blocks: int, dispatch_blocks: int) -> dict[str, Any]:
    """Every measurement of one size, in this (fresh) process."""
    with tempfile.TemporaryDirectory(prefix="volseg-scale-") as tmp:
        folder = Path(tmp)
        input_url = metadata_only_input(folder, blocks)
        fresh = timed_pass(input_url, str(folder / "fresh.zarr"), dispatch_blocks)
        resumed = {}
        for share in (0.1, 1.0):
            output = str(folder / f"resume{int(share * 100)}.zarr")
            create_volume(output, shape=open_volume(input_url).shape, dtype="uint8", voxel_size_nm=(8.0, 8.0, 8.0),
                          chunk_shape=BLOCK)
            mark_first(output, blocks, share)
            resumed[share] = timed_pass(input_url, output, 1)
            expected = blocks - min(blocks, math.ceil(blocks * share / SUPER_BLOCK) * SUPER_BLOCK)
            if resumed[share]["left"] != expected:
                raise AssertionError(f"{resumed[share]['left']} blocks left after marking {share:.0%}, not {expected}")
    return {"blocks": blocks, "first_s": fresh["first_s"], "dispatch_per_s": fresh["blocks_per_s"],
            "dispatched": fresh["blocks"], "resume10_s": resumed[0.1]["first_s"], "resume100_s": resumed[1.0]["pass_s"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_child(blocks: int, actors: int, in_flight: int) -> dict[str, Any]:
    """Dispatch blocks/s of the no-op stage on ``actors`` Ray actors of one CPU, once all started."""
    import ray

    from volseg.engine.ray import RayExecutor

    ray.init(num_cpus=max(actors, 2), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="volseg-scale-ray-") as tmp:
            input_url = metadata_only_input(Path(tmp), blocks)
            grid, ledger = open_run(input_url, str(Path(tmp) / "out.zarr"))
            with RayExecutor(actors, 1.0, 0.0, in_flight=in_flight) as executor:
                begin = time.perf_counter()
                executor.run(NoOpStage(), (grid.block(i) for i in range(10 * actors)))  # starts the actors
                while executor.placed() < actors:  # every actor started: the timed pass is steady dispatch
                    time.sleep(0.5)
                startup = time.perf_counter() - begin
                stats: RunStats = run_stage(executor, NoOpStage(), grid, ledger).stats
                batch = executor.batch_size()
    finally:
        ray.shutdown()
    steady = stats.seconds - stats.startup_seconds
    return {"blocks": stats.blocks_done, "actors": actors, "in_flight": in_flight,
            "dispatch_per_s": stats.blocks_done / steady, "startup_s": startup,
            "batch": batch}


def in_fresh_process(*arguments: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *arguments], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], ray_rows: list[dict[str, Any]]) -> str:
    lines = ["| blocks | driver peak RSS MB | RSS × per 10× blocks | s to first block | s to resume, 10% done "
             "| s to resume, 100% done | dispatch blocks/s (serial, no-op) |", "|---|---|---|---|---|---|---|"]
    previous = None
    for row in rows:
        growth = "" if previous is None else f"{row['peak_rss_mb'] / previous:.2f}"
        previous = row["peak_rss_mb"]
        lines.append(f"| {row['blocks']:,} | {row['peak_rss_mb']:.0f} | {growth} | {row['first_s']:.2f} | "
                     f"{row['resume10_s']:.2f} | {row['resume100_s']:.2f} | {row['dispatch_per_s']:,.0f} "
                     f"(first {row['dispatched']:,}) |")
    if ray_rows:
        lines += ["", "| Ray actors × 1 CPU | tasks in flight per actor | blocks per task | blocks | s starting actors "
                  "| dispatch blocks/s (no-op) |", "|---|---|---|---|---|---|"]
        lines += [f"| {row['actors']} | {row['in_flight']} | {row['batch']} | {row['blocks']:,} | "
                  f"{row['startup_s']:.1f} | {row['dispatch_per_s']:,.0f} |" for row in ray_rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[4, 5, 6, 7], help="powers of ten of blocks")
    parser.add_argument("--dispatch-blocks", type=int, default=20000, help="blocks timed per size")
    parser.add_argument("--ray-blocks", type=int, default=40000, help="blocks of each Ray row (0: no Ray rows)")
    parser.add_argument("--ray-actors", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--ray-in-flight", type=int, default=2, help="tasks queued per actor (execution.in_flight)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ray-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.dispatch_blocks)))
        return
    if args.ray_child is not None:
        print(json.dumps(ray_child(args.ray_child, args.ray_actors[0], args.ray_in_flight)))
        return
    rows = []
    for power in args.sizes:
        rows.append(in_fresh_process("--child", str(10**power), "--dispatch-blocks", str(args.dispatch_blocks)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ray_rows = []
    for actors in args.ray_actors if args.ray_blocks else []:
        ray_rows.append(in_fresh_process("--ray-child", str(args.ray_blocks), "--ray-actors", str(actors),
                                         "--ray-in-flight", str(args.ray_in_flight)))
        print(json.dumps(ray_rows[-1]), file=sys.stderr, flush=True)
    print(table(rows, ray_rows))


if __name__ == "__main__":
    main()
