"""`volseg eval` of an instance output at MitoEM scale: seconds and peak RSS on 2 × 10⁹ voxels.

    uv run python bench/eval_scale.py                             # 128 × 4096 × 4096 (2.1 × 10^9 voxels)
    uv run python bench/eval_scale.py --shape 32 4096 4096        # a quarter

Writes, in a temporary folder, a pair of zarr volumes of ``--shape`` chunked ``--chunk``: instance labels
(uint32) with one ellipsoid per cell of 8 × 128 × 128 voxels, and an "instance output" (uint64, volseg-sized
ids) where a tenth of the objects are missing, a third are shifted by 12 voxels in x (IoU under 0.75), and
a twentieth of the cells hold an extra object. Then, in a fresh process, `volseg eval` (dask threads)
scores the output against the labels: the per-slice Dice / IoU / AJI / PQ and the streamed 3D AP-75. It
prints the voxels, seconds, the evaluating process's peak RSS, and the scores; the AP-75 is checked
against the expected count of true positives (the objects neither missing nor shifted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np

CELL = (8, 128, 128)
RADII = (3.5, 50.0, 40.0)
SHIFT = 12


def cell_fates(cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per cell: missing from the output, shifted in it, with an extra object."""
    rng = np.random.default_rng(0)
    fate = rng.random(cells)
    return fate < 0.1, (fate >= 0.1) & (fate < 0.1 + 1 / 3), rng.random(cells) < 0.05


def layer(z0: int, shape: tuple[int, int, int], depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and output of slices z0 .. z0 + depth (whole cells along z: depth is a multiple of CELL[0])."""
    grid = tuple(s // c for s, c in zip(shape, CELL, strict=True))
    missing, shifted, extra = cell_fates(int(np.prod(grid)))
    z, y, x = np.meshgrid(np.arange(z0, z0 + depth), np.arange(shape[1]), np.arange(shape[2]), indexing="ij",
                          sparse=True)
    cz, cy, cx = z // CELL[0], y // CELL[1], x // CELL[2]
    cell = (cz * grid[1] + cy) * grid[2] + cx
    local = [(a % c - c / 2 + 0.5) / r for a, c, r in zip((z, y, x), CELL, RADII, strict=True)]
    inside = local[0] ** 2 + local[1] ** 2 + local[2] ** 2 <= 1
    labels = np.where(inside, cell + 1, 0).astype(np.uint32)
    moved = local[0] ** 2 + local[1] ** 2 + ((x % CELL[2] - CELL[2] / 2 + 0.5 - SHIFT) / RADII[2]) ** 2 <= 1
    small = local[0] ** 2 + ((y % CELL[1] - 10) / 6) ** 2 + ((x % CELL[2] - 10) / 6) ** 2 <= 1
    found = np.where(np.where(shifted[cell], moved, inside) & ~missing[cell], cell * 2 + 2**40, 0)
    found = np.where(small & extra[cell], cell * 2 + 1 + 2**40, found).astype(np.uint64)
    return labels, found


def write_pair(folder: str, shape: tuple[int, int, int], chunk: tuple[int, int, int]) -> tuple[str, str]:
    from volseg.io import create_volume

    labels = create_volume(f"{folder}/pair.zarr/labels", shape=shape, dtype="uint32", voxel_size_nm=(30, 8, 8),
                           chunk_shape=chunk)
    found = create_volume(f"{folder}/pair.zarr/instances", shape=shape, dtype="uint64", voxel_size_nm=(30, 8, 8),
                          chunk_shape=chunk)
    from volseg.geometry import Box

    depth = CELL[0]
    for z0 in range(0, shape[0], depth):
        truth, output = layer(z0, shape, depth)
        box = Box((z0, 0, 0), (z0 + depth, *shape[1:]))
        labels.write(box, truth)
        found.write(box, output)
    return labels.url, found.url


def evaluate_child(labels: str, instances: str, report: str) -> None:
    import resource

    from volseg.commands.evaluate import evaluate
    from volseg.config import parse_config

    begin = time.perf_counter()
    config = parse_config({"eval": {"labels": {"url": labels}, "instances": {"url": instances}, "report": report}})
    result = evaluate(config, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - begin,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "ap": result.ap75.ap, "tp": result.ap75.tp, "fp": result.ap75.fp, "fn": result.ap75.fn,
                      "dice": result.volume.dice, "aji": result.mean["aji"], "pq": result.mean["pq"],
                      "scheduler": result.scheduler}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 4096, 4096])
    parser.add_argument("--chunk", type=int, nargs=3, default=[8, 512, 512])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        evaluate_child(*args.child)
        return
    shape, chunk = tuple(args.shape), tuple(args.chunk)
    if any(s % c for s, c in zip(shape, CELL, strict=True)):
        parser.error(f"--shape must be a multiple of the cell {CELL}")
    with tempfile.TemporaryDirectory(prefix="volseg-eval-scale-") as folder:
        begin = time.perf_counter()
        labels, instances = write_pair(folder, shape, chunk)
        written = time.perf_counter() - begin
        out = subprocess.run([sys.executable, __file__, "--child", labels, instances, f"{folder}/report.json"],
                             check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
    cells = int(np.prod([s // c for s, c in zip(shape, CELL, strict=True)]))
    missing, shifted, _ = cell_fates(cells)
    expected_tp = int((~missing & ~shifted).sum())
    voxels = int(np.prod(shape))
    print("| voxels | chunks | objects | seconds to write | eval seconds | eval peak RSS MB | AP-75 | TP (expected) "
          "| FP | FN | Dice | AJI | PQ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {voxels:.2e} | {chunk} | {cells:,} | {written:.0f} | {result['seconds']:.0f} | {result['rss_mb']:.0f} | "
          f"{result['ap']:.4f} | {result['tp']:,} ({expected_tp:,}) | {result['fp']:,} | {result['fn']:,} | "
          f"{result['dice']:.4f} | {result['aji']:.4f} | {result['pq']:.4f} |")
    print(f"\nscheduler: {result['scheduler']}")
    if result["tp"] != expected_tp:
        sys.exit(f"AP-75 found {result['tp']} true positives where {expected_tp} were made")


if __name__ == "__main__":
    main()
