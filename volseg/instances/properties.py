"""Neuroglancer segment properties of an instance output: every object's size, beside the labels.

The merge's down pass leaves, per tree node, the final ids and voxel counts of the objects that node
closed (``sizes/<level>/<node>`` in the merge folder). One task gathers them into the ``inline`` segment
properties that Neuroglancer reads (one file for all objects, as the format has it)::

    <instances>/segment_properties/info   {"@type": "neuroglancer_segment_properties",
                                           "inline": {"ids": ["1", "2", …], "properties": [
                                               {"id": "voxels", …}, {"id": "volume_um3", …}]}}

A precomputed output lists it in its ``info`` (``"segment_properties": "segment_properties"``), so
Neuroglancer loads it with the segmentation; for a zarr output the viewer state adds it as a second
source of the segmentation layer (``precomputed://<instances>/segment_properties``).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from volseg.engine.stage import Pending, Resolved
from volseg.geometry import Block, Box
from volseg.instances.merge import read_prefix
from volseg.io import Volume, parse_url
from volseg.io.storage import open_kvstore, update_json
from volseg.io.urls import VolumeURL

#: The folder of the properties inside the instance output.
PROPERTIES = "segment_properties"


class PropertiesStage:
    """One task (block 0 of a one-block task grid): the segment properties of ``instances`` from the
    merge folder ``folder``. Outcome: ``{"objects": n}``."""

    name = "instances-properties"

    def __init__(self, folder: VolumeURL, instances: Volume) -> None:
        self.folder = folder
        self.instances = instances

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Pending:
        return Resolved([(data["ids"], data["sizes"]) for data in read_prefix(self.folder, "sizes/").values()])

    def compute(self, block: Block, parts: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
        ids = np.concatenate([np.zeros(0, np.uint64)] + [p[0] for p in parts]).astype(np.uint64)
        sizes = np.concatenate([np.zeros(0, np.int64)] + [p[1] for p in parts]).astype(np.int64)
        order = np.argsort(ids, kind="stable")
        return json.dumps(segment_properties(ids[order], sizes[order], self.instances.voxel_size_nm)).encode()

    def write(self, block: Block, computed: bytes) -> list[Pending]:
        url = parse_url(self.instances.url)
        pending = [open_kvstore(url).write(f"{PROPERTIES}/info", computed)]
        if self.instances.format == "precomputed":
            update_json(url, "info", _listing)
        return pending

    def outcome(self, block: Block, computed: bytes) -> dict[str, int]:
        return {"objects": len(json.loads(computed)["inline"]["ids"])}

    def to(self, device: str) -> None:
        return None


def _listing(info: dict[str, Any] | None) -> dict[str, Any] | None:
    if info is None or info.get("segment_properties") == PROPERTIES:
        return None
    return {**info, "segment_properties": PROPERTIES}


def segment_properties(ids: np.ndarray, sizes: np.ndarray, voxel_size_nm: tuple[float, float, float]
                       ) -> dict[str, Any]:
    """The inline segment properties of objects ``ids`` of ``sizes`` voxels: voxels and volume in µm³."""
    voxel_um3 = math.prod(voxel_size_nm) * 1e-9
    return {"@type": "neuroglancer_segment_properties", "inline": {
        "ids": [str(int(i)) for i in ids],
        "properties": [
            {"id": "voxels", "type": "number", "data_type": "uint32", "description": "size in voxels",
             "values": [int(v) for v in np.minimum(sizes, 2**32 - 1)]},
            {"id": "volume_um3", "type": "number", "data_type": "float32", "description": "volume in µm³",
             "values": [float(np.float32(v * voxel_um3)) for v in sizes]},
        ]}}
