"""Choosing the storage chunking of an output volume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from volseg.errors import VolumeFormatError

TARGET_CHUNK_ZYX: tuple[int, int, int] = (32, 256, 256)
MIN_CHUNK_ZYX: tuple[int, int, int] = (16, 128, 128)
MAX_CHUNK_BYTES = 4 * 2**20


def choose_output_chunks(
    shape_zyx: Sequence[int],
    dtype: DTypeLike,
    input_chunk_zyx: Sequence[int] | None = None,
) -> tuple[int, int, int]:
    """A chunk shape (z, y, x) suited to blockwise writes of an output of ``shape_zyx`` voxels.

    The rule, applied in order:

    1. Start from (32, 256, 256): wide in y, x — EM is anisotropic and 2D models work slice-wise —
       and shallow in z.
    2. While a chunk holds more than 4 MiB of ``dtype``, halve z (down to 16), then y and x together
       (down to 128). E.g. uint8 → (32, 256, 256), float32 → (16, 256, 256), uint64 → (16, 128, 128).
    3. With ``input_chunk_zyx``, snap each axis to the input chunking so blocks aligned to output
       chunks are also aligned to input chunks: an input chunk ``c <= target`` gives the largest
       multiple of ``c`` not above the target; a larger input chunk keeps the target (the targets are
       powers of two, which divide the usual power-of-two input chunks).
    4. Clip each axis to the volume's extent (a chunk is never larger than the volume, minimum 1).
    """
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise VolumeFormatError(
            f"Cannot choose chunks for the shape {shape}: expected 3 positive sizes (z, y, x).",
            "pass the spatial shape of the output volume.",
        )
    itemsize = np.dtype(dtype).itemsize
    z, yx = TARGET_CHUNK_ZYX[0], TARGET_CHUNK_ZYX[1]
    while z * yx * yx * itemsize > MAX_CHUNK_BYTES and z > MIN_CHUNK_ZYX[0]:
        z //= 2
    while z * yx * yx * itemsize > MAX_CHUNK_BYTES and yx > MIN_CHUNK_ZYX[1]:
        yx //= 2
    target = [z, yx, yx]
    if input_chunk_zyx is not None:
        given = tuple(int(c) for c in input_chunk_zyx)
        if len(given) != 3 or any(c <= 0 for c in given):
            raise VolumeFormatError(
                f"The input chunk shape {given} is not 3 positive sizes (z, y, x).",
                "pass the input volume's spatial chunk shape.",
            )
        target = [t // c * c if c <= t else t for t, c in zip(target, given, strict=True)]
    return (min(target[0], shape[0]), min(target[1], shape[1]), min(target[2], shape[2]))
