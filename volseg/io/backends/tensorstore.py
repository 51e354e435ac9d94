"""The tensorstore backend: zarr v2, zarr v3 (optionally sharded), N5 and Neuroglancer precomputed.

Every format is presented as an array indexed (c,) z, y, x from 0, whatever its stored layout:

* zarr: stored C-order as (c,) z, y, x; OME-Zarr groups resolve to the array of the chosen scale.
* N5: ``attributes.json`` lists dimensions fastest-first, i.e. x, y, z (, c); the view is transposed.
* precomputed: tensorstore indexes x, y, z, channel starting at ``voxel_offset``; the view is
  translated to 0 and transposed, and a single channel is dropped (``num_channels`` is then ``None``).

Opening returns an :class:`OpenedArray`; creating writes metadata only (chunks appear when written).
Compression: zstd (zarr v3 integers), blosc-lz4 with byte shuffle (zarr v3 floats: it compresses
probability maps better than zstd and several times faster, which matters when the writer shares CPU
cores with the model), blosc-zstd (zarr v2), gzip (N5), raw or compressed_segmentation (precomputed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorstore as ts

from volseg.errors import StorageUnreachableError, VolsegError, VolumeFormatError
from volseg.geometry import Box
from volseg.io import ome_zarr
from volseg.io.array import OpenedArray, ResultFuture, VolumeGeometry, as_zyx
from volseg.io.attributes import PRECOMPUTED_SIDECAR, AttributeStore
from volseg.io.storage import (
    CONTEXT,
    native_logs_dropped,
    parse_json,
    read_json,
    read_keys,
    storage_error,
    update_json,
    wait,
)
from volseg.io.units import nm_per_unit
from volseg.io.urls import VolumeURL

ZARR_PLACEMENT_KEYS = frozenset({"resolution", "voxel_size", "voxel_size_nm", "voxel_size_nm_zyx", "offset",
                                 "voxel_offset"})
#: Attribute names that give a plain zarr array's voxel size in nm, z, y, x (on the array, or on the
#: group that contains it).
VOXEL_SIZE_KEYS = ("voxel_size", "resolution", "voxel_size_nm", "voxel_size_nm_zyx")
"""Attributes of a plain (non-OME) zarr array that give its placement, all (z, y, x):
``voxel_size`` or ``resolution`` in nm; ``voxel_offset`` in voxels, or ``offset`` in nm (funlib)."""

N5_RESERVED = frozenset(
    {
        "dimensions", "blockSize", "dataType", "compression", "n5", "resolution", "pixelResolution",
        "units", "axes", "voxel_offset", "scales", "downsamplingFactors", "multiScale",
    }
)  # fmt: skip
"""Keys of N5 ``attributes.json`` owned by the format and by volseg's placement metadata. In N5 the
lists ``resolution``, ``units``, ``axes`` and ``voxel_offset`` are in x, y, z order like ``dimensions``."""

COMPRESSED_SEGMENTATION_BLOCK = (8, 8, 8)
ZSTD_LEVEL = 3


class TensorStoreArray:
    """:class:`~volseg.io.array.ArrayBackend` over a tensorstore view indexed (c,) z, y, x from 0."""

    def __init__(self, view: ts.TensorStore, has_channels: bool) -> None:
        self._view = view
        self._lead: tuple[slice, ...] = (slice(None),) if has_channels else ()

    def read(self, box: Box) -> ResultFuture[np.ndarray]:
        """Start reading ``box``; ``result()`` gives a new numpy array."""
        return self._view[(*self._lead, *box.slices)].read()

    def write(self, box: Box, array: np.ndarray, handover: bool = False) -> ResultFuture[None]:
        """Start writing; returns after tensorstore has copied ``array`` (at once, when it is handed
        over and tensorstore may read it in place), with the commit future."""
        futures = self._view[(*self._lead, *box.slices)].write(
            array, can_reference_source_data_indefinitely=handover)
        futures.copy.result()
        return futures.commit


def open_tensorstore(url: VolumeURL, fmt: str, mode: str, scale: int | None) -> OpenedArray:
    """Open the array at ``url`` stored in ``fmt`` (as detected), at scale level ``scale``.

    ``scale`` picks an OME-Zarr dataset, an N5 ``s<scale>`` dataset or a precomputed scale; ``None``
    means 0. A single-scale array accepts only ``None`` or 0.
    """
    if fmt in ("zarr2", "zarr3"):
        return _open_zarr(url, fmt, mode, scale)
    if fmt == "n5":
        return _open_n5(url, mode, scale)
    return _open_precomputed(url, mode, scale)


def _ts_open(spec: dict[str, Any], mode: str, url: VolumeURL) -> ts.TensorStore:
    """Open the array ``spec`` at ``url`` (with :data:`~volseg.io.storage.CONTEXT`, which its chunk I/O
    keeps), waiting at most the storage timeout; failures raise one line naming ``url``."""
    try:
        with native_logs_dropped(url):
            return wait(ts.open(spec, read=True, write=mode == "r+", open=True, context=CONTEXT), url)
    except ValueError as err:
        raise storage_error(
            err, url, f"tensorstore could not open {url.url} as {spec['driver']}", VolumeFormatError,
            "check that the URL points at an array of that format (not a group or a partial copy).",
        ) from err


def _single_scale(scale: int | None, where: str) -> None:
    if scale not in (None, 0):
        raise VolumeFormatError(
            f"Scale {scale} was requested from {where}, which holds a single scale.",
            "leave scale unset (or 0), or point the URL at a multiscale image.",
        )


def _spatial_geometry(
    store: ts.TensorStore,
    where: str,
    voxel_size_nm: Sequence[float],
    voxel_offset: Sequence[int],
) -> VolumeGeometry:
    """Geometry of a view indexed (c,) z, y, x; chunks from its chunk layout (inner chunk, shard)."""
    _check_rank(store.rank, tuple(store.shape), where)
    layout = store.chunk_layout
    read_chunk = tuple(int(c) for c in layout.read_chunk.shape[-3:])
    write_chunk = tuple(int(c) for c in layout.write_chunk.shape[-3:])
    return VolumeGeometry(
        shape=as_zyx(store.shape[-3:], "shape"),
        dtype=np.dtype(store.dtype.numpy_dtype),
        voxel_size_nm=as_zyx(voxel_size_nm, f"voxel size of {where}", float),
        voxel_offset=as_zyx(voxel_offset, f"voxel offset of {where}"),
        chunk_shape=as_zyx(read_chunk, "chunk shape"),
        shard_shape=None if write_chunk == read_chunk else as_zyx(write_chunk, "shard shape"),
        num_channels=int(store.shape[0]) if store.rank == 4 else None,
    )


def _check_rank(rank: int, shape: tuple[int, ...], where: str) -> None:
    if rank not in (3, 4):
        raise VolumeFormatError(
            f"{where} is a {rank}-dimensional array of shape {shape}; volseg expects 3 dimensions "
            "(z, y, x) or 4 with channels first (c, z, y, x).",
            "point the URL at a 3D volume, or rewrite the array as (z, y, x) / (c, z, y, x).",
        )


# --- zarr ------------------------------------------------------------------------------------------


def _open_zarr(url: VolumeURL, fmt: str, mode: str, scale: int | None) -> OpenedArray:
    node = _zarr_node(url, fmt)
    where = url.url
    ome: ome_zarr.OmeScale | None = None
    if node.is_group:
        if not ome_zarr.is_multiscale(node.attributes):
            raise VolumeFormatError(
                f"{where} is a zarr group without OME-NGFF 'multiscales' metadata, so volseg cannot tell "
                "which array inside it to open.",
                "point the URL at an array inside the group (e.g. .../group/array).",
            )
        ome = ome_zarr.read_scale(node.attributes, scale or 0, where)
        array_url = url.child(ome.path)
        reserved = ome_zarr.RESERVED_KEYS
    else:
        _single_scale(scale, where)
        array_url = url
        reserved = ZARR_PLACEMENT_KEYS
    driver = "zarr3" if fmt == "zarr3" else "zarr"
    store = _ts_open({"driver": driver, "kvstore": array_url.kvstore()}, mode, array_url)
    _check_labels(store, array_url.url)
    if ome is not None:
        if store.rank != (4 if ome.has_channels else 3):
            raise VolumeFormatError(
                f"{array_url.url} has {store.rank} dimensions but the OME-Zarr metadata of {where} "
                f"lists {4 if ome.has_channels else 3} axes.",
                "repair the metadata so its axes match the arrays.",
            )
        size, offset = ome.voxel_size_nm, ome.voxel_offset
    else:
        size, offset = _zarr_placement(_with_inherited_voxel_size(url, fmt, node.attributes), where)
    key, member = (".zattrs", None) if fmt == "zarr2" else ("zarr.json", "attributes")
    return OpenedArray(
        format=fmt,
        geometry=_spatial_geometry(store, array_url.url, size, offset),
        array=TensorStoreArray(store, store.rank == 4),
        attribute_store=AttributeStore(url, key, member, reserved),
        ome_version=None if ome is None else ome.version,
    )


@dataclass(frozen=True)
class _ZarrNode:
    is_group: bool
    attributes: dict[str, Any]


def _zarr_node(url: VolumeURL, fmt: str) -> _ZarrNode:
    if fmt == "zarr3":
        meta = read_json(url, "zarr.json") or {}
        attributes = meta.get("attributes") or {}
        return _ZarrNode(is_group=meta.get("node_type") == "group", attributes=attributes)
    found = read_keys(url, [".zarray", ".zattrs"])
    raw = found[".zattrs"]
    attributes = parse_json(raw, f"{url.url.rstrip('/')}/.zattrs") if raw is not None else {}
    return _ZarrNode(is_group=found[".zarray"] is None, attributes=attributes)


def _check_labels(store: ts.TensorStore, where: str) -> None:
    labels = tuple(store.domain.labels)
    if not any(labels):
        return
    expected = ("z", "y", "x") if store.rank == 3 else ("c", "z", "y", "x")
    if labels != expected:
        raise VolumeFormatError(
            f"{where} has dimension names {list(labels)}; volseg expects {list(expected)}.",
            "rewrite the array with its axes in (c,) z, y, x order, or fix its dimension_names.",
        )


def _with_inherited_voxel_size(url: VolumeURL, fmt: str, attributes: dict[str, Any]) -> dict[str, Any]:
    """A plain array's attributes, plus the voxel size of its parent group when it has none itself
    (datasets often store ``voxel_size_nm_zyx`` or ``resolution`` once, on the group)."""
    if any(k in attributes for k in VOXEL_SIZE_KEYS):
        return attributes
    parent = url.parent()
    if parent is None:
        return attributes
    try:
        inherited = _zarr_node(parent, fmt).attributes
    except StorageUnreachableError:  # no answer: reading the array itself would not answer either
        raise
    except VolsegError:  # no readable group above: keep the array's own attributes
        return attributes
    found = next((k for k in VOXEL_SIZE_KEYS if k in inherited), None)
    return attributes if found is None else {**attributes, found: inherited[found]}


def _zarr_placement(attributes: dict[str, Any], where: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    key = next((k for k in VOXEL_SIZE_KEYS if k in attributes), None)
    raw_size = attributes[key] if key is not None else (1.0, 1.0, 1.0)
    size = as_zyx(raw_size, f"the voxel_size/resolution attribute of {where}", float)
    if any(s <= 0 for s in size):
        raise VolumeFormatError(f"{where} has a non-positive voxel size {size}.", "fix its attributes.")
    if "voxel_offset" in attributes:
        offset = as_zyx(attributes["voxel_offset"], f"the voxel_offset attribute of {where}")
    elif "offset" in attributes:
        offset_nm = as_zyx(attributes["offset"], f"the offset attribute of {where}", float)
        offset = tuple(round(o / s) for o, s in zip(offset_nm, size, strict=True))
    else:
        offset = (0, 0, 0)
    return size, offset


def create_zarr(
    url: VolumeURL, fmt: str, geometry: VolumeGeometry, attributes: dict[str, Any], name: str, label: bool = False
) -> None:
    """Create an OME-Zarr image group at ``url`` with its scale-0 array at ``url/0``.

    The array is created (or reopened, if a previous attempt got that far with the same metadata)
    first; the group metadata — OME 0.4 ``.zattrs``/``.zgroup`` for zarr v2, OME 0.5 ``zarr.json``
    for v3, with ``attributes`` — is written last and only if absent, so a group whose metadata exists
    always has its array. ``label``: an NGFF label image (see :func:`~volseg.io.ome_zarr.image_attributes`).

    The folders between the ``.zarr`` container and ``url`` become zarr groups where they have no
    metadata yet (``x.zarr/probabilities`` makes ``x.zarr`` a group, so zarr readers list its images);
    a label image in ``<image>/labels/<name>`` is added to that ``labels`` group's list.
    """
    _create_zarr_array(url.child("0"), fmt, geometry)
    version = "0.5" if fmt == "zarr3" else "0.4"
    parent = url.parent()
    in_labels = label and parent is not None and parent.path.rstrip("/").endswith("/labels")
    ome = ome_zarr.image_attributes(
        version, geometry.voxel_size_nm, geometry.voxel_offset, geometry.num_channels is not None, name,
        label=label, label_source="../../" if in_labels else None,
    )
    _write_group(url, fmt, {**ome, **attributes})
    for folder in _container_folders(url):
        _write_group(folder, fmt, {})
    if in_labels and parent is not None:
        _list_label(parent, fmt, version, name)


def _create_zarr_array(array_url: VolumeURL, fmt: str, geometry: VolumeGeometry) -> None:
    channels = [] if geometry.num_channels is None else [geometry.num_channels]
    if fmt == "zarr3":
        spec = {"driver": "zarr3", "kvstore": array_url.kvstore(), "metadata": _zarr3_metadata(geometry)}
    else:
        metadata = {
            "shape": [*channels, *geometry.shape],
            "chunks": [*channels, *geometry.chunk_shape],
            "dtype": geometry.dtype.str,
            "compressor": {"id": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 1},
            "order": "C",
            "fill_value": 0,
            "filters": None,
            "dimension_separator": "/",
        }
        spec = {"driver": "zarr", "kvstore": array_url.kvstore(), "metadata": metadata}
    _ts_create(spec, array_url)


def create_zarr_level(url: VolumeURL, fmt: str, level: int, geometry: VolumeGeometry) -> None:
    """Add scale level ``level`` (array ``url/<level>`` of ``geometry``) to the OME-Zarr image at ``url``:
    the array first, then its dataset in the image's ``multiscales`` (compare-and-swap; kept if listed)."""
    _create_zarr_array(url.child(str(level)), fmt, geometry)
    dataset = ome_zarr.dataset(str(level), geometry.voxel_size_nm, geometry.voxel_offset,
                               geometry.num_channels is not None)
    key = "zarr.json" if fmt == "zarr3" else ".zattrs"

    def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is None:
            raise VolumeFormatError(f"{url.url} has no OME-Zarr image metadata to add scale {level} to.",
                                    "add scale levels only to images volseg created.")
        updated = ome_zarr.with_dataset(current.get("attributes", {}) if fmt == "zarr3" else current, dataset)
        if updated is None:
            return None
        return {**current, "attributes": updated} if fmt == "zarr3" else updated

    update_json(url, key, change)


