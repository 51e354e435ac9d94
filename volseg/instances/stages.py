"""The block stages of instance segmentation: the semantic outputs labelled blockwise, stitched across
block faces.

Three block stages and a merge between the last two, all on any executor of :mod:`volseg.engine`
(:func:`volseg.instances.run.run_instances` runs them in turn)::

    pass 1  LabelStage        foreground = probability > threshold; connected components of the core,
                              or a watershed of the context box (core + halo) from density peaks;
                              writes the core as piece ids (block id in the high bits), outcome: sizes
    pass 2  FaceContactStage  connected components: reads the written labels in slabs across its faces,
                              outcome: the pairs (its piece, a neighbour's piece) that touch
            HaloOverlapStage  watershed: recomputes its labels over the context box and compares them
                              with what the neighbours wrote there, outcome: pieces that agree
    merge   volseg.instances.merge: a union-find distributed over super-blocks, joining pieces where both
                              blocks report the pair; sizes summed; small objects dropped; a relabel
                              table per super-block
    pass 3  RelabelStage      remaps each core's piece ids to consecutive final ids (fastremap), in place

Connected components are **exact**: a block's components are the whole volume's components cut by
its core, and two pieces of one component always touch across a face, edge or corner, which pass 2
sees in a slab two voxels thick (the last layer of the core and the first of the next core), from
both sides::

    core of b          | core of b+1 (along x)
    . . . . . . . [p] [q] . . . .      slab of b along x: x in [stop-1, stop+1); on y and z the core
                  ^^^^^^^              widened by one voxel on both sides, so pieces of diagonal
                                       neighbours that touch only at an edge or corner are paired too;
                                       b reports (p, q), b+1 reports (q, p) from its slab at x = start

A watershed floods from seeds that may lie far away, so no finite halo makes it exact. What keeps a
block close to the whole-volume pass: its core's seeds are exact (a seed only looks ``seed_radius_vx``
away, and the halo is several radii wide); an object entering the context box from a seed outside
it gets a stand-in seed where its density rises out of the box
(:func:`~volseg.instances.labels.watershed_seeds`); and pass 2 joins two pieces only where both blocks,
each in the inner half of its halo, find that they agree on a majority of their overlap
(:func:`volseg.instances.stitching.overlap_pairs`). Pass 2 recomputes the block's labels rather than
storing the halo's, so the done-marks stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fastremap
import numpy as np

from volseg.engine.stage import Pending
from volseg.geometry import Block, BlockGrid, Box
from volseg.instances.labels import InstanceParams, core_pieces, label_box, piece_sizes
from volseg.instances.stitching import (
    RelabelTable,
    contact_pairs,
    overlap_pairs,
    owner_blocks,
    piece_blocks,
    piece_ids,
)
from volseg.io import Volume
from volseg.io.storage import read_keys
from volseg.io.urls import VolumeURL

#: The part of the halo (from the core outwards) where a block's watershed is compared with its
#: neighbours': farther out, its labels see too little context to be trusted.
STITCH_BAND = 0.5


class _Reads:
    """Reads started together; ``result()`` waits for all of them (``None`` stays ``None``)."""

    def __init__(self, *pending: Pending | None) -> None:
        self.pending = pending

    def result(self) -> tuple[Any, ...]:
        return tuple(None if p is None else p.result() for p in self.pending)


@dataclass(frozen=True)
class BlockPieces:
    """A block's written core (uint64 piece ids) and its pieces' voxel counts (local id order)."""

    ids: np.ndarray
    sizes: list[int]


class _SemanticReader:
    """What the label and overlap stages share: the semantic inputs and the context box of a block."""

    def __init__(self, params: InstanceParams, grid: BlockGrid, probabilities: Volume, density: Volume | None,
                 instances: Volume) -> None:
        self.params = params
        self.grid = grid
        self.probabilities = probabilities
        self.density = density if params.needs_density else None
        self.instances = instances

    def context(self, block: Block) -> Box:
        """Core + halo, clipped to the region of interest (the roi is the whole volume of this labelling)."""
        return block.core.grow(self.params.halo_vx).intersect(self.grid.roi)

    def read_box(self, block: Block) -> Box:
        """The context box (the overlap stage's band lies inside it)."""
        return self.context(block)

    def _read_semantic(self, box: Box) -> tuple[Pending, Pending | None]:
        density = None if self.density is None else self.density.read_async(box)
        return self.probabilities.read_async(box), density

    def _labels(self, probabilities: np.ndarray, density: np.ndarray | None) -> np.ndarray:
        if self.probabilities.num_channels is not None:
            probabilities = probabilities[self.params.channel]
        return label_box(self.params, probabilities, density)

    def to(self, device: str) -> None:
        return None


class LabelStage(_SemanticReader):
    """Pass 1: label each block from its context box and write its core as piece ids.

    Outcome: ``{"sizes": [voxels of local piece 1, 2, ...]}``."""

    name = "instances-label"
    keep_outcomes = False  # the merge reads them per super-block from the done-marks

    def read(self, block: Block) -> Pending:
        return _Reads(*self._read_semantic(self.context(block)))

    def compute(self, block: Block, data: tuple[np.ndarray, np.ndarray | None]) -> BlockPieces:
        box = self.context(block)
        local, _ = core_pieces(self._labels(*data), box, block.core)
        return BlockPieces(piece_ids(block.id, local), piece_sizes(local))

    def write(self, block: Block, computed: BlockPieces) -> list[Pending]:
        return [self.instances.write_async(block.core, computed.ids)]

    def outcome(self, block: Block, computed: BlockPieces) -> dict[str, list[int]]:
        return {"sizes": computed.sizes}


class FaceContactStage:
    """Pass 2 of connected components: the pairs (this block's piece, another block's piece) that touch
    across this block's faces, edges or corners (see the module docstring), every one from this side.

    Outcome: ``{"pairs": [[my piece id, its piece id], ...]}``."""

    name = "instances-stitch"
    keep_outcomes = False

    def __init__(self, params: InstanceParams, grid: BlockGrid, instances: Volume) -> None:
        self.params = params
        self.grid = grid
        self.instances = instances

    def read_box(self, block: Block) -> Box:
        """The core grown by one voxel on every side, clipped to the roi: the slabs' union."""
        return block.core.grow(1).intersect(self.grid.roi)

    def slabs(self, block: Block) -> list[Box]:
        """Per face with a neighbour: the core's last layer and the neighbour's first, across the grown box."""
        roi, core, grown = self.grid.roi, block.core, self.read_box(block)
        boxes = []
        for axis in range(3):
            for edge, inside in ((core.start[axis], core.start[axis] > roi.start[axis]),
                                 (core.stop[axis], core.stop[axis] < roi.stop[axis])):
                if inside:
                    start, stop = list(grown.start), list(grown.stop)
                    start[axis], stop[axis] = edge - 1, edge + 1
                    boxes.append(Box(tuple(start), tuple(stop)))
        return boxes

    def read(self, block: Block) -> Pending:
        return _Reads(*(self.instances.read_async(box) for box in self.slabs(block)))

    def compute(self, block: Block, slabs: tuple[np.ndarray, ...]) -> np.ndarray:
        pairs = np.concatenate([np.zeros((0, 2), np.uint64)]
                               + [contact_pairs(slab, self.params.connectivity) for slab in slabs])
        owner = piece_blocks(pairs) if len(pairs) else np.zeros((0, 2), np.int64)
        mine = owner == block.id
        one = mine[:, 0] != mine[:, 1]  # a pair of two neighbours is theirs to report
        oriented = np.where(mine[one, :1], pairs[one], pairs[one][:, ::-1])
        return np.unique(oriented, axis=0)

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return []

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, list[list[int]]]:
        return {"pairs": computed.tolist()}

    def to(self, device: str) -> None:
        return None


