"""Point annotations → a :class:`~volseg.geometry.PointSet` in voxel indices (z, y, x) of a volume.

Readers:

* **CSV** with columns ``z, y, x`` (voxel indices). A header naming the columns may come first, in
  any order (extra columns are ignored); without a header the columns are z, y, x.
* **Neuroglancer annotation JSON**: an annotation layer (``{"type": "annotation", "annotations": [...]}``)
  or a whole viewer state (its annotation layers, or the one named ``layer``). Neuroglancer writes
  points as ``[x, y, z]`` in the coordinate space of ``dimensions`` (e.g. ``{"x": [4e-9, "m"], ...}``),
  with voxel *corners* at integers. They are converted to this volume's voxel indices through its
  voxel size and offset; with no ``dimensions`` the coordinates are taken as this volume's voxels.
* **Neuroglancer precomputed annotations** (a directory or URL whose ``info`` has ``"@type":
  "neuroglancer_annotations_v1"`` and ``"annotation_type": "POINT"``; local, gs://, s3://, http(s)://):
  every point of its (unsharded) multi-level spatial index, converted like the JSON's.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import PointsError, VolsegError
from volseg.geometry import Box, PointSet

_UNIT_TO_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3}


def read_points(
    path: str | Path,
    voxel_size_nm: Sequence[float] = (1.0, 1.0, 1.0),
    voxel_offset: Sequence[int] = (0, 0, 0),
    bounds: Box | None = None,
    layer: str | None = None,
) -> PointSet:
    """Read a points file (format by suffix: ``.csv`` or ``.json``) for a volume of the given geometry.

    With ``bounds``, every point must lie inside it, else :class:`PointsError` names the file, how many
    points are outside and an example.
    """
    text = str(path)
    if "://" in text or Path(text).is_dir():
        points = _read_precomputed(text, voxel_size_nm, voxel_offset)
        if bounds is not None:
            points.check_inside(bounds, text)
        return points
    path = Path(path)
    if not path.is_file():
        raise PointsError(f"Points file {str(path)!r} does not exist.",
                          "give a CSV with columns z,y,x, a Neuroglancer annotation JSON, or a precomputed "
                          "annotation directory.")
    if path.suffix.lower() == ".csv":
        points = _read_csv(path)
    elif path.suffix.lower() == ".json":
        points = _read_neuroglancer(path, voxel_size_nm, voxel_offset, layer)
    else:
        raise PointsError(f"Points file {str(path)!r} has suffix {path.suffix!r}; volseg reads .csv and .json.",
                          "save the points as CSV (z,y,x) or export the Neuroglancer annotation layer as JSON.")
    if bounds is not None:
        points.check_inside(bounds, str(path))
    return points


def _read_csv(path: Path) -> PointSet:
    try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the header
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as error:
        raise PointsError(f"{path} is not a text CSV ({error}).",
                          "save the points as UTF-8 text, one z,y,x per line.") from None
    if not rows:
        return PointSet(np.zeros((0, 3)))
    columns = [0, 1, 2]
    header = [cell.strip().lower() for cell in rows[0]]
    if not _is_number(header[0]):
        missing = [axis for axis in "zyx" if axis not in header]
        if missing:
            raise PointsError(f"{path}: the header {rows[0]} has no column {', '.join(missing)}.",
                              "name the columns z, y, x (voxel indices).")
        columns = [header.index(axis) for axis in "zyx"]
        rows = rows[1:]
    try:
        values = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64)
    except (ValueError, IndexError) as error:
        raise PointsError(f"{path}: a row is not three numbers z, y, x ({error}).",
                          "write one point per line as z,y,x voxel indices.") from None
    return PointSet(values.reshape(-1, 3))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_neuroglancer(path: Path, voxel_size_nm: Sequence[float], voxel_offset: Sequence[int],
                       layer: str | None) -> PointSet:
    try:
        state = json.loads(path.read_bytes())
    except UnicodeDecodeError as error:
        raise PointsError(f"{path} is not a text JSON file ({error}).",
                          "export the annotation layer from Neuroglancer again (JSON is UTF-8 text).") from None
    except json.JSONDecodeError as error:
        raise PointsError(f"{path} is not valid JSON ({error}).",
                          "export the annotation layer from Neuroglancer again.") from None
    layers = _annotation_layers(state, layer, path)
    dimensions = state.get("dimensions") or next((lay.get("dimensions") for lay in layers if lay.get("dimensions")),
                                                None)
    xyz = [a["point"] for lay in layers for a in lay.get("annotations", []) if a.get("type") == "point"]
    if not xyz:
        return PointSet(np.zeros((0, 3)))
    coords = np.asarray(xyz, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 3:
        raise PointsError(f"{path}: point annotations must have 3 coordinates (x, y, z).",
                          "use a 3D annotation layer.")
    return to_voxels(coords, dimensions, voxel_size_nm, voxel_offset, str(path))


def to_voxels(coords: np.ndarray, dimensions: dict[str, Any] | None, voxel_size_nm: Sequence[float],
               voxel_offset: Sequence[int], source: str) -> PointSet:
    """Neuroglancer coordinates (columns in the order of ``dimensions``) → this volume's voxel indices."""
    names = list(dimensions) if dimensions else ["x", "y", "z"]
    try:
        zyx = coords[:, [names.index(a) for a in "zyx"]]
    except ValueError:
        raise PointsError(f"{source}: the annotation dimensions {names} do not include x, y and z.",
                          "annotate in a viewer whose dimensions are x, y, z.") from None
    if dimensions:
        scale_nm = np.array([to_nm(dimensions[a], source) for a in "zyx"])
        zyx = zyx * scale_nm / np.asarray(voxel_size_nm, dtype=np.float64)
    zyx = zyx - 0.5 - np.asarray(voxel_offset, dtype=np.float64)  # corner → centre convention
    return PointSet(zyx)


