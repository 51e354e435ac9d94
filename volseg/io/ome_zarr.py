"""OME-Zarr (OME-NGFF) image metadata: reading a scale level's geometry, writing a single-scale image.

An OME-Zarr image is a zarr group whose attributes hold ``multiscales`` — in the group's ``.zattrs``
for version 0.4 (zarr v2) or under ``attributes.ome`` of its ``zarr.json`` for version 0.5 (zarr v3).
Each scale level is an array at a path inside the group, with coordinate transformations mapping array
indices to physical space::

    physical = (index * dataset_scale + dataset_translation) * multiscale_scale + multiscale_translation

volseg reads the level chosen by ``scale`` and accepts axes ``z, y, x`` or ``c, z, y, x`` only (a
channel axis first, then space in z, y, x order). It writes single-scale images with dataset path
``"0"``, axes in nanometres, ``scale = voxel size`` and ``translation = voxel offset * voxel size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from volseg.errors import VolumeFormatError
from volseg.io.units import nm_per_unit

SPATIAL_AXES: tuple[str, str, str] = ("z", "y", "x")
CHANNEL_AXIS = "c"
RESERVED_KEYS: frozenset[str] = frozenset({"multiscales", "omero", "ome", "labels", "image-label"})
"""Group attribute keys owned by OME-NGFF; volseg's user attributes never read or write them."""


@dataclass(frozen=True)
class OmeScale:
    """One scale level of an OME-Zarr image.

    ``path`` is the array's path inside the group; ``voxel_offset`` is the translation in voxels of
    this level, rounded to the nearest integer.
    """

    path: str
    version: str
    has_channels: bool
    voxel_size_nm: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    num_scales: int


def is_multiscale(attributes: dict[str, Any]) -> bool:
    """Whether group ``attributes`` carry OME-NGFF ``multiscales`` (0.4 top level or 0.5 under ``ome``)."""
    ome = attributes.get("ome")
    return "multiscales" in attributes or (isinstance(ome, dict) and "multiscales" in ome)


def read_scale(attributes: dict[str, Any], scale: int, where: str) -> OmeScale:
    """The geometry of scale level ``scale`` of the first multiscale image in group ``attributes``.

    Raises :class:`~volseg.errors.VolumeFormatError` (naming ``where``) for axes other than
    ``z, y, x`` / ``c, z, y, x``, a scale level that does not exist, units that are not lengths, or
    transformations stored in external files.
    """
    ome = attributes.get("ome")
    block = ome if isinstance(ome, dict) and "multiscales" in ome else attributes
    multiscales = block.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise VolumeFormatError(f"{where} has an empty or malformed 'multiscales' list.", "repair it.")
    image = multiscales[0]
    version = str(block.get("version", image.get("version", "0.4")))
    names, units = _axes(image.get("axes"), where)
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise VolumeFormatError(f"{where} lists no datasets in its multiscales.", "repair the metadata.")
    if not 0 <= scale < len(datasets):
        raise VolumeFormatError(
            f"Scale {scale} was requested from {where}, which has {len(datasets)} scale level(s) "
            f"(0..{len(datasets) - 1}).",
            f"choose a scale between 0 and {len(datasets) - 1}.",
        )
    dataset = datasets[scale]
    ndim = len(names)
    ds_scale, ds_shift = _transforms(
        dataset.get("coordinateTransformations"), ndim, f"{where} dataset {scale}"
    )
    ms_scale, ms_shift = _transforms(image.get("coordinateTransformations"), ndim, f"{where} multiscale")
    size, offset = [], []
    for axis in range(ndim - 3, ndim):
        factor = nm_per_unit(units[axis], f"{where} axis {names[axis]!r}")
        step = ds_scale[axis] * ms_scale[axis] * factor
        if step <= 0:
            raise VolumeFormatError(
                f"{where} gives scale level {scale} a non-positive scale on axis {names[axis]!r}.",
                "give every spatial axis a positive scale.",
            )
        size.append(step)
        offset.append(round((ds_shift[axis] * ms_scale[axis] + ms_shift[axis]) * factor / step))
    return OmeScale(
        path=str(dataset.get("path", "")),
        version=version,
        has_channels=ndim == 4,
        voxel_size_nm=(size[0], size[1], size[2]),
        voxel_offset=(offset[0], offset[1], offset[2]),
        num_scales=len(datasets),
    )


