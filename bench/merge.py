"""The instance merge at scale: the distributed union-find against one union-find in the driver.

    uv run python bench/merge.py                 # 10^3, 10^4, 10^5 blocks
    uv run python bench/merge.py --sizes 3 4 5 6 # and 10^6

Per size, the label and stitch passes' outcomes of an instance run are written as a run writes them (one
done-mark object per super-block, beside an output folder), for a grid of 10 × 10 × (N / 100) blocks of
16 pieces each: pieces 1-4 of a block touch the same pieces of the next block along x, 5-6 along y, and 7
along z (objects spanning up to the whole depth of the volume; each contact reported from both sides, as
the stitch passes do). Then, each in a fresh process:

- **tree**: :func:`volseg.instances.merge.merge` on the serial executor (its nodes run in this process, so
  its peak RSS is the driver's plus one node's working set; on Ray the nodes run on the actors), with the
  relabel table of the last super-block read back;
- **one driver**: the union-find the driver ran before: every block's outcomes read into the driver, then
  one connected-components pass over every pair (scipy), as ``merge_pieces`` did.

It prints, per size: pieces, seconds and peak RSS of each, and the entries the driver holds after the tree
merge (one per tree node, never per block or object).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PIECES = 16
#: Local ids of the pieces that touch the next block along (x, y, z).
TOUCHING = {2: (1, 2, 3, 4), 1: (5, 6), 0: (7,)}
PLANE = (10, 10)


def grid_shape(blocks: int) -> tuple[int, int, int]:
    return (max(1, blocks // (PLANE[0] * PLANE[1])), *PLANE)


def write_marks(folder: str, blocks: int) -> None:
    """The done-marks of the label and stitch passes of ``blocks`` blocks, one object per super-block."""
    from volseg.engine.ledger import SUPER_BLOCK, BlockLedger, encode_group
    from volseg.instances.stitching import piece_ids

    shape = grid_shape(blocks)
    strides = (shape[1] * shape[2], shape[2], 1)
    ledger = BlockLedger.beside(folder, "merge-bench")
    store = ledger.store
    rng = np.random.default_rng(0)
    pending = []
    for group in range(-(-blocks // SUPER_BLOCK)):
        ids = range(group * SUPER_BLOCK, min((group + 1) * SUPER_BLOCK, blocks))
        bits = np.zeros(SUPER_BLOCK, bool)
        bits[: len(ids)] = True
        labels, stitches = {}, {}
        for block in ids:
            index = np.unravel_index(block, shape)
            labels[block] = {"sizes": rng.integers(50, 5000, PIECES).tolist()}
            pairs = []
            for axis, locals_ in TOUCHING.items():
                for step in (1, -1):  # the contact with the next block, and with the previous one
                    if 0 <= index[axis] + step < shape[axis]:
                        other = block + step * strides[axis]
                        for local in locals_:
                            pairs.append([int(piece_ids(block, np.array([local]))[0]),
                                          int(piece_ids(other, np.array([local]))[0])])
            stitches[block] = {"pairs": pairs}
        for stage, outcomes in (("instances-label", labels), ("instances-stitch", stitches)):
            key = ledger.group_key(stage, group)
            pending.append(store.write(key, json.dumps(encode_group(bits, outcomes)).encode()))
        if len(pending) > 64:
            for p in pending:
                p.result()
            pending = []
    for p in pending:
        p.result()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tree(folder: str, blocks: int) -> dict[str, float]:
    from volseg.engine.ledger import BlockLedger
    from volseg.engine.serial import SerialExecutor
    from volseg.geometry import Block, Box
    from volseg.instances.merge import MergeInputs, MergeTree, merge
    from volseg.instances.stages import RelabelStage

    ledger = BlockLedger.beside(folder, "merge-bench")
    base = peak_rss_mb()
    begin = time.perf_counter()
    inputs = MergeInputs(MergeTree(blocks), ledger.run_folder("instances-merge"), ledger, "instances-label",
                         "instances-stitch", 0)
    result = merge(SerialExecutor(), inputs, ledger)
    seconds = time.perf_counter() - begin
    last = blocks - 1
    table = RelabelStage(inputs.folder, inputs.tree.leaf_blocks, None).table(
        Block(last, (0, 0, last), Box((0, 0, last), (1, 1, last + 1)), Box((0, 0, last), (1, 1, last + 1))))
    assert len(table.mapping(last)) == PIECES
    return {"pieces": result.pieces, "objects": result.objects, "seconds": seconds, "rss": peak_rss_mb(),
            "base_rss": base, "driver_entries": result.nodes, "levels": inputs.tree.top + 1}


def run_one_driver(folder: str, blocks: int) -> dict[str, float]:
    """What the driver did before the tree: every outcome in memory, one union-find over all pairs."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from volseg.engine.ledger import BlockLedger
    from volseg.instances.stitching import LOCAL_MASK, piece_blocks

    ledger = BlockLedger.beside(folder, "merge-bench")
    base = peak_rss_mb()
    begin = time.perf_counter()
    labels = ledger.done("instances-label").outcomes
    stitches = ledger.done("instances-stitch").outcomes
    counts = np.array([len(labels[b]["sizes"]) for b in range(blocks)], np.int64)
    sizes = np.concatenate([np.asarray(labels[b]["sizes"], np.int64) for b in range(blocks)])
    pairs = np.concatenate([np.asarray(o["pairs"], np.uint64).reshape(-1, 2) for o in stitches.values()])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    index = starts[piece_blocks(pairs)] + (pairs & np.uint64(LOCAL_MASK)).astype(np.int64) - 1
    total = int(counts.sum())
    graph = coo_matrix((np.ones(len(index), np.int8), (index[:, 0], index[:, 1])), shape=(total, total))
    objects, component = connected_components(graph, directed=False)
    np.bincount(component, weights=sizes.astype(np.float64), minlength=objects)
    return {"pieces": total, "objects": objects, "seconds": time.perf_counter() - begin, "rss": peak_rss_mb(),
            "base_rss": base}


