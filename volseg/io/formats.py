"""Storage formats: telling them apart by their metadata files, and what each can store.

============  ==========================  ======================================================
format        metadata probed             notes
============  ==========================  ======================================================
zarr3         ``zarr.json``               array, or OME-Zarr 0.5 group; sharding codec optional
zarr2         ``.zarray`` / ``.zgroup``   array, or OME-Zarr 0.4 group
n5            ``attributes.json``         dataset, or multiscale group with datasets ``s0``, ``s1``...
precomputed   ``info``                    Neuroglancer precomputed, any scale of its ``scales``
============  ==========================  ======================================================
"""

from __future__ import annotations

import numpy as np

from volseg.errors import VolumeFormatError, VolumeNotFoundError
from volseg.io.storage import read_keys
from volseg.io.urls import VolumeURL

FORMATS: tuple[str, ...] = ("zarr3", "zarr2", "n5", "precomputed")

METADATA_KEYS: dict[str, tuple[str, ...]] = {
    "zarr3": ("zarr.json",),
    "zarr2": (".zarray", ".zgroup"),
    "n5": ("attributes.json",),
    "precomputed": ("info",),
}

_INTS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64")
DTYPES: dict[str, tuple[str, ...]] = {
    "zarr3": (*_INTS, "float32", "float64"),
    "zarr2": (*_INTS, "float32", "float64"),
    "n5": (*_INTS, "float32", "float64"),
    "precomputed": ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "float32"),
}
"""The dtypes volseg creates in each format."""


def candidates(fmt: str | None) -> tuple[str, ...]:
    """The formats a URL's format prefix allows (``zarr``: either version; ``None``: all)."""
    if fmt is None:
        return FORMATS
    if fmt == "zarr":
        return ("zarr3", "zarr2")
    return (fmt,)


def probe_format(url: VolumeURL) -> str | None:
    """The format whose metadata exists at ``url`` (restricted by its prefix), or ``None``.

    All candidate metadata files are read at once; the first format in :data:`FORMATS` order that
    has one wins.
    """
    formats = candidates(url.format)
    keys = [key for fmt in formats for key in METADATA_KEYS[fmt]]
    found = read_keys(url, keys)
    for fmt in formats:
        if any(found[key] is not None for key in METADATA_KEYS[fmt]):
            return fmt
    return None


def detect_format(url: VolumeURL) -> str:
    """Like :func:`probe_format`, but raises :class:`~volseg.errors.VolumeNotFoundError` if nothing is there.

    The message names the URL and every metadata file looked for.
    """
    fmt = probe_format(url)
    if fmt is None:
        keys = [key for f in candidates(url.format) for key in METADATA_KEYS[f]]
        raise VolumeNotFoundError(
            f"No volume found at {url.url}: looked for the metadata file(s) {', '.join(keys)} under "
            f"{url.location} and none exists.",
            "check the path (and the format prefix, if any), or create the volume first.",
        )
    return fmt


def creation_format(url: VolumeURL, requested: str | None) -> str:
    """The format to create at ``url``: ``requested``, else the URL's prefix, else by path.

    Without either, a path ending in ``.n5`` or containing ``.n5/`` gives ``n5``; anything else
    ``zarr3``. ``zarr`` means ``zarr3``. A ``requested`` format contradicting the prefix raises
    :class:`~volseg.errors.VolumeFormatError`.
    """
    aliases = {"zarr": "zarr3", "ome-zarr": "zarr3", "neuroglancer-precomputed": "precomputed"}
    wanted = aliases.get(requested, requested) if requested is not None else None
    if wanted is not None and wanted not in FORMATS:
        raise VolumeFormatError(
            f"format={requested!r} is not a format volseg can create.",
            f"use one of {', '.join(FORMATS)} (or leave it out to follow the URL).",
        )
    prefix = url.format
    if wanted is not None and prefix is not None and wanted not in candidates(prefix):
        raise VolumeFormatError(
            f"format={requested!r} contradicts the URL {url.url}, whose prefix says {prefix}.",
            "drop one of the two or make them agree.",
        )
    if wanted is not None:
        return wanted
    if prefix is not None:
        return "zarr3" if prefix == "zarr" else prefix
    path = url.path.rstrip("/")
    return "n5" if path.endswith(".n5") or ".n5/" in url.path else "zarr3"


def check_dtype(fmt: str, dtype: np.dtype) -> None:
    """Raise :class:`~volseg.errors.VolumeFormatError` unless ``fmt`` can store ``dtype``."""
    if dtype.name not in DTYPES[fmt]:
        raise VolumeFormatError(
            f"The {fmt} format cannot store dtype {dtype.name}.",
            f"use one of {', '.join(DTYPES[fmt])}.",
        )
