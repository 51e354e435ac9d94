"""Stitching blockwise instances into one labelling: piece ids, face contacts, halo overlaps, relabel tables.

Every block labels its own core with **piece ids** that are unique without coordination: the block id
in the high 32 bits, a local id 1..N in the low 32 bits (``(block_id + 1) << 32 | local``, so 0 stays
background and every piece id is at least 2**32, above any final id). The merge then needs only small
per-block summaries, which is what the done-marks keep::

    label pass    block b → N_b and the size of each of its pieces
    stitch pass   block b → pairs (its piece, another block's piece) that belong to one object, found
                  from its own side
    merge         a union-find distributed over super-blocks (:mod:`volseg.instances.merge`) → objects;
                  sizes summed over pieces; objects under the minimum size dropped; the rest numbered
                  1..K; one relabel table per super-block
    relabel pass  block b → its core remapped piece id → final id (fastremap)

Most objects lie inside one block and keep their piece's rank, so a :class:`RelabelTable` stores
only a base per block and the exceptions (pieces merged into another block's object, or dropped).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from volseg.geometry import BlockGrid, Box

LOCAL_BITS = 32
LOCAL_MASK = (1 << LOCAL_BITS) - 1
#: cc3d connectivity → how many axes a neighbour offset may change at once (faces, +edges, +corners).
CONNECTIVITY_AXES = {6: 1, 18: 2, 26: 3}


def piece_ids(block_id: int | np.ndarray, local: np.ndarray) -> np.ndarray:
    """Global uint64 piece ids of local labels of block ``block_id`` (or of one block id per label); 0 stays 0."""
    local = np.asarray(local).astype(np.uint64, copy=False)
    high = (np.asarray(block_id).astype(np.uint64) + np.uint64(1)) << np.uint64(LOCAL_BITS)
    return np.where(local > 0, local | high, np.uint64(0))


def piece_blocks(ids: np.ndarray) -> np.ndarray:
    """The block id (int64) that wrote each piece id (ids must be nonzero piece ids)."""
    return (np.asarray(ids, dtype=np.uint64) >> np.uint64(LOCAL_BITS)).astype(np.int64) - 1


def forward_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """Half of the neighbour offsets of ``connectivity`` (6, 18 or 26): each neighbour pair once."""
    if connectivity not in CONNECTIVITY_AXES:
        raise ValueError(f"connectivity {connectivity} is not one of {sorted(CONNECTIVITY_AXES)}")
    axes = CONNECTIVITY_AXES[connectivity]
    return [d for d in itertools.product((-1, 0, 1), repeat=3)
            if d > (0, 0, 0) and sum(map(abs, d)) <= axes]


def _shifted(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices ``(a, b)`` such that ``array[b]`` holds the neighbour at ``offset`` of each voxel of ``array[a]``."""
    source, target = [], []
    for n, d in zip(shape, offset, strict=True):
        source.append(slice(max(0, -d), n - max(0, d)))
        target.append(slice(max(0, d), n - max(0, -d)))
    return tuple(source), tuple(target)


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distinct unordered pairs as a ``K×2`` uint64 array, smaller id first, sorted."""
    if a.size == 0:
        return np.zeros((0, 2), np.uint64)
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1).astype(np.uint64)
    return np.unique(pairs, axis=0)


def contact_pairs(labels: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs of pieces of *different* blocks that touch (as ``connectivity`` says) in ``labels``.

    ``labels`` holds written piece ids, e.g. a thin slab across a block face. Touching pieces of one
    block are left out: for connected components they cannot occur, and for any other labelling the
    block decided they are separate objects.
    """
    first, second = [], []
    for offset in forward_offsets(connectivity):
        source, target = _shifted(labels.shape, offset)
        a, b = labels[source], labels[target]
        touching = (a != 0) & (b != 0) & ((a >> np.uint64(LOCAL_BITS)) != (b >> np.uint64(LOCAL_BITS)))
        first.append(a[touching])
        second.append(b[touching])
    return _unique_pairs(np.concatenate(first), np.concatenate(second))


def owner_blocks(grid: BlockGrid, box: Box) -> np.ndarray:
    """The id of the block whose core holds each voxel of ``box`` (inside ``grid.roi``), as an int64 array."""
    index = [(np.arange(start, stop) - origin) // core
             for start, stop, origin, core in zip(box.start, box.stop, grid.roi.start, grid.core_shape, strict=True)]
    _, gy, gx = grid.grid_shape
    return (index[0][:, None, None] * gy + index[1][None, :, None]) * gx + index[2][None, None, :]