def create_precomputed_level(url: VolumeURL, kind: str, geometry: VolumeGeometry) -> None:
    """Add a scale of ``geometry`` to the precomputed volume at ``url`` (its ``info``), if not there yet."""
    spec = {"driver": "neuroglancer_precomputed", "kvstore": url.kvstore(),
            "scale_metadata": _precomputed_scale(geometry, kind)}
    _ts_create(spec, url)


def _write_group(url: VolumeURL, fmt: str, attributes: dict[str, Any]) -> None:
    """Zarr group metadata with ``attributes`` at ``url``, only where there is none (never replaced)."""
    if fmt == "zarr3":
        group = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
        update_json(url, "zarr.json", lambda current: group if current is None else None)
    else:
        update_json(url, ".zattrs", lambda current: attributes if current is None else None)
        update_json(url, ".zgroup", lambda current: {"zarr_format": 2} if current is None else None)


def _container_folders(url: VolumeURL) -> list[VolumeURL]:
    """The folders from the outermost ``*.zarr`` folder above ``url`` down to ``url``'s parent."""
    parents = []
    folder = url.parent()
    while folder is not None and folder.path.strip("/"):
        parents.append(folder)
        folder = folder.parent()
    inside = [i for i, f in enumerate(parents) if f.path.rstrip("/").lower().endswith(".zarr")]
    return list(reversed(parents[: inside[-1] + 1])) if inside else []


