"""Stacks of 2D images (one PNG or TIFF file per z-slice) as volumes, and their conversion to a chunked one.

Many EM datasets are released as image stacks: MitoEM's EM is ``im/im0000.png`` … ``im0999.png`` (uint8,
4096 × 4096) and its labels one TIFF per slice of instance ids. :func:`convert_stack` writes such a stack
into a zarr / OME-Zarr / N5 / precomputed volume layer by layer (``chunk[0]`` slices at a time, read by a
few threads), so memory holds one layer of chunks, never the volume::

    files (sorted by the number in their names)     layer of chunk[0] slices    output (created new)
    im0000.png im0001.png … im0015.png        ──▶   16 × 4096 × 4096       ──▶  z 0..16 written
    im0016.png …                              ──▶   …                      ──▶  …

Every file must have the first file's shape and dtype; a file that differs, or cannot be read, is named
in one line, and nothing after it is written. The output must not exist: a conversion is never written
into an existing volume (one stopped half way leaves a partly written volume: delete it and convert again).
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from volseg.errors import ConfigError, VolumeFormatError
from volseg.geometry import Box
from volseg.io.creation import create_volume
from volseg.io.volume import Volume

#: Slices read at once (threads).
READERS = 4


def _natural(path: str) -> tuple:
    """Sort key: the numbers in a name compared as numbers (``im2`` before ``im10``)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", Path(path).name))


@dataclass(frozen=True)
class ImageStack:
    """A sorted list of 2D image files, one per z-slice, all of one shape and dtype."""

    files: tuple[str, ...]
    shape_yx: tuple[int, int]
    dtype: np.dtype

    @classmethod
    def find(cls, pattern: str) -> ImageStack:
        """The files matching the glob ``pattern`` (or every file of a folder), sorted by the numbers in
        their names; shape and dtype from the first. Raises :class:`ConfigError` when nothing matches."""
        if Path(pattern).is_dir():
            pattern = str(Path(pattern) / "*")
        files = sorted((f for f in glob.glob(pattern) if Path(f).is_file()), key=_natural)
        if not files:
            raise ConfigError(f"no image files match {pattern!r}.",
                              "give a glob of the slices, e.g. 'MitoEM-R/im/*.png' (quoted), or their folder.")
        first = _read(files[0])
        return cls(tuple(files), (int(first.shape[0]), int(first.shape[1])), first.dtype)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.files), *self.shape_yx)

    def read(self, z0: int, z1: int, pool: ThreadPoolExecutor) -> np.ndarray:
        """Slices ``z0 … z1 - 1`` as one ``Z×Y×X`` array, each checked against the first's shape and dtype."""
        planes = list(pool.map(_read, self.files[z0:z1]))
        for path, plane in zip(self.files[z0:z1], planes, strict=True):
            if plane.shape != self.shape_yx or plane.dtype != self.dtype:
                raise VolumeFormatError(
                    f"{path} is {plane.shape[1]}×{plane.shape[0]} {plane.dtype}, but {self.files[0]} is "
                    f"{self.shape_yx[1]}×{self.shape_yx[0]} {self.dtype}.",
                    "convert only the slices of one volume (every file one grey-level or label image of one size).")
        return np.stack(planes)


def _read(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, ValueError) as error:
        raise VolumeFormatError(f"{path} is not an image volseg can read ({error}).",
                                "give PNG or TIFF files of single-channel slices.") from None
    if array.ndim == 3 and array.shape[2] in (3, 4) and (array[..., :3] == array[..., :1]).all():
        array = array[..., 0]  # grey saved as RGB(A)
    if array.ndim != 2:
        raise VolumeFormatError(f"{path} has shape {array.shape}: not a single-channel slice.",
                                "give grey-level (or label) images, one channel each.")
    return array


def convert_stack(stack: ImageStack, url: str, voxel_size_nm: Sequence[float], chunk: Sequence[int] | None = None,
                  kind: str = "image", on_layer: Callable[[int], None] | None = None) -> Volume:
    """Write ``stack`` into a new volume at ``url`` (never over an existing one), a layer of ``chunk[0]``
    slices at a time; ``kind`` ``"segmentation"`` for label images (precomputed records it). ``on_layer``
    is told the slices of each layer written."""
    volume = create_volume(url, shape=stack.shape, dtype=stack.dtype, voxel_size_nm=tuple(voxel_size_nm),
                           chunk_shape=None if chunk is None else tuple(chunk), kind=kind, exist_ok=False)
    assert volume is not None
    depth = volume.chunk_shape[0]
    with ThreadPoolExecutor(READERS) as pool:
        for z0 in range(0, stack.shape[0], depth):
            z1 = min(z0 + depth, stack.shape[0])
            volume.write(Box((z0, 0, 0), (z1, *stack.shape_yx)), stack.read(z0, z1, pool))
            if on_layer is not None:
                on_layer(z1 - z0)
    return volume
