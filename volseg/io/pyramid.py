"""Scale levels of a volume volseg wrote: level k+1 is level k downsampled by a factor of 1 or 2 per axis.

Factors make voxels more isotropic first: an axis is halved while its voxel is under 1.5 × the smallest
voxel size, so MitoEM's 30 × 8 × 8 nm goes (1, 2, 2) → 30 × 16 × 16, (1, 2, 2) → 30 × 32 × 32, then
(2, 2, 2). Level k keeps level 0's chunk shape (clipped to its shape) and has no shards; its voxel offset
is level 0's divided by the factors so far (rounded down). OME-Zarr images get arrays ``<url>/<k>`` listed
in their ``multiscales``; precomputed volumes get a scale in their ``info``. Neuroglancer then loads the
level that fits the zoom, and ``open_volume(url, scale=k)`` reads it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from volseg.errors import ConfigError
from volseg.io.array import VolumeGeometry
from volseg.io.backends.tensorstore import create_precomputed_level, create_zarr_level
from volseg.io.opening import open_volume
from volseg.io.urls import parse_url
from volseg.io.volume import Volume

#: Formats that hold scale levels (N5 outputs are single datasets).
MULTISCALE_FORMATS = ("zarr2", "zarr3", "precomputed")


def level_factors(voxel_size_nm: Sequence[float], levels: int) -> list[tuple[int, int, int]]:
    """The factor from each level to the next, for ``levels`` levels (``levels - 1`` factors)."""
    voxel = [float(v) for v in voxel_size_nm]
    factors = []
    for _ in range(levels - 1):
        smallest = min(voxel)
        factor = tuple(2 if v < 1.5 * smallest else 1 for v in voxel)
        voxel = [v * f for v, f in zip(voxel, factor, strict=True)]
        factors.append((factor[0], factor[1], factor[2]))
    return factors


def level_geometry(below: VolumeGeometry, factor: Sequence[int]) -> VolumeGeometry:
    """The geometry of the level above ``below``, downsampled by ``factor`` (z, y, x)."""
    shape = tuple(math.ceil(s / f) for s, f in zip(below.shape, factor, strict=True))
    return replace(
        below,
        shape=(shape[0], shape[1], shape[2]),
        voxel_size_nm=tuple(v * f for v, f in zip(below.voxel_size_nm, factor, strict=True)),  # type: ignore[arg-type]
        voxel_offset=tuple(o // f for o, f in zip(below.voxel_offset, factor, strict=True)),  # type: ignore[arg-type]
        chunk_shape=tuple(min(c, s) for c, s in zip(below.chunk_shape, shape, strict=True)),  # type: ignore[arg-type]
        shard_shape=None,
    )


def check_multiscale(url: str, field: str, fmt: str) -> None:
    """Refuse scale levels for a format that cannot hold them (one line naming the field)."""
    if fmt not in MULTISCALE_FORMATS:
        raise ConfigError(f"output.levels asks for scale levels, but {field} {url!r} is {fmt}, which volseg writes "
                          "as one dataset.", f"write {field} as zarr (OME-Zarr) or precomputed://, or set "
                          "output.levels: 1.")


def create_level(below: Volume, level: int, factor: Sequence[int]) -> Volume:
    """Create scale level ``level`` of the volume whose level ``level - 1`` is ``below`` (or reuse it when
    it exists with the same geometry), and open it for writing."""
    check_multiscale(below.url, "the output", below.format)
    geometry = level_geometry(below.geometry, factor)
    url = parse_url(below.url)
    if below.format == "precomputed":
        create_precomputed_level(url, below.kind, geometry)
    else:
        create_zarr_level(url, below.format, level, geometry)
    return open_volume(below.url, "r+", scale=level)