def _list_label(labels: VolumeURL, fmt: str, version: str, name: str) -> None:
    """Add ``name`` to the list of the ``labels`` group ``labels`` (a group itself if it was not one)."""
    if fmt == "zarr3":
        def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
            group = current or {"zarr_format": 3, "node_type": "group", "attributes": {}}
            attributes = ome_zarr.labels_list(group.get("attributes"), version, name)
            return None if attributes is None else {**group, "attributes": attributes}

        update_json(labels, "zarr.json", change)
    else:
        update_json(labels, ".zattrs", lambda current: ome_zarr.labels_list(current, version, name))
        update_json(labels, ".zgroup", lambda current: {"zarr_format": 2} if current is None else None)


def _zarr3_compressor(dtype: np.dtype) -> dict[str, Any]:
    if np.dtype(dtype).kind == "f":
        return {"name": "blosc", "configuration": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle",
                                                   "typesize": np.dtype(dtype).itemsize, "blocksize": 0}}
    return {"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}


def _zarr3_metadata(geometry: VolumeGeometry) -> dict[str, Any]:
    channels = [] if geometry.num_channels is None else [geometry.num_channels]
    chunk = [*channels, *geometry.chunk_shape]
    endian = {"name": "bytes", "configuration": {"endian": "little"}}
    codecs: list[dict[str, Any]] = [endian, _zarr3_compressor(geometry.dtype)]
    grid = chunk
    if geometry.shard_shape is not None:
        grid = [*channels, *geometry.shard_shape]
        sharding = {
            "chunk_shape": chunk,
            "codecs": codecs,
            "index_codecs": [endian, {"name": "crc32c"}],
            "index_location": "end",
        }
        codecs = [{"name": "sharding_indexed", "configuration": sharding}]
    return {
        "shape": [*channels, *geometry.shape],
        "data_type": geometry.dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid}},
        "chunk_key_encoding": {"name": "default"},
        "codecs": codecs,
        "fill_value": 0,
        "dimension_names": ["c", "z", "y", "x"] if channels else ["z", "y", "x"],
    }


