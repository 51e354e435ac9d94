"""What every storage backend of a :class:`~volseg.io.volume.Volume` provides and returns: box access to one
array (:class:`ArrayBackend`), asynchronous results, and the geometry that fixes where voxels are.

The backends (:mod:`volseg.io.backends.tensorstore`, :mod:`volseg.io.backends.cloudvolume`) depend on this
module only, never on the Volume or on how volumes are opened, so the import graph has no cycle::

    array ← volume ← opening → backends → array
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from volseg.errors import VolumeFormatError
from volseg.geometry import Box
from volseg.io.attributes import AttributeStore

T_co = TypeVar("T_co", covariant=True)

Mode = Literal["r", "r+"]
BackendName = Literal["auto", "tensorstore", "cloudvolume"]


class ResultFuture(Protocol[T_co]):
    """An asynchronous result: ``result()`` blocks until it is ready (or raises the operation's error).

    tensorstore futures and :class:`concurrent.futures.Future` both qualify.
    """

    def result(self, timeout: float | None = None) -> T_co: ...


class ArrayBackend(Protocol):
    """Box access to one stored array, indexed (c,) z, y, x from 0.

    Boxes and arrays reaching a backend are already checked by :class:`Volume`.
    """

    def read(self, box: Box) -> ResultFuture[np.ndarray]:
        """Start reading ``box`` (all channels)."""
        ...

    def write(self, box: Box, array: np.ndarray, handover: bool = False) -> ResultFuture[None]:
        """Start writing ``array`` into ``box``; the caller may reuse ``array`` once this returns,
        unless ``handover`` (then the backend may keep referring to it instead of copying it).

        The future resolves once the data is durably stored.
        """
        ...


@dataclass(frozen=True)
class VolumeGeometry:
    """Everything that fixes where a volume's voxels are and how they are stored.

    ``shape``, ``voxel_size_nm``, ``voxel_offset``, ``chunk_shape`` and ``shard_shape`` are spatial
    (z, y, x); channels are counted by ``num_channels`` (``None``: the array has no channel axis).
    """

    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_nm: tuple[float, float, float]
    voxel_offset: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    shard_shape: tuple[int, int, int] | None = None
    num_channels: int | None = None

    @property
    def write_chunk(self) -> tuple[int, int, int]:
        """The unit one writer must own: the shard if the array is sharded, else the chunk."""
        return self.shard_shape if self.shard_shape is not None else self.chunk_shape

    def differences(self, existing: VolumeGeometry) -> list[str]:
        """One line per field that differs: ``"field: given X, existing Y"`` (voxel sizes to 1e-6)."""
        lines = []
        for name in ("shape", "dtype", "voxel_offset", "chunk_shape", "shard_shape", "num_channels"):
            given, found = getattr(self, name), getattr(existing, name)
            if given != found:
                lines.append(f"{name}: given {_show(given)}, existing {_show(found)}")
        if not np.allclose(self.voxel_size_nm, existing.voxel_size_nm, rtol=1e-6, atol=0):
            lines.append(
                f"voxel_size_nm: given {_show(self.voxel_size_nm)}, existing {_show(existing.voxel_size_nm)}"
            )
        return lines


def _show(value: Any) -> str:
    if isinstance(value, np.dtype):
        return value.name
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return str(value)


@dataclass(frozen=True)
class OpenedArray:
    """What a backend found when opening a URL: the array, its geometry and its attributes."""

    format: str
    geometry: VolumeGeometry
    array: ArrayBackend
    attribute_store: AttributeStore
    ome_version: str | None = None
    kind: str = "image"


def as_zyx(values: Sequence[float] | Sequence[int], name: str, kind: type = int) -> tuple[Any, Any, Any]:
    """``values`` as a 3-tuple of ``kind``; anything but 3 values raises VolumeFormatError naming ``name``."""
    items = tuple(values)
    if len(items) != 3:
        raise VolumeFormatError(
            f"{name} is {items!r}; expected 3 values in z, y, x order.", f"give {name} as (z, y, x)."
        )
    converted = tuple(kind(v) for v in items)
    return converted[0], converted[1], converted[2]