PROPERTY_BYTES = {"rgb": 3, "rgba": 4, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4,
                   "float32": 4}


def _read_precomputed(url: str, voxel_size_nm: Sequence[float], voxel_offset: Sequence[int]) -> PointSet:
    """Every point of a precomputed annotation collection, from its spatial index (each point is
    stored in one cell of one level; a point on a cell border may repeat, so points are kept by id).

    Each read waits at most the storage timeout (:func:`volseg.io.storage.storage_timeout_s`);
    unreachable remote storage raises :class:`~volseg.errors.StorageUnreachableError`, any other
    failure a one-line :class:`PointsError`."""
    from volseg.io.storage import open_kvstore, storage_error, wait
    from volseg.io.urls import parse_url

    location = parse_url(url)
    try:
        store = open_kvstore(location)
        info = annotation_info(url, wait(store.read("info"), location).value or None)
        rank = len(info["dimensions"])
        record = record_bytes(info)
        points: dict[int, np.ndarray] = {}
        for level in info["spatial"]:
            for chunk in [store.read(key) for key in _cell_keys(url, level)]:
                data = wait(chunk, location).value
                points.update(decode_points(bytes(data), rank, record) if data else {})
    except ValueError as error:
        if isinstance(error, VolsegError):  # already one line (PointsError, UnsupportedURLError)
            raise
        raise storage_error(error, location, f"Points {url!r} cannot be read", PointsError,
                            "give a precomputed annotation directory or URL.") from None
    coords = np.stack([points[k] for k in sorted(points)]) if points else np.zeros((0, rank))
    return to_voxels(coords.astype(np.float64), info["dimensions"], voxel_size_nm, voxel_offset, url)


def record_bytes(info: dict[str, Any]) -> int:
    """Bytes of one annotation's encoding in a collection's spatial index: its coordinates, its
    properties, padded to 4 bytes."""
    record = 4 * len(info["dimensions"]) + sum(PROPERTY_BYTES[p["type"]] for p in info.get("properties", []))
    return record + (-record) % 4


def annotation_info(url: str, raw: bytes | None) -> dict[str, Any]:
    """The ``info`` of a precomputed point-annotation collection (``None``: there is none)."""
    if raw is None:
        raise PointsError(f"Points {url!r} has no info file; it is not a precomputed annotation collection.",
                          "give a CSV, a Neuroglancer JSON, or a precomputed annotation directory.")
    try:
        info = json.loads(raw)
    except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError of a binary file
        raise PointsError(f"{url}: info is not JSON text ({error}).",
                          "give a precomputed annotation collection (its info is a JSON file).") from None
    found = info if isinstance(info, dict) else {}
    if found.get("@type") != "neuroglancer_annotations_v1" or str(found.get("annotation_type", "")).upper() != "POINT":
        raise PointsError(f"{url}: info is not a point annotation collection (@type {found.get('@type')!r}, "
                          f"annotation_type {found.get('annotation_type')!r}).",
                          "give a collection of POINT annotations.")
    return found


def _cell_keys(url: str, level: dict[str, Any]) -> list[str]:
    """The keys of every cell of one (unsharded) level of the spatial index."""
    if "sharding" in level:
        raise PointsError(f"{url}: spatial index level {level['key']!r} is sharded; volseg reads unsharded "
                          "precomputed annotations.", "export the annotations unsharded, or as JSON.")
    cells = itertools.product(*(range(n) for n in level["grid_shape"]))
    return [f"{level['key']}/{'_'.join(map(str, cell))}" for cell in cells]


def decode_points(data: bytes, rank: int, record: int) -> dict[int, np.ndarray]:
    count = int(np.frombuffer(data, "<u8", 1)[0])
    body = np.frombuffer(data, np.uint8, count * record, 8).reshape(count, record)
    positions = body[:, : 4 * rank].copy().view("<f4").reshape(count, rank)
    ids = np.frombuffer(data, "<u8", count, 8 + count * record)
    return {int(i): p for i, p in zip(ids, positions, strict=True)}


def _annotation_layers(state: Any, name: str | None, path: Path) -> list[dict[str, Any]]:
    if isinstance(state, dict) and "layers" in state:
        layers = state["layers"]
        layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
        layers = [lay for lay in layers if isinstance(lay, dict) and lay.get("type") == "annotation"]
        if not layers:
            raise PointsError(f"{path} is a Neuroglancer state without an annotation layer.",
                              "add the points as an annotation layer in Neuroglancer and export the state again.")
    elif isinstance(state, dict) and ("annotations" in state or state.get("type") == "annotation"):
        layers = [state]
    else:
        raise PointsError(f"{path} holds no Neuroglancer annotation layer.",
                          "export an annotation layer (or a viewer state that contains one).")
    if name is not None:
        layers = [lay for lay in layers if lay.get("name") == name]
        if not layers:
            raise PointsError(f"{path} has no annotation layer named {name!r}.", "check the layer name.")
    return layers


def to_nm(dimension: Sequence[Any], path: Path | str) -> float:
    scale, unit = float(dimension[0]), str(dimension[1])
    if unit not in _UNIT_TO_NM:
        raise PointsError(f"{path}: unit {unit!r} of the annotation dimensions is not a length.",
                          f"use one of {sorted(_UNIT_TO_NM)}.")
    return scale * _UNIT_TO_NM[unit]