def _ts_create(spec: dict[str, Any], url: VolumeURL) -> None:
    """Create the array ``spec`` at ``url`` (or open it, if it exists with the same metadata), waiting
    at most the storage timeout; failures raise one line naming ``url``."""
    try:
        with native_logs_dropped(url):
            wait(ts.open(spec, create=True, open=True, context=CONTEXT), url)
    except ValueError as err:
        raise storage_error(
            err, url, f"Could not create {url.url}", VolumeFormatError,
            "choose another output path in a folder you may write (not under a file), or delete what exists there.",
        ) from err


# --- N5 --------------------------------------------------------------------------------------------


def _open_n5(url: VolumeURL, mode: str, scale: int | None) -> OpenedArray:
    attributes = read_json(url, "attributes.json") or {}
    dataset_url, dataset_attrs = url, attributes
    size_xyz = _n5_resolution(attributes, url.url)
    if "dimensions" not in attributes:
        level = scale or 0
        dataset_url = url.child(f"s{level}")
        dataset_attrs = read_json(dataset_url, "attributes.json") or {}
        if "dimensions" not in dataset_attrs:
            raise VolumeFormatError(
                f"{url.url} is an N5 group without a dataset s{level} (looked for "
                f"{dataset_url.location}/attributes.json with 'dimensions').",
                "point the URL at an N5 dataset, or choose an existing scale.",
            )
        own = _n5_resolution(dataset_attrs, dataset_url.url)
        if own is not None:
            size_xyz = own
        elif size_xyz is not None:
            factors = _n5_factors(attributes, dataset_attrs, level)
            size_xyz = [s * f for s, f in zip(size_xyz, factors, strict=True)]
    else:
        _single_scale(scale, url.url)
    store = _ts_open({"driver": "n5", "kvstore": dataset_url.kvstore()}, mode, dataset_url)
    _check_rank(store.rank, tuple(reversed(store.shape)), dataset_url.url)
    _check_n5_axes(dataset_attrs.get("axes", attributes.get("axes")), store.rank, dataset_url.url)
    view = store.T
    offset_xyz = list(dataset_attrs.get("voxel_offset", (0, 0, 0)))[:3]
    geometry = _spatial_geometry(view, dataset_url.url, (size_xyz or [1.0, 1.0, 1.0])[::-1], offset_xyz[::-1])
    return OpenedArray(
        format="n5",
        geometry=geometry,
        array=TensorStoreArray(view, store.rank == 4),
        attribute_store=AttributeStore(url, "attributes.json", None, N5_RESERVED),
    )


