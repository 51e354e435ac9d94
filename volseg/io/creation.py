"""Creating an output volume — or reusing it, when it already exists with the same geometry."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from numpy.typing import DTypeLike

from volseg.errors import (
    AlignmentError,
    GeometryMismatchError,
    OutputExistsError,
    StorageUnreachableError,
    UnsupportedURLError,
    VolsegError,
    VolumeFormatError,
)
from volseg.io import ome_zarr
from volseg.io.array import VolumeGeometry, as_zyx
from volseg.io.attributes import PRECOMPUTED_SIDECAR, AttributeStore
from volseg.io.backends.tensorstore import N5_RESERVED, create_n5, create_precomputed, create_zarr
from volseg.io.chunks import choose_output_chunks
from volseg.io.formats import candidates, check_dtype, creation_format, probe_format
from volseg.io.opening import open_volume
from volseg.io.urls import VolumeURL, parse_url
from volseg.io.volume import Volume

KINDS = ("image", "segmentation")


def create_volume(
    url: str,
    *,
    shape: tuple[int, int, int],
    dtype: DTypeLike,
    voxel_size_nm: tuple[float, float, float],
    voxel_offset: tuple[int, int, int] = (0, 0, 0),
    chunk_shape: tuple[int, int, int] | None = None,
    shard_shape: tuple[int, int, int] | None = None,
    num_channels: int | None = None,
    kind: Literal["image", "segmentation"] = "image",
    attributes: dict[str, Any] | None = None,
    exist_ok: bool = True,
    format: str | None = None,
    dry_run: bool = False,
) -> Volume | None:
    """Create a volume at ``url`` and return it opened ``"r+"``; reuse it if it exists identically.

    With ``dry_run`` every check below runs but nothing is created: the call returns ``None`` if the
    volume would be created, the existing volume if it would be reused, and raises as creation would.

    Geometry arguments are spatial (z, y, x); ``num_channels`` adds a leading channel axis (arrays
    are then (c, z, y, x)). ``chunk_shape`` defaults to :func:`choose_output_chunks` ``(shape, dtype)``.
    ``shard_shape`` (zarr v3 only) groups chunks into shards and must be a multiple of the chunk
    shape; writers then own whole shards (``Volume.write_chunk``).

    The format is ``format``, else the URL's prefix, else ``n5`` for paths ending in ``.n5``, else
    zarr v3 (``zarr`` means v3). Zarr outputs are single-scale OME-Zarr images (0.5 for v3, 0.4 for
    v2: group at ``url``, array at ``url/0``, axes (c,) z, y, x in nanometres), so Neuroglancer and OME
    tools open them. Precomputed outputs with ``kind="segmentation"`` and uint32/uint64 use the
    ``compressed_segmentation`` encoding. Precomputed cannot tell one channel from none: ``num_channels=1``
    is stored and reopened as ``None``. ``attributes`` become the initial user attributes.

    If a volume exists at ``url`` (in any format), nothing is created, deleted or overwritten: it is
    opened and compared field by field with the request (format when one is requested explicitly,
    shape, dtype, voxel size, voxel offset, chunk and shard shape, channels, and kind for precomputed).
    Any difference raises :class:`~volseg.errors.GeometryMismatchError` naming each field; if all match,
    the existing volume is returned (its attributes untouched) when ``exist_ok``, else
    :class:`~volseg.errors.OutputExistsError` is raised.
    """
    parsed = parse_url(url)
    if parsed.read_only:
        raise UnsupportedURLError(
            f"Cannot create {url}: {parsed.scheme}:// storage is read-only.",
            "write the output to local disk, gs:// or s3://.",
        )
    fmt = creation_format(parsed, format)
    if kind not in KINDS:
        raise VolumeFormatError(f"kind={kind!r} is not a volume kind.", f"use one of {KINDS}.")
    geometry = requested_geometry(
        fmt, shape, dtype, voxel_size_nm, voxel_offset, chunk_shape, shard_shape, num_channels
    )
    initial = _initial_attributes(fmt, attributes or {}, url)
    explicit = format is not None or parsed.format is not None
    existing = probe_format(parsed.with_format(None))
    if existing is not None:
        return _reuse(url, fmt if explicit else None, existing, geometry, kind, exist_ok)
    if dry_run:
        return None
    _create(parsed, fmt, geometry, kind, initial)
    return _reuse(url, fmt, fmt, geometry, kind, exist_ok=True)


def requested_geometry(
    fmt: str,
    shape: Sequence[int],
    dtype: DTypeLike,
    voxel_size_nm: Sequence[float],
    voxel_offset: Sequence[int],
    chunk_shape: Sequence[int] | None,
    shard_shape: Sequence[int] | None,
    num_channels: int | None,
) -> VolumeGeometry:
    """Validate creation arguments for ``fmt`` into the geometry they describe (see :func:`create_volume`)."""
    size = as_zyx(shape, "shape")
    if any(s <= 0 for s in size):
        raise VolumeFormatError(f"shape {size} has a non-positive axis.", "give every axis at least 1 voxel.")
    data_type = np.dtype(dtype)
    check_dtype(fmt, data_type)
    spacing = as_zyx(voxel_size_nm, "voxel_size_nm", float)
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise VolumeFormatError(f"voxel_size_nm {spacing} must be positive.", "give the voxel size in nm.")
    chunks = (
        choose_output_chunks(size, data_type) if chunk_shape is None else as_zyx(chunk_shape, "chunk_shape")
    )
    if any(c <= 0 for c in chunks):
        raise VolumeFormatError(
            f"chunk_shape {chunks} has a non-positive axis.", "give positive chunk sizes."
        )
    shards = None if shard_shape is None else as_zyx(shard_shape, "shard_shape")
    if shards is not None:
        _check_shards(fmt, chunks, shards)
    if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
        raise VolumeFormatError(
            f"num_channels={num_channels!r} is not a positive integer.", "use None or >= 1."
        )
    if fmt == "precomputed" and num_channels == 1:
        num_channels = None
    return VolumeGeometry(
        shape=size,
        dtype=data_type,
        voxel_size_nm=spacing,
        voxel_offset=as_zyx(voxel_offset, "voxel_offset"),
        chunk_shape=chunks,
        shard_shape=shards,
        num_channels=num_channels,
    )


def _check_shards(fmt: str, chunks: tuple[int, int, int], shards: tuple[int, int, int]) -> None:
    if fmt != "zarr3":
        raise VolumeFormatError(
            f"shard_shape {shards} was given for a {fmt} output; volseg shards zarr v3 outputs only.",
            "drop shard_shape, or write zarr v3 (e.g. a zarr3:// URL).",
        )
    for axis, c, s in zip("zyx", chunks, shards, strict=True):
        if s % c:
            raise AlignmentError(
                f"shard_shape {shards} is not a whole number of chunks {chunks} on axis {axis} "
                f"({s} % {c} = {s % c}).",
                f"make the shard a multiple of the chunk on axis {axis}, e.g. {max(c, s // c * c)}.",
            )


def _initial_attributes(fmt: str, attributes: dict[str, Any], url: str) -> dict[str, Any]:
    reserved = {"n5": N5_RESERVED, "precomputed": frozenset()}.get(fmt, ome_zarr.RESERVED_KEYS)
    clash = sorted(set(attributes) & reserved)
    if clash:
        raise VolumeFormatError(
            f"The attributes for {url} use the key(s) {clash}, which the {fmt} format owns.",
            "store your values under other keys.",
        )
    try:
        return dict(json.loads(json.dumps(attributes)))
    except (TypeError, ValueError) as err:
        raise VolumeFormatError(
            f"The attributes for {url} are not JSON-serialisable: {err}.",
            "pass only dicts, lists, strings, numbers, booleans and None.",
        ) from err


def _create(
    parsed: VolumeURL, fmt: str, geometry: VolumeGeometry, kind: str, attributes: dict[str, Any]
) -> None:
    if fmt in ("zarr2", "zarr3"):
        name = parsed.path.rstrip("/").rsplit("/", 1)[-1] or "volume"
        create_zarr(parsed, fmt, geometry, attributes, name, label=kind == "segmentation")
    elif fmt == "n5":
        create_n5(parsed, geometry, attributes)
    else:
        create_precomputed(parsed, geometry, kind)
        if attributes:
            AttributeStore(parsed, PRECOMPUTED_SIDECAR).update(attributes)


def _reuse(
    url: str,
    requested_format: str | None,
    existing_format: str,
    geometry: VolumeGeometry,
    kind: str,
    exist_ok: bool,
) -> Volume:
    """Open what exists at ``url`` and check it is what was asked for."""
    fix = "choose another output path."
    if requested_format is not None and existing_format not in candidates(requested_format):
        raise GeometryMismatchError(
            f"The output {url} exists with other geometry than requested: "
            f"format: given {requested_format}, existing {existing_format}.",
            fix,
        )
    try:
        volume = open_volume(url, "r+")
    except StorageUnreachableError:
        raise
    except VolsegError as err:
        raise GeometryMismatchError(
            f"Something exists at the output {url} ({existing_format}) but it cannot be reused as the "
            f"requested volume: {err}",
            fix,
        ) from err
    differences = geometry.differences(volume.geometry)
    if volume.format == "precomputed" and volume.kind != kind:
        differences.append(f"kind: given {kind}, existing {volume.kind}")
    if differences:
        raise GeometryMismatchError(
            f"The output {url} exists with other geometry than requested: " + "; ".join(differences) + ".",
            fix,
        )
    if not exist_ok:
        raise OutputExistsError(
            f"The output {url} already exists (with the requested geometry) and exist_ok=False.",
            "pass exist_ok=True to reuse it, or " + fix,
        )
    return volume