def _compact(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, inverse = np.unique(values, return_inverse=True)
    return uniques, inverse.reshape(-1).astype(np.int64)


def overlap_pairs(mine: np.ndarray, written: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """Pairs ``(my piece, a neighbour's piece)`` (``K×2``, in that order) that look like one object
    where my context overlaps the neighbours' cores.

    ``mine`` is a block's own labelling (piece ids) of voxels outside its core, recomputed with the
    same context as when it wrote its core; ``written`` the piece ids the neighbours wrote there;
    ``owners`` the block id owning each voxel. Within each neighbour's part, my piece ``P`` and its
    piece ``Q`` are paired when they agree on a majority both ways: ``|P∩Q|`` is more than half of
    ``P``'s voxels there and more than half of ``Q``'s, so a piece pairs with at most one piece per
    neighbour. My labelling far from my core can still be wrong (flooded from a seed that is not
    the object's own); the merge (:mod:`volseg.instances.merge`) therefore joins only pairs that both blocks report.
    """
    keep = (mine != 0) | (written != 0)
    mine, written, owners = mine[keep], written[keep], owners[keep]
    mine_ids, mine_index = _compact(mine)
    written_ids, written_index = _compact(written)
    owner_ids, owner_index = _compact(owners)

    mine_in_owner = np.bincount(mine_index * len(owner_ids) + owner_index,
                                minlength=len(mine_ids) * len(owner_ids)).reshape(len(mine_ids), len(owner_ids))
    written_total = np.bincount(written_index, minlength=len(written_ids))
    both = (mine != 0) & (written != 0)
    keys, overlap = np.unique(mine_index[both] * len(written_ids) + written_index[both], return_counts=True)
    p, q = keys // len(written_ids), keys % len(written_ids)
    q_owner = np.searchsorted(owner_ids, piece_blocks(written_ids[q]))
    agree = (2 * overlap > mine_in_owner[p, q_owner]) & (2 * overlap > written_total[q])
    return np.stack([mine_ids[p[agree]], written_ids[q[agree]]], axis=1).astype(np.uint64)


@dataclass(frozen=True)
class RelabelTable:
    """Final ids of the pieces of blocks ``first_block, first_block + 1, …``, stored compactly: pieces not
    in ``exception_ids`` are the smallest piece of a kept object, and block ``b``'s such pieces get
    ``bases[b] + 1, bases[b] + 2, ...`` in local-id order (``b`` counted from ``first_block``).
    ``exception_ids`` (sorted) / ``exception_finals`` list every other piece with its final id (0:
    dropped). ``counts[b]`` is the number of pieces of block ``b``; ``defaults`` the pieces not listed."""

    counts: np.ndarray
    bases: np.ndarray
    exception_ids: np.ndarray
    exception_finals: np.ndarray
    defaults: int
    first_block: int = 0

    def mapping(self, block_id: int) -> dict[int, int]:
        """Piece id → final id for every piece of ``block_id`` (a dict for ``fastremap.remap``)."""
        row = block_id - self.first_block
        if not 0 <= row < len(self.counts):
            raise IndexError(f"block {block_id} is not in this relabel table (blocks {self.first_block}.."
                             f"{self.first_block + len(self.counts) - 1})")
        ids = piece_ids(block_id, np.arange(1, int(self.counts[row]) + 1))
        bounds = np.array([block_id + 1, block_id + 2], np.uint64) << np.uint64(LOCAL_BITS)
        lo, hi = np.searchsorted(self.exception_ids, bounds)
        listed = np.isin(ids, self.exception_ids[lo:hi], assume_unique=True)
        finals = np.zeros(ids.shape, np.uint64)
        finals[~listed] = int(self.bases[row]) + np.arange(1, int((~listed).sum()) + 1)
        finals[listed] = self.exception_finals[lo:hi][np.searchsorted(self.exception_ids[lo:hi], ids[listed])]
        return dict(zip(ids.tolist(), finals.tolist(), strict=True))

    def encode(self) -> bytes:
        """The table as ``.npz`` bytes (no pickle)."""
        return encode_arrays(counts=self.counts, bases=self.bases, exception_ids=self.exception_ids,
                             exception_finals=self.exception_finals, defaults=np.int64(self.defaults),
                             first_block=np.int64(self.first_block))

    @classmethod
    def decode(cls, raw: bytes | None, where: str = "relabel table") -> RelabelTable:
        data = decode_arrays(raw, where)
        return cls(data["counts"], data["bases"], data["exception_ids"].astype(np.uint64),
                   data["exception_finals"].astype(np.uint64), int(data["defaults"]), int(data["first_block"]))


def encode_arrays(**arrays: np.ndarray) -> bytes:
    """Named arrays as compressed ``.npz`` bytes: the files the merge, meshes and relabel tables keep."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def decode_arrays(raw: bytes | None, where: str) -> dict[str, np.ndarray]:
    """The arrays of :func:`encode_arrays` bytes (no pickle); ``None`` (a missing file) raises naming ``where``."""
    if raw is None:
        raise RuntimeError(f"the instance merge's {where} is missing; rerun the run to recompute it")
    with np.load(io.BytesIO(raw), allow_pickle=False) as data:
        return {name: data[name] for name in data.files}