def _n5_factors(group: dict[str, Any], dataset: dict[str, Any], level: int) -> list[float]:
    """Downsampling factors (x, y, z) of scale ``level`` relative to the group's resolution."""
    scales = group.get("scales")
    if isinstance(scales, list) and level < len(scales):
        return [float(f) for f in scales[level][:3]]
    return [float(f) for f in dataset.get("downsamplingFactors", (1, 1, 1))[:3]]


def _n5_resolution(attributes: dict[str, Any], where: str) -> list[float] | None:
    """Voxel size (x, y, z) in nm from ``resolution`` + ``units`` or ``pixelResolution``, if given."""
    if "resolution" in attributes:
        units = list(attributes.get("units") or [None] * 3)[:3]
        values = list(attributes["resolution"])[:3]
        return [float(r) * nm_per_unit(u, where) for r, u in zip(values, units, strict=True)]
    pixel = attributes.get("pixelResolution")
    if isinstance(pixel, dict) and "dimensions" in pixel:
        factor = nm_per_unit(pixel.get("unit"), where)
        return [float(r) * factor for r in list(pixel["dimensions"])[:3]]
    return None


def _check_n5_axes(axes: Any, rank: int, where: str) -> None:
    if axes is None:
        return
    expected = ["x", "y", "z"] if rank == 3 else ["x", "y", "z", "c"]
    if list(axes) != expected:
        raise VolumeFormatError(
            f"{where} has N5 axes {list(axes)}; volseg expects {expected} (N5 lists axes fastest first, "
            "so this is (c,) z, y, x in volseg's order).",
            "rewrite the dataset with that axis order or fix its 'axes' attribute.",
        )


