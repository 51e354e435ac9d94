"""Point annotations → a :class:`~volseg.geometry.PointSet` in voxel indices (z, y, x) of a volume.

Readers:

* **CSV** with columns ``z, y, x`` (voxel indices). A header naming the columns may come first, in
  any order (extra columns are ignored); without a header the columns are z, y, x.
* **Neuroglancer annotation JSON**: an annotation layer (``{"type": "annotation", "annotations": [...]}``)
  or a whole viewer state (its annotation layers, or the one named ``layer``). Neuroglancer writes
  points as ``[x, y, z]`` in the coordinate space of ``dimensions`` (e.g. ``{"x": [4e-9, "m"], ...}``),
  with voxel *corners* at integers. They are converted to this volume's voxel indices through its
  voxel size and offset; with no ``dimensions`` the coordinates are taken as this volume's voxels.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import PointsError
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
    path = Path(path)
    if not path.is_file():
        raise PointsError(f"Points file {str(path)!r} does not exist.",
                          "give a CSV with columns z,y,x or a Neuroglancer annotation JSON.")
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
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
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
        state = json.loads(path.read_text())
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
    names = list(dimensions) if dimensions else ["x", "y", "z"]
    try:
        zyx = coords[:, [names.index(a) for a in "zyx"]]
    except ValueError:
        raise PointsError(f"{path}: the annotation dimensions {names} do not include x, y and z.",
                          "annotate in a viewer whose dimensions are x, y, z.") from None
    if dimensions:
        scale_nm = np.array([_to_nm(dimensions[a], path) for a in "zyx"])
        zyx = zyx * scale_nm / np.asarray(voxel_size_nm, dtype=np.float64)
    zyx = zyx - 0.5 - np.asarray(voxel_offset, dtype=np.float64)  # corner → centre convention
    return PointSet(zyx)


def _annotation_layers(state: Any, name: str | None, path: Path) -> list[dict[str, Any]]:
    if isinstance(state, dict) and "layers" in state:
        layers = state["layers"]
        layers = list(layers.values()) if isinstance(layers, dict) else list(layers)
        layers = [lay for lay in layers if lay.get("type") == "annotation"]
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


def _to_nm(dimension: Sequence[Any], path: Path) -> float:
    scale, unit = float(dimension[0]), str(dimension[1])
    if unit not in _UNIT_TO_NM:
        raise PointsError(f"{path}: unit {unit!r} of the annotation dimensions is not a length.",
                          f"use one of {sorted(_UNIT_TO_NM)}.")
    return scale * _UNIT_TO_NM[unit]
