"""Stitching block pieces into objects with no per-object state in the driver: a union-find distributed
over a tree of super-blocks, on the run's executor, its inputs and results in storage beside the marks.

The tree's leaves are ranges of ``leaf_blocks`` consecutive block ids (by default a super-block of the
done-marks, whose one mark object holds the leaf's inputs); a node of level k+1 joins ``fan_in`` nodes of
level k, up to one top node. An **element** is a set of pieces already joined below (a piece, at a leaf),
named by its smallest piece id. A **half-edge** ``(p, q, r)`` says that the block of piece ``p`` found
``p`` and ``q`` to be one object, ``p`` lying in element ``r``. Blocks report every contact with pieces of
other blocks from their own side, so two pieces are joined exactly when both halves meet, inside the
smallest node that holds both blocks (for connected components both halves always exist; a watershed's
blocks must agree)::

    up (one pass per level, leaves first)     a node joins its elements along its inner edges (scipy's
        connected components); an object with a half-edge leaving the node stays open and goes up
        (smallest piece, partial size, its outer half-edges); the others close: kept when they reach
        the minimum size, else dropped, and the node ranks its kept ones by smallest piece.
        writes up/<level>/<node> (for the parent) and map/<level>/<node>; outcome: its counts
    driver                                    numbers the nodes' kept objects one node after another,
        level by level (an integer per node: O(super-blocks), never O(objects))
    down (one pass per level, top first)      a node's final ids: base + rank for what it closed, 0 for
        what it dropped, and for what it sent up the ids its parent resolved; writes them to each child
        (resolved/<level>/<node>), and a leaf writes the relabel table of its blocks (relabel/<leaf>)
    relabel pass                              each block reads only its leaf's table
    properties (one task)                     the objects' sizes (sizes/<level>/<node>, written by the
        down pass) as Neuroglancer segment properties beside the instance output

Every node writes the same bytes whoever runs it and however often (each is a pure function of its
inputs), so a resumed or retried merge is exact, and a run with one leaf (under ``leaf_blocks`` blocks)
numbers its objects by smallest piece, as one whole-volume pass would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from volseg.engine.ledger import SUPER_BLOCK, BlockLedger
from volseg.engine.stage import BlockStage, Executor, Pending, Resolved, RunStats, run_stage
from volseg.geometry import Block, BlockGrid, Box
from volseg.instances.stitching import RelabelTable, decode_arrays, encode_arrays, piece_blocks, piece_ids
from volseg.io.storage import open_kvstore, read_keys
from volseg.io.urls import VolumeURL

#: Nodes of one level joined by a node of the next.
FAN_IN = 16


@dataclass(frozen=True)
class MergeTree:
    """The tree over ``num_blocks`` block ids: leaves of ``leaf_blocks`` ids, ``fan_in`` children a node."""

    num_blocks: int
    leaf_blocks: int = SUPER_BLOCK
    fan_in: int = FAN_IN

    def __post_init__(self) -> None:
        if self.leaf_blocks < 1 or self.fan_in < 2:
            raise ValueError(f"a merge tree needs leaf_blocks ≥ 1 and fan_in ≥ 2 (got {self.leaf_blocks}, "
                             f"{self.fan_in})")

    def span(self, level: int) -> int:
        """Block ids per node of ``level``."""
        return self.leaf_blocks * self.fan_in**level

    def nodes(self, level: int) -> int:
        return max(1, -(-self.num_blocks // self.span(level)))

    @property
    def top(self) -> int:
        """The level of the one node that holds every block."""
        level = 0
        while self.nodes(level) > 1:
            level += 1
        return level

    def blocks(self, level: int, node: int) -> range:
        span = self.span(level)
        return range(node * span, min((node + 1) * span, self.num_blocks))

    def children(self, level: int, node: int) -> range:
        """The nodes of ``level - 1`` that ``node`` joins."""
        return range(node * self.fan_in, min((node + 1) * self.fan_in, self.nodes(level - 1)))


def task_grid(count: int) -> BlockGrid:
    """A grid of ``count`` unit blocks: the executors run one tree node per block (its id is the node's)."""
    box = Box((0, 0, 0), (1, 1, max(count, 1)))
    return BlockGrid(box, (1, 1, 1), 0, box)


# --- joining the elements of one node --------------------------------------------------------------------


@dataclass(frozen=True)
class Elements:
    """What a node joins: element ids (sorted, uint64), their sizes (voxels), and half-edges ``K×3``
    ``(p, q, r)`` (uint64)."""

    ids: np.ndarray
    sizes: np.ndarray
    half_edges: np.ndarray

    @classmethod
    def concat(cls, parts: Sequence[Elements]) -> Elements:
        return cls(np.concatenate([np.zeros(0, np.uint64)] + [p.ids for p in parts]),
                   np.concatenate([np.zeros(0, np.int64)] + [p.sizes for p in parts]),
                   np.concatenate([np.zeros((0, 3), np.uint64)] + [p.half_edges for p in parts]))


@dataclass(frozen=True)
class Joined:
    """A node's verdict. Per element: ``component``; per component: ``roots`` (smallest piece), ``sizes``
    and ``ranks`` (1.. for the kept objects it closed, by root; 0 dropped; -1 open). ``up``: the open
    components as the parent's elements."""

    component: np.ndarray
    roots: np.ndarray
    sizes: np.ndarray
    ranks: np.ndarray
    up: Elements

    @property
    def kept(self) -> int:
        return int((self.ranks > 0).sum())

    @property
    def closed(self) -> int:
        return int((self.ranks >= 0).sum())


def join(elements: Elements, blocks: range, min_size_vx: int) -> Joined:
    """Join ``elements`` along the half-edges whose two halves both lie in this node (blocks ``blocks``)."""
    ids, half = elements.ids, np.unique(elements.half_edges.reshape(-1, 3), axis=0)
    q_block = piece_blocks(half[:, 1]) if len(half) else np.zeros(0, np.int64)
    inner = (q_block >= blocks.start) & (q_block < blocks.stop)
    keys = np.sort(half[inner, :2], axis=1)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    keys, owners = keys[order], half[inner, 2][order]
    both = np.flatnonzero((keys[1:] == keys[:-1]).all(axis=1)) if len(keys) > 1 else np.zeros(0, np.int64)
    first, second = np.searchsorted(ids, owners[both]), np.searchsorted(ids, owners[both + 1])
    graph = coo_matrix((np.ones(len(both), np.int8), (first, second)), shape=(len(ids), len(ids)))
    count, component = connected_components(graph, directed=False)
    _, first_member = np.unique(component, return_index=True)  # ids are sorted: the first is the smallest
    roots = ids[first_member]
    sizes = np.bincount(component, weights=elements.sizes.astype(np.float64), minlength=count).astype(np.int64)

    outer = half[~inner]
    outer_component = component[np.searchsorted(ids, outer[:, 2])]
    is_open = np.zeros(count, bool)
    is_open[outer_component] = True
    ranks = np.full(count, -1, np.int64)
    kept = ~is_open & (sizes >= max(min_size_vx, 1))
    ranks[~is_open] = 0
    ranks[kept] = np.arange(1, int(kept.sum()) + 1)  # components are numbered in root order
    up_half = np.stack([outer[:, 0], outer[:, 1], roots[outer_component]], axis=1) if len(outer) else \
        np.zeros((0, 3), np.uint64)
    up = Elements(roots[is_open], sizes[is_open], up_half.astype(np.uint64))
    return Joined(component, roots, sizes, ranks, up)


def leaf_elements(label_outcomes: dict[int, Any], stitch_outcomes: dict[int, Any], blocks: range
                  ) -> tuple[np.ndarray, Elements]:
    """``(counts per block, elements)`` of a leaf: every piece of its blocks (from the label pass's
    ``sizes``) and the half-edges its blocks reported (the stitch pass's ``pairs``, ``(mine, theirs)``)."""
    counts = np.array([len(label_outcomes[b]["sizes"]) for b in blocks], np.int64)
    sizes = np.concatenate([np.zeros(0, np.int64)] + [np.asarray(label_outcomes[b]["sizes"], np.int64)
                                                       for b in blocks])
    ids = block_pieces(blocks, counts)
    pairs = np.concatenate([np.zeros((0, 2), np.uint64)] + [np.asarray(stitch_outcomes[b]["pairs"], np.uint64)
                                                            .reshape(-1, 2) for b in blocks])
    return counts, Elements(ids, sizes, np.concatenate([pairs, pairs[:, :1]], axis=1))


def block_pieces(blocks: range, counts: np.ndarray) -> np.ndarray:
    """The piece ids of ``blocks`` (``counts[i]`` pieces in the i-th), in order (uint64)."""
    locals_ = np.concatenate([np.zeros(0, np.int64)] + [np.arange(1, c + 1) for c in counts])
    return piece_ids(np.repeat(np.arange(blocks.start, blocks.stop), counts), locals_).astype(np.uint64)


def finals(joined: Joined, base: int, resolved: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Final id of every element: ``base`` + rank for a kept object closed here, 0 for a dropped one,
    and for an open one what the parent resolved (``(roots, finals)``, roots sorted)."""
    ranks = joined.ranks[joined.component]
    out = np.where(ranks > 0, base + ranks, 0).astype(np.uint64)
    open_ = ranks < 0
    if open_.any():
        roots, values = resolved
        roots_of = joined.roots[joined.component[open_]]
        at = np.searchsorted(roots, roots_of)
        if (at >= len(roots)).any() or (roots[np.minimum(at, len(roots) - 1)] != roots_of).any():
            raise RuntimeError("the parent's resolved ids lack an object this node sent up; rerun the merge")
        out[open_] = values[at]
    return out


def leaf_table(counts: np.ndarray, ids: np.ndarray, joined: Joined, final: np.ndarray, first_block: int,
               base: int) -> RelabelTable:
    """The relabel table of a leaf's blocks: a kept object it closed keeps its smallest piece as the
    default (numbered ``base`` + rank, block after block); every other piece is an exception."""
    is_default = (joined.ranks[joined.component] > 0) & (joined.roots[joined.component] == ids)
    block_of_piece = np.repeat(np.arange(len(counts)), counts)
    defaults = np.bincount(block_of_piece[is_default], minlength=len(counts))
    bases = base + np.concatenate([[0], np.cumsum(defaults)[:-1]]).astype(np.int64)
    return RelabelTable(counts, bases, ids[~is_default], final[~is_default], int(defaults.sum()), first_block)


# --- storage -----------------------------------------------------------------------------------------------


def read_prefix(folder: VolumeURL, prefix: str) -> dict[str, dict[str, np.ndarray]]:
    """Every array file under ``prefix`` in ``folder`` (e.g. the pairs routed to one node), by key."""
    stop = prefix[:-1] + chr(ord(prefix[-1]) + 1)  # the first key after every key with the prefix
    keys = [k.decode() for k in open_kvstore(folder).list(ts.KvStore.KeyRange(prefix, stop)).result()]
    found = read_keys(folder, keys)
    return {key: decode_arrays(found[key], key) for key in keys}


def _elements(data: dict[str, np.ndarray]) -> Elements:
    return Elements(data["ids"], data["sizes"], data["half_edges"].reshape(-1, 3))


class FileWrites:
    """Concurrent writes of named files into one folder; ``result()`` waits for all of them."""

    def __init__(self, folder: VolumeURL, items: dict[str, bytes]) -> None:
        store = open_kvstore(folder)
        self.pending = [store.write(key, value) for key, value in items.items()]

    def result(self) -> None:
        for pending in self.pending:
            pending.result()


@dataclass(frozen=True)
class MergeInputs:
    """Where a merge reads and writes: the run's ``ledger`` (the label and stitch passes' outcomes) and
    ``folder`` (the merge's own files)."""

    tree: MergeTree
    folder: VolumeURL
    ledger: BlockLedger
    label_stage: str
    stitch_stage: str
    min_size_vx: int


class MergeUpStage:
    """The up pass of one level: a task per node (see the module docstring). Outcome: ``{"pieces",
    "closed", "kept"}`` of the node."""

    def __init__(self, inputs: MergeInputs, level: int) -> None:
        self.inputs, self.level = inputs, level
        self.name = f"instances-merge-up-{level}"

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        m, node = self.inputs, block.id
        if self.level == 0:
            blocks = m.tree.blocks(0, node)
            return Resolved((m.ledger.outcomes(m.label_stage, blocks.start, blocks.stop),
                             m.ledger.outcomes(m.stitch_stage, blocks.start, blocks.stop)))
        keys = [f"up/{self.level - 1}/{child}" for child in m.tree.children(self.level, node)]
        found = read_keys(m.folder, keys)
        return Resolved([_elements(decode_arrays(found[key], key)) for key in keys])

    def compute(self, block: Block, data: Any) -> tuple[dict[str, bytes], dict[str, int]]:
        m, node = self.inputs, block.id
        blocks = m.tree.blocks(self.level, node)
        if self.level == 0:
            counts, elements = leaf_elements(*data, blocks)
            shape = {"counts": counts}
        else:
            elements = Elements.concat(data)
            shape = {"ids": elements.ids}
        joined = join(elements, blocks, m.min_size_vx)
        up = joined.up
        files = {
            f"up/{self.level}/{node}": encode_arrays(ids=up.ids, sizes=up.sizes, half_edges=up.half_edges),
            f"map/{self.level}/{node}": encode_arrays(**shape, component=joined.component, roots=joined.roots,
                                               ranks=joined.ranks, sizes=joined.sizes),
        }
        pieces = int(shape["counts"].sum()) if self.level == 0 else 0
        return files, {"pieces": pieces, "closed": joined.closed, "kept": joined.kept}

    def write(self, block: Block, computed: tuple[dict[str, bytes], dict[str, int]]) -> list[Pending]:
        return [FileWrites(self.inputs.folder, computed[0])]

    def outcome(self, block: Block, computed: tuple[dict[str, bytes], dict[str, int]]) -> dict[str, int]:
        return computed[1]

    def to(self, device: str) -> None:
        return None


class MergeDownStage:
    """The down pass of one level: each node's final ids, handed to its children (or, at a leaf, its
    blocks' relabel table). ``bases[node]``: the ids numbered before this node's kept objects."""

    def __init__(self, inputs: MergeInputs, level: int, bases: np.ndarray) -> None:
        self.inputs, self.level, self.bases = inputs, level, np.asarray(bases, np.int64)
        self.name = f"instances-merge-down-{level}"

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        node, top = block.id, self.level == self.inputs.tree.top
        keys = [f"map/{self.level}/{node}"] + ([] if top else [f"resolved/{self.level}/{node}"])
        found = read_keys(self.inputs.folder, keys)
        return Resolved([decode_arrays(found[key], key) for key in keys])

    def compute(self, block: Block, data: list[dict[str, np.ndarray]]) -> dict[str, bytes]:
        m, node = self.inputs, block.id
        stored = data[0]
        joined = Joined(stored["component"], stored["roots"], stored["sizes"], stored["ranks"], Elements.concat([]))
        resolved = (data[1]["ids"], data[1]["finals"]) if len(data) > 1 else (np.zeros(0, np.uint64),
                                                                              np.zeros(0, np.uint64))
        base = int(self.bases[node])
        final = finals(joined, base, resolved)
        kept = joined.ranks > 0
        files = {f"sizes/{self.level}/{node}": encode_arrays(ids=(base + joined.ranks[kept]).astype(np.uint64),
                                                      sizes=joined.sizes[kept])}  # the objects this node closed
        if self.level == 0:
            blocks = m.tree.blocks(0, node)
            counts = stored["counts"]
            table = leaf_table(counts, block_pieces(blocks, counts), joined, final, blocks.start, base)
            return {**files, f"relabel/{node}": table.encode()}
        ids = stored["ids"]
        child_of = (piece_blocks(ids) // m.tree.span(self.level - 1)) if len(ids) else np.zeros(0, np.int64)
        return {**files, **{f"resolved/{self.level - 1}/{child}": encode_arrays(ids=ids[child_of == child],
                                                                         finals=final[child_of == child])
                            for child in m.tree.children(self.level, node)}}

    def write(self, block: Block, computed: dict[str, bytes]) -> list[Pending]:
        return [FileWrites(self.inputs.folder, computed)]

    def outcome(self, block: Block, computed: dict[str, bytes]) -> None:
        return None

    def to(self, device: str) -> None:
        return None


def numbering(kept_per_node: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per level, each node's base: the kept objects of every node before it (levels in order, nodes in
    order within a level)."""
    bases, before = [], 0
    for kept in kept_per_node:
        kept = np.asarray(kept, np.int64)
        bases.append(before + np.concatenate([[0], np.cumsum(kept)[:-1]]).astype(np.int64))
        before += int(kept.sum())
    return bases


@dataclass(frozen=True)
class MergeResult:
    """What the merge found: ``pieces`` the blocks labelled, the ``objects`` they form, ``dropped`` (under
    the minimum size), ``instances`` kept (ids 1..instances); ``stats`` of its passes: time, retries, and
    a node that failed every attempt reported under the first block it holds; ``nodes``: the tree nodes
    it ran or found done (what the driver held per node: one count each)."""

    instances: int
    pieces: int
    objects: int
    dropped: int
    stats: RunStats
    nodes: int = 0
    bases: tuple[np.ndarray, ...] = ()


def merge(executor: Executor, inputs: MergeInputs, ledger: BlockLedger | None = None) -> MergeResult:
    """Run the merge's passes (up, level by level; then down, from the top) on ``executor``; ``ledger``
    marks each node done, so a resumed merge runs only what it had not finished."""
    tree = inputs.tree
    stats = RunStats()
    kept, pieces, closed = [], 0, 0
    for level in range(tree.top + 1):
        result = run_level(executor, MergeUpStage(inputs, level), tree, level, ledger)
        stats = stats.merge(side_pass(result))
        if result.failed:
            return MergeResult(0, 0, 0, 0, stats)
        counts = [result.outcomes[node] for node in range(tree.nodes(level))]
        kept.append(np.array([c["kept"] for c in counts], np.int64))
        pieces += sum(c["pieces"] for c in counts)
        closed += sum(c["closed"] for c in counts)
    bases = numbering(kept)
    for level in reversed(range(tree.top + 1)):
        result = run_level(executor, MergeDownStage(inputs, level, bases[level]), tree, level, ledger)
        stats = stats.merge(side_pass(result))
        if result.failed:
            return MergeResult(0, 0, 0, 0, stats)
    instances = int(sum(int(k.sum()) for k in kept))
    return MergeResult(instances, pieces, closed, closed - instances, stats, sum(len(k) for k in kept), tuple(bases))


def run_level(executor: Executor, stage: BlockStage, tree: MergeTree, level: int, ledger: BlockLedger | None
              ) -> RunStats:
    """Run ``stage`` with one task per node of ``level``; a node that failed every attempt is reported under
    the first block it holds."""
    stats = run_stage(executor, stage, task_grid(tree.nodes(level)), ledger).stats
    failed = {}
    for node, error in stats.failed.items():
        blocks = tree.blocks(level, node)
        failed[blocks.start] = f"merging the instances of blocks {blocks.start}..{blocks.stop - 1}: {error}"
    return RunStats(stats.blocks_done, 0, stats.seconds, stats.outcomes, stats.retried, failed, stats.workers,
                    stats.startup_seconds)


def side_pass(stats: RunStats) -> RunStats:
    """A pass's stats as the instance run counts them beside its block passes: time, retries and failures
    (its tasks are tree nodes or a second look at blocks, and their outcomes are its own)."""
    return dataclasses.replace(stats, blocks_done=0, voxels=0, outcomes={})