def create_n5(url: VolumeURL, geometry: VolumeGeometry, attributes: dict[str, Any]) -> None:
    """Create an N5 dataset at ``url`` (gzip), with placement attributes in x, y, z order."""
    channels = [] if geometry.num_channels is None else [geometry.num_channels]
    metadata = {
        "dimensions": [*geometry.shape[::-1], *channels],
        "blockSize": [*geometry.chunk_shape[::-1], *channels],
        "dataType": geometry.dtype.name,
        "compression": {"type": "gzip", "level": 5},
        "resolution": [*geometry.voxel_size_nm[::-1], *([1.0] if channels else [])],
        "units": ["nm", "nm", "nm", *([""] if channels else [])],
        "axes": ["x", "y", "z", *(["c"] if channels else [])],
        "voxel_offset": list(geometry.voxel_offset[::-1]),
        **attributes,
    }
    _ts_create({"driver": "n5", "kvstore": url.kvstore(), "metadata": metadata}, url)


# --- Neuroglancer precomputed ----------------------------------------------------------------------


def _open_precomputed(url: VolumeURL, mode: str, scale: int | None) -> OpenedArray:
    info = read_json(url, "info") or {}
    level = scale or 0
    scales = info.get("scales") or []
    if not 0 <= level < len(scales):
        raise VolumeFormatError(
            f"Scale {level} was requested from {url.url}, whose info lists {len(scales)} scale(s).",
            f"choose a scale between 0 and {max(len(scales) - 1, 0)}.",
        )
    meta = scales[level]
    if meta.get("sharding") and mode == "r+":
        raise VolumeFormatError(
            f"Scale {level} of {url.url} uses precomputed sharding, which volseg can read but not write.",
            "open it read-only, or write to an unsharded precomputed or a sharded zarr v3 volume.",
        )
    spec = {"driver": "neuroglancer_precomputed", "kvstore": url.kvstore(), "scale_index": level}
    store = _ts_open(spec, mode, url)
    num_channels = int(info.get("num_channels", 1))
    origin = store.translate_to[0, 0, 0, 0]
    view = origin[..., 0].T if num_channels == 1 else origin.T
    geometry = _spatial_geometry(
        view, url.url, meta["resolution"][::-1], meta.get("voxel_offset", [0] * 3)[::-1]
    )
    return OpenedArray(
        format="precomputed",
        geometry=geometry,
        array=TensorStoreArray(view, num_channels > 1),
        attribute_store=AttributeStore(url, PRECOMPUTED_SIDECAR),
        kind=str(info.get("type", "image")),
    )


