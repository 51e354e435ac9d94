"""Meshes of an instance output, blockwise: Neuroglancer precomputed (legacy) meshes, one fragment per
object and block, listed per object by a manifest.

A block meshes its core widened by one voxel at its upper faces (zmesh, marching cubes, left open where
the box ends), so the fragments of one object in neighbouring blocks meet without seams and without
caps inside the object. It writes one fragment per object with voxels in its core (an empty one when the
object fills the box and has no surface there), named ``<id>:0:<block>``::

    <instances>/mesh/info               {"@type": "neuroglancer_legacy_mesh"}
    <instances>/mesh/<id>:0:<block>     vertex count (uint32), vertices (float32 x, y, z in nm), triangles (uint32)
    <instances>/mesh/<id>:0             {"fragments": ["<id>:0:<block>", …]}   the manifest Neuroglancer reads

Manifests need every block with a fragment of an object, which no block knows alone: each block's
done-mark keeps the ids it wrote fragments of. The node of the merge tree that closed an object (its
final id lies in that node's range of ids) writes its manifest: each leaf reads its blocks' ids and sends
every (id, block) pair to the node that closed the object (``meshpairs/<level>/<node>/<leaf>`` in the
merge folder); then each level's nodes write the manifests of their objects, so no task holds more than
its node's objects and the driver holds nothing per object.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import fastremap
import numpy as np
import zmesh

from volseg.engine.ledger import BlockLedger
from volseg.engine.stage import Pending, Resolved
from volseg.geometry import Block, BlockGrid, Box
from volseg.instances.merge import FileWrites, MergeTree, read_prefix
from volseg.instances.stitching import encode_arrays
from volseg.io import Volume, parse_url
from volseg.io.storage import open_kvstore, update_json
from volseg.io.urls import VolumeURL

#: The folder of the meshes inside the instance output.
MESHES = "mesh"


def fragment_name(label: int, block: int) -> str:
    """A fragment's file name, ``<id>:0:<block>`` (``<id>:0`` is the manifest's: level of detail 0)."""
    return f"{label}:0:{block}"


def fragment(mesher: Any, label: int, origin_nm: Sequence[float]) -> bytes:
    """One object's legacy precomputed fragment: the mesher's surface of ``label`` (voxel-centred, so
    voxel i spans [i, i + 1) × its size, as Neuroglancer places it) moved to ``origin_nm`` (x, y, z)."""
    mesh = mesher.get(label, normals=False, voxel_centered=True)
    vertices = np.asarray(mesh.vertices, np.float32).reshape(-1, 3) + np.asarray(origin_nm, np.float32)
    faces = np.asarray(mesh.faces, np.uint32).reshape(-1, 3)
    return np.uint32(len(vertices)).tobytes() + vertices.tobytes() + faces.tobytes()


class MeshStage:
    """Fragments of every object of each block's core (see the module docstring). Reads the core widened
    by one voxel at its upper faces; writes files only (the volume is untouched)."""

    name = "instances-mesh"
    keep_outcomes = False

    def __init__(self, instances: Volume, grid: BlockGrid) -> None:
        self.instances = instances
        self.grid = grid
        self.folder = parse_url(instances.url).child(MESHES)

    def read_box(self, block: Block) -> Box:
        return block.core.grow(0, 1).intersect(self.grid.roi)

    def read(self, block: Block) -> Pending:
        return self.instances.read_async(self.read_box(block))

    def compute(self, block: Block, labels: np.ndarray) -> dict[str, bytes]:
        box = self.read_box(block)
        ids = [int(i) for i in fastremap.unique(labels) if i != 0]  # those of the widened layers too: their
        if not ids:                                                  # faces between the blocks are this block's
            return {}
        voxel = self.instances.voxel_size_nm
        mesher = zmesh.Mesher(voxel[::-1])
        mesher.mesh(np.asfortranarray(np.asarray(labels).transpose(2, 1, 0)), close=False)
        origin = [(s + o) * v for s, o, v in zip(box.start, self.instances.voxel_offset, voxel, strict=True)][::-1]
        files = {fragment_name(i, block.id): fragment(mesher, i, origin) for i in ids}
        mesher.clear()
        return files

    def write(self, block: Block, computed: dict[str, bytes]) -> list[Pending]:
        return [FileWrites(self.folder, computed)] if computed else []

    def outcome(self, block: Block, computed: dict[str, bytes]) -> dict[str, list[int]]:
        return {"ids": sorted(int(name.split(":")[0]) for name in computed)}

    def to(self, device: str) -> None:
        return None


def closing_node(final_ids: np.ndarray, bases: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(level, node) of the tree node whose range of final ids holds each id (``bases`` per level, as
    :func:`~volseg.instances.merge.numbering` gives them: levels in order, nodes in order)."""
    starts = np.concatenate([np.asarray(b, np.int64) for b in bases])
    levels = np.concatenate([np.full(len(b), level) for level, b in enumerate(bases)])
    nodes = np.concatenate([np.arange(len(b)) for b in bases])
    order = np.argsort(starts, kind="stable")  # bases grow level after level, node after node
    at = np.searchsorted(starts[order], np.asarray(final_ids, np.int64) - 1, side="right") - 1
    # several nodes may share a base (those that kept nothing): the last of them owns the range
    return levels[order][at], nodes[order][at]