def child(mode: str, folder: str, blocks: int) -> None:
    import volseg.commands.run  # noqa: F401  (what `volseg run` imports, as in a run)

    if mode == "marks":
        write_marks(folder, blocks)
        print(json.dumps({}))
    else:
        print(json.dumps(run_tree(folder, blocks) if mode == "tree" else run_one_driver(folder, blocks)))


def in_fresh_process(mode: str, folder: str, blocks: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, folder, str(blocks)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[3, 4, 5], help="log10 of the block counts")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows = []
    for exponent in args.sizes:
        blocks = 10**exponent
        with tempfile.TemporaryDirectory(prefix="volseg-merge-") as tmp:
            folder = f"{tmp}/instances.zarr"
            Path(folder).mkdir()
            in_fresh_process("marks", folder, blocks)
            tree = in_fresh_process("tree", folder, blocks)
            one = in_fresh_process("one", folder, blocks)
            assert tree["objects"] == one["objects"], (tree, one)
        rows.append((blocks, tree, one))
        print(f"10^{exponent} blocks done", file=sys.stderr, flush=True)
    print("| blocks | pieces | objects | tree levels | tree merge s | tree peak RSS MB | driver entries after | "
          "one-driver union-find s | one-driver peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for blocks, tree, one in rows:
        print(f"| {blocks:.0e} | {tree['pieces']:,} | {tree['objects']:,} | {tree['levels']} | {tree['seconds']:.1f} | "
              f"{tree['rss']:.0f} (+{tree['rss'] - tree['base_rss']:.0f}) | {tree['driver_entries']} | "
              f"{one['seconds']:.1f} | {one['rss']:.0f} (+{one['rss'] - one['base_rss']:.0f}) |")
    print("\nRSS in parentheses: growth over the process after its imports. The tree's nodes ran in the driver "
          "process here (serial executor); its own state is the 'driver entries' (one per tree node).")


if __name__ == "__main__":
    main()