def image_attributes(
    version: str,
    voxel_size_nm: Sequence[float],
    voxel_offset: Sequence[int],
    has_channels: bool,
    name: str,
    label: bool = False,
    label_source: str | None = None,
) -> dict[str, Any]:
    """Group attributes describing a single-scale OME-Zarr image whose array is at path ``"0"``.

    ``version`` ``"0.4"`` gives ``{"multiscales": [...]}`` (zarr v2 ``.zattrs``); ``"0.5"`` gives
    ``{"ome": {"version": "0.5", "multiscales": [...]}}`` (zarr v3 group attributes). ``label``: a label
    image (NGFF ``image-label``: integer ids, one per object), which viewers show as segments, not grey
    values; ``label_source`` the relative path of the image it labels (``"../../"`` in that image's
    ``labels`` group), if any.
    """
    axes: list[dict[str, str]] = [{"name": n, "type": "space", "unit": "nanometer"} for n in SPATIAL_AXES]
    if has_channels:
        axes.insert(0, {"name": CHANNEL_AXIS, "type": "channel"})
    image: dict[str, Any] = {
        "name": name,
        "axes": axes,
        "datasets": [dataset("0", voxel_size_nm, voxel_offset, has_channels)],
    }
    extra: dict[str, Any] = {}
    if label:
        extra["image-label"] = {} if label_source is None else {"source": {"image": label_source}}
    if version == "0.4":
        if label:
            extra["image-label"] = {"version": "0.4", **extra["image-label"]}
        return {"multiscales": [{"version": "0.4", **image}], **extra}
    return {"ome": {"version": version, "multiscales": [image], **extra}}


def dataset(path: str, voxel_size_nm: Sequence[float], voxel_offset: Sequence[int], has_channels: bool
            ) -> dict[str, Any]:
    """One ``multiscales`` dataset: the array at ``path`` with its voxel size and offset (in nanometres)."""
    scale = [float(v) for v in voxel_size_nm]
    translation = [float(o) * float(v) for o, v in zip(voxel_offset, voxel_size_nm, strict=True)]
    if has_channels:
        scale.insert(0, 1.0)
        translation.insert(0, 0.0)
    return {"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                        {"type": "translation", "translation": translation}]}


def with_dataset(attributes: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """Group ``attributes`` with dataset ``new`` in the first image's ``multiscales`` (in path order;
    ``None`` if a dataset of that path is there already)."""
    ome = attributes.get("ome")
    in_ome = isinstance(ome, dict) and "multiscales" in ome
    block = dict(ome if in_ome else attributes)
    multiscales = [dict(m) for m in block["multiscales"]]
    datasets = list(multiscales[0]["datasets"])
    if any(d.get("path") == new["path"] for d in datasets):
        return None
    multiscales[0]["datasets"] = sorted([*datasets, new], key=lambda d: int(d["path"]) if str(d["path"]).isdigit()
                                        else 0)
    block["multiscales"] = multiscales
    return {**attributes, "ome": block} if in_ome else block


def labels_list(attributes: dict[str, Any] | None, version: str, name: str) -> dict[str, Any] | None:
    """The attributes of an image's ``labels`` group with ``name`` added to its list of labels (``None``:
    already listed)."""
    attributes = dict(attributes or {})
    if version == "0.4":
        names = list(attributes.get("labels", []))
        if name in names:
            return None
        return {**attributes, "labels": [*names, name]}
    ome = dict(attributes.get("ome", {}))
    names = list(ome.get("labels", []))
    if name in names:
        return None
    return {**attributes, "ome": {**ome, "version": version, "labels": [*names, name]}}


def _axes(axes: Any, where: str) -> tuple[list[str], list[str | None]]:
    if not isinstance(axes, list):
        raise VolumeFormatError(
            f"{where} has no 'axes' list in its multiscales.",
            "add axes z, y, x (or c, z, y, x) to the OME-NGFF metadata.",
        )
    names: list[str] = []
    units: list[str | None] = []
    for axis in axes:
        if isinstance(axis, dict):
            names.append(str(axis.get("name", "")))
            units.append(axis.get("unit"))
        else:
            names.append(str(axis))
            units.append(None)
    if tuple(names) not in (SPATIAL_AXES, (CHANNEL_AXIS, *SPATIAL_AXES)):
        raise VolumeFormatError(
            f"{where} has axes {names}; volseg expects ['z', 'y', 'x'] or ['c', 'z', 'y', 'x'] "
            "(an optional channel axis first, then space in z, y, x order).",
            "rewrite the image with its axes in z, y, x order (drop or split a time axis) or point the URL "
            "at an image stored that way.",
        )
    return names, units


def _transforms(transforms: Any, ndim: int, where: str) -> tuple[list[float], list[float]]:
    scale = [1.0] * ndim
    shift = [0.0] * ndim
    if transforms is None:
        return scale, shift
    if not isinstance(transforms, list):
        raise VolumeFormatError(f"{where} has malformed coordinateTransformations.", "make it a list.")
    for item in transforms:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation") or kind not in item:
            raise VolumeFormatError(
                f"{where} has a coordinate transformation {item!r} volseg cannot use (only inline "
                "'scale' and 'translation' are supported).",
                "write the transformation inline as a list of numbers.",
            )
        values = item[kind]
        if not isinstance(values, list) or len(values) != ndim:
            raise VolumeFormatError(
                f"{where} has a {kind} of {values!r} for {ndim} axes.", f"give {ndim} numbers."
            )
        if kind == "scale":
            shift = [t * float(v) for t, v in zip(shift, values, strict=True)]
            scale = [s * float(v) for s, v in zip(scale, values, strict=True)]
        else:
            shift = [t + float(v) for t, v in zip(shift, values, strict=True)]
    return scale, shift