class PairStage:
    """The routing pass (one task per leaf): the (id, block) pairs of the leaf's blocks, read from the
    mesh pass's done-marks, sent to the tree node that closed each object
    (``meshpairs/<level>/<node>/<leaf>``), that node's :class:`ManifestStage` writes the manifest."""

    name = "instances-mesh-pairs"
    keep_outcomes = False

    def __init__(self, folder: VolumeURL, tree: MergeTree, bases: Sequence[np.ndarray], ledger: BlockLedger) -> None:
        self.folder = folder  # the merge folder
        self.ledger = ledger  # the mesh pass's outcomes: the objects each block wrote a fragment of
        self.tree = tree
        self.bases = [np.asarray(b, np.int64) for b in bases]

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        blocks = self.tree.blocks(0, block.id)
        return Resolved(self.ledger.outcomes(MeshStage.name, blocks.start, blocks.stop))

    def compute(self, block: Block, outcomes: dict[int, Any]) -> dict[str, bytes]:
        pairs = np.array([(label, b) for b, outcome in sorted(outcomes.items()) for label in outcome["ids"]],
                         np.int64).reshape(-1, 2)
        if not len(pairs):
            return {}
        levels, nodes = closing_node(pairs[:, 0], self.bases)
        routed = {}
        for level, node in sorted(set(zip(levels.tolist(), nodes.tolist(), strict=True))):
            routed[f"meshpairs/{level}/{node}/{block.id}"] = encode_arrays(
                pairs=pairs[(levels == level) & (nodes == node)])
        return routed

    def write(self, block: Block, computed: dict[str, bytes]) -> list[Pending]:
        return [FileWrites(self.folder, computed)]

    def outcome(self, block: Block, computed: Any) -> None:
        return None

    def to(self, device: str) -> None:
        return None


class ManifestStage:
    """The manifests of the objects the nodes of one tree level closed, from the pairs sent to them."""

    keep_outcomes = False

    def __init__(self, folder: VolumeURL, level: int, instances: Volume) -> None:
        self.folder = folder  # the merge folder (routed pairs)
        self.level = level
        self.meshes = parse_url(instances.url).child(MESHES)
        self.name = f"instances-mesh-manifests-{level}"

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        routed = read_prefix(self.folder, f"meshpairs/{self.level}/{block.id}/")
        return Resolved([data["pairs"] for data in routed.values()])

    def compute(self, block: Block, parts: list[np.ndarray]) -> dict[str, bytes]:
        return _manifests(np.concatenate([np.zeros((0, 2), np.int64)] + [p.reshape(-1, 2) for p in parts]))

    def write(self, block: Block, computed: dict[str, bytes]) -> list[Pending]:
        return [FileWrites(self.meshes, computed)]

    def outcome(self, block: Block, computed: Any) -> None:
        return None

    def to(self, device: str) -> None:
        return None


def _manifests(pairs: np.ndarray) -> dict[str, bytes]:
    """``<id>:0`` → the manifest listing the fragment of every (id, block) pair."""
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    out = {}
    for label, blocks in zip(*_groups(pairs), strict=True):
        out[f"{label}:0"] = json.dumps({"fragments": [fragment_name(label, b) for b in blocks]}).encode()
    return out


def _groups(pairs: np.ndarray) -> tuple[list[int], list[list[int]]]:
    ids, starts = np.unique(pairs[:, 0], return_index=True)
    bounds = [*starts.tolist(), len(pairs)]
    return ids.tolist(), [pairs[a:b, 1].tolist() for a, b in itertools.pairwise(bounds)]


def write_mesh_info(instances: Volume) -> None:
    """``mesh/info``, and for a precomputed output its ``info`` pointing at it (kept if there)."""
    url = parse_url(instances.url)
    open_kvstore(url.child(MESHES)).write("info", json.dumps({"@type": "neuroglancer_legacy_mesh"}).encode()).result()
    if instances.format == "precomputed":
        update_json(url, "info", lambda info: None if info is None or info.get("mesh") == MESHES
                    else {**info, "mesh": MESHES})