def precomputed_encoding(kind: str, dtype: np.dtype) -> str:
    """``compressed_segmentation`` for uint32/uint64 segmentations, ``raw`` for everything else."""
    return (
        "compressed_segmentation" if kind == "segmentation" and dtype.name in ("uint32", "uint64") else "raw"
    )


def _precomputed_scale(geometry: VolumeGeometry, kind: str) -> dict[str, Any]:
    """A precomputed ``info`` scale of ``geometry`` (x, y, z order)."""
    encoding = precomputed_encoding(kind, geometry.dtype)
    scale: dict[str, Any] = {
        "size": list(geometry.shape[::-1]),
        "voxel_offset": list(geometry.voxel_offset[::-1]),
        "resolution": list(geometry.voxel_size_nm[::-1]),
        "chunk_size": list(geometry.chunk_shape[::-1]),
        "encoding": encoding,
    }
    if encoding == "compressed_segmentation":
        scale["compressed_segmentation_block_size"] = list(COMPRESSED_SEGMENTATION_BLOCK)
    return scale


def create_precomputed(url: VolumeURL, geometry: VolumeGeometry, kind: str) -> None:
    """Create a single-scale Neuroglancer precomputed volume at ``url`` (its ``info`` file)."""
    scale = _precomputed_scale(geometry, kind)
    multiscale = {"type": kind, "data_type": geometry.dtype.name, "num_channels": geometry.num_channels or 1}
    spec = {
        "driver": "neuroglancer_precomputed",
        "kvstore": url.kvstore(),
        "multiscale_metadata": multiscale,
        "scale_metadata": scale,
    }
    _ts_create(spec, url)