class HaloOverlapStage(_SemanticReader):
    """Pass 2 of the watershed: relabel the context box exactly as pass 1 did and pair this block's
    pieces with the pieces its neighbours wrote where the two agree (``overlap_pairs``).

    Outcome: ``{"pairs": [[piece id, piece id], ...]}``."""

    name = "instances-stitch"
    keep_outcomes = False

    def band(self, block: Block) -> Box:
        """The core grown by the inner part of the halo: where this block's labels are compared."""
        width = tuple(min(h, max(1, round(STITCH_BAND * h))) for h in self.params.halo_vx)
        return block.core.grow(width).intersect(self.grid.roi)

    def read(self, block: Block) -> Pending:
        return _Reads(*self._read_semantic(self.context(block)), self.instances.read_async(self.band(block)))

    def compute(self, block: Block, data: tuple[np.ndarray, np.ndarray | None, np.ndarray]) -> np.ndarray:
        probabilities, density, written = data
        box, band = self.context(block), self.band(block)
        labels = self._labels(probabilities, density)
        _, mapping = core_pieces(labels, box, block.core)
        labels = labels[band.relative_to(box)]
        everything = {int(label): 0 for label in fastremap.unique(labels).tolist()}
        mine = piece_ids(block.id, fastremap.remap(labels, {**everything, **mapping}))
        owners = owner_blocks(self.grid, band)
        shell = owners != block.id
        return overlap_pairs(mine[shell], written[shell], owners[shell])

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return []

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, list[list[int]]]:
        return {"pairs": computed.tolist()}


class RelabelStage:
    """Pass 3: remap a core's piece ids to final ids, in place, from the relabel table of its super-block
    (the one file of the merge it reads; an actor keeps the last one it read). Idempotent: final ids lie
    below 2**32, piece ids above, so a core remapped already (a crash before its done-mark) stays as it is.

    Outcome: ``{"instances": distinct final ids in the core}``."""

    name = "instances-relabel"
    keep_outcomes = False

    def __init__(self, folder: VolumeURL, leaf_blocks: int, instances: Volume) -> None:
        self.folder = folder
        self.leaf_blocks = leaf_blocks
        self.instances = instances
        self._table: tuple[int, RelabelTable] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    def read_box(self, block: Block) -> Box:
        return block.core

    def table(self, block: Block) -> RelabelTable:
        leaf = block.id // self.leaf_blocks
        if self._table is None or self._table[0] != leaf:
            key = f"relabel/{leaf}"
            self._table = (leaf, RelabelTable.decode(read_keys(self.folder, [key])[key], key))
        return self._table[1]

    def read(self, block: Block) -> Pending:
        return self.instances.read_async(block.core)

    def compute(self, block: Block, labels: np.ndarray) -> np.ndarray:
        relabelled = fastremap.remap(labels, self.table(block).mapping(block.id), preserve_missing_labels=True)
        return relabelled.astype(np.uint64, copy=False)

    def write(self, block: Block, computed: np.ndarray) -> list[Pending]:
        return [self.instances.write_async(block.core, computed)]

    def outcome(self, block: Block, computed: np.ndarray) -> dict[str, int]:
        return {"instances": int(np.count_nonzero(fastremap.unique(computed)))}

    def to(self, device: str) -> None:
        return None
