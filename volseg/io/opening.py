"""Opening an existing volume by URL, or again from its :class:`~volseg.io.volume.VolumeSpec` (how a Volume
unpickles, e.g. on a Ray actor)."""

from __future__ import annotations

import copyreg
from typing import Any

from volseg.errors import UnsupportedURLError, VolumeFormatError
from volseg.geometry import Box
from volseg.io.array import BackendName, Mode
from volseg.io.backends.cloudvolume import gzipped_chunks_on_disk, open_cloudvolume
from volseg.io.backends.tensorstore import open_tensorstore
from volseg.io.formats import detect_format
from volseg.io.urls import parse_url
from volseg.io.volume import Volume, VolumeSpec

MODES = ("r", "r+")
BACKENDS = ("auto", "tensorstore", "cloudvolume")


def open_volume(
    url: str,
    mode: Mode = "r",
    *,
    scale: int | None = None,
    backend: BackendName = "auto",
) -> Volume:
    """Open the volume at ``url`` for reading (``"r"``) or reading and writing (``"r+"``).

    ``url`` takes the forms described in :mod:`volseg.io.urls`. Without a format prefix the format is
    found by probing metadata files (``zarr.json`` → zarr v3, ``.zarray``/``.zgroup`` → zarr v2,
    ``attributes.json`` → N5, ``info`` → precomputed). An OME-Zarr group opens the array of scale level
    ``scale`` (default 0) with the voxel size and offset of its coordinate transformations; ``scale``
    also picks an N5 ``s<scale>`` dataset of a multiscale N5 group or a precomputed scale.

    ``backend="cloudvolume"`` reads and writes precomputed volumes through cloud-volume;
    ``"tensorstore"`` uses tensorstore for every format; ``"auto"`` uses tensorstore except for a
    local precomputed volume whose chunk files cloud-volume gzipped (``*.gz``), which tensorstore
    cannot read — that one opens with cloud-volume.

    Raises :class:`~volseg.errors.VolumeNotFoundError` (nothing there; names the metadata looked for),
    :class:`~volseg.errors.UnsupportedURLError` (unknown scheme or prefix; writing over HTTP; a backend
    that cannot serve the URL) or :class:`~volseg.errors.VolumeFormatError` (rank other than 3 or 4,
    axes not (c,) z, y, x, a missing scale level, malformed metadata).
    """
    if mode not in MODES:
        raise VolumeFormatError(
            f"mode={mode!r} is not a volume mode.", "use 'r' (read) or 'r+' (read and write)."
        )
    if backend not in BACKENDS:
        raise UnsupportedURLError(f"backend={backend!r} is not a volseg backend.", f"use one of {BACKENDS}.")
    if scale is not None and scale < 0:
        raise VolumeFormatError(
            f"scale={scale} is negative.", "use 0 (full resolution) or a coarser level > 0."
        )
    parsed = parse_url(url)
    if mode == "r+" and parsed.read_only:
        raise UnsupportedURLError(
            f"Cannot open {url} for writing: {parsed.scheme}:// volumes are read-only.",
            "open it with mode='r', or write to local disk, gs:// or s3://.",
        )
    fmt = detect_format(parsed)
    if fmt == "precomputed" and backend != "cloudvolume" and gzipped_chunks_on_disk(parsed, scale):
        if backend == "tensorstore":
            raise VolumeFormatError(
                f"{url} stores gzipped chunk files (cloud-volume's default on local disk), which "
                "tensorstore cannot read: every chunk would read as missing (zeros).",
                "open it with backend='cloudvolume' (or 'auto').",
            )
        backend = "cloudvolume"
    if backend == "cloudvolume":
        if fmt != "precomputed":
            raise UnsupportedURLError(
                f"The cloud-volume backend reads Neuroglancer precomputed only, but {url} is {fmt}.",
                "use backend='auto' (tensorstore) for this volume.",
            )
        opened = open_cloudvolume(parsed, mode, scale)
        backend_name = "cloudvolume"
    else:
        opened = open_tensorstore(parsed, fmt, mode, scale)
        backend_name = "tensorstore"
    return Volume(
        spec=VolumeSpec(url=url, mode=mode, scale=scale, backend=backend),
        format=opened.format,
        geometry=opened.geometry,
        array=opened.array,
        attribute_store=opened.attribute_store,
        writable=mode == "r+",
        backend=backend_name,
        ome_version=opened.ome_version,
        scale=scale or 0,
        kind=opened.kind,
    )


def open_spec(spec: VolumeSpec) -> Volume:
    """Open the volume ``spec`` describes (its region, if it names one)."""
    volume = open_volume(spec.url, spec.mode, scale=spec.scale, backend=spec.backend)
    return volume if spec.region is None else volume.region(Box(*spec.region))


def _reduce_volume(volume: Volume) -> tuple[Any, tuple[VolumeSpec]]:
    return open_spec, (volume.spec,)


copyreg.pickle(Volume, _reduce_volume)  # a Volume pickles as its spec and reopens where it lands
