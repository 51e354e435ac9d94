"""The :class:`Volume`: one array of a stored volume, read and written by boxes in (z, y, x).

A volume is addressed by 0-based voxel indices of its array — the :class:`~volseg.geometry.Box` that a
read or write takes never includes the ``voxel_offset`` (which only places the array in physical
space). Arrays are (z, y, x), or (c, z, y, x) for volumes with channels; a box always names the three
spatial axes and reads or writes all channels::

    physical position (nm) = (index + voxel_offset) * voxel_size_nm        per axis z, y, x

Backends (tensorstore, cloud-volume) implement :class:`~volseg.io.array.ArrayBackend`; the Volume checks
every box, array shape and dtype before handing them over, so all backends fail the same way on bad input.
A :class:`VolumeSpec` says how to open a volume again (:func:`volseg.io.opening.open_spec`); a Volume pickles
as its spec (registered by :mod:`volseg.io.opening`, which this module does not import).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from volseg.errors import GeometryMismatchError, VolumeFormatError
from volseg.geometry import Box
from volseg.io.array import ArrayBackend, BackendName, Mode, ResultFuture, VolumeGeometry
from volseg.io.attributes import AttributeStore
from volseg.io.urls import parse_url


@dataclass(frozen=True)
class VolumeSpec:
    """How to open a volume again — small and picklable, so it can cross process (Ray) boundaries."""

    url: str
    mode: Mode = "r"
    scale: int | None = None
    backend: BackendName = "auto"
    #: ``(start, stop)`` (z, y, x) of a read-only region of the volume (see :meth:`Volume.region`).
    region: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None


class Volume:
    """One array of a stored volume (see the module docstring for coordinates and shapes).

    Attributes: ``url`` (as given to open or create), ``format`` (``"zarr2"``, ``"zarr3"``, ``"n5"``
    or ``"precomputed"``), ``ome_version`` (``"0.4"``/``"0.5"`` when the URL is an OME-Zarr image,
    else ``None``), ``scale`` (the scale level opened), ``kind`` (``"image"`` or ``"segmentation"``;
    only precomputed records it, other formats report ``"image"``), ``backend``, and the geometry
    fields ``shape``, ``num_channels``, ``dtype``, ``voxel_size_nm``, ``voxel_offset``,
    ``chunk_shape``, ``shard_shape``, ``write_chunk``, ``bounds``.

    A Volume pickles as its :class:`VolumeSpec` and reopens on unpickling.
    """

    def __init__(
        self,
        *,
        spec: VolumeSpec,
        format: str,
        geometry: VolumeGeometry,
        array: ArrayBackend,
        attribute_store: AttributeStore,
        writable: bool,
        backend: str,
        ome_version: str | None = None,
        scale: int = 0,
        kind: str = "image",
    ) -> None:
        self.url = spec.url
        self.spec = _absolute(spec)
        self.format = format
        self.geometry = geometry
        self.backend = backend
        self.ome_version = ome_version
        self.scale = scale
        self.kind = kind
        self.writable = writable
        self.shape = geometry.shape
        self.num_channels = geometry.num_channels
        self.dtype = geometry.dtype
        self.voxel_size_nm = geometry.voxel_size_nm
        self.voxel_offset = geometry.voxel_offset
        self.chunk_shape = geometry.chunk_shape
        self.shard_shape = geometry.shard_shape
        self.write_chunk = geometry.write_chunk
        self.bounds = Box.from_shape(geometry.shape)
        self._array = array
        self._attributes = attribute_store

    def __repr__(self) -> str:
        channels = "" if self.num_channels is None else f", num_channels={self.num_channels}"
        return (
            f"Volume({self.url!r}, format={self.format!r}, shape={self.shape}{channels}, "
            f"dtype={self.dtype.name}, voxel_size_nm={self.voxel_size_nm}, chunk_shape={self.chunk_shape}, "
            f"writable={self.writable})"
        )

    def region(self, box: Box) -> Volume:
        """A read-only view of ``box`` of this volume, indexed from the box's start (its voxel offset
        moves with it, so it stays in place physically): e.g. the slices a model may train on."""
        if not self.bounds.contains(box) or box.size == 0:
            raise GeometryMismatchError(f"The region {box} is not a non-empty part of {self.url} {self.bounds}.",
                                        "give a region inside the volume's shape (z, y, x, 0-based, half-open).")
        geometry = replace(self.geometry, shape=box.shape,
                           voxel_offset=tuple(o + s for o, s in zip(self.voxel_offset, box.start, strict=True)))
        start = tuple(int(s) for s in box.start)
        base = self.spec.region[0] if self.spec.region is not None else (0, 0, 0)
        absolute = tuple(b + s for b, s in zip(base, start, strict=True))
        spec = replace(self.spec, mode="r", region=(absolute, tuple(a + n for a, n in zip(absolute, box.shape,
                                                                                             strict=True))))
        return Volume(spec=spec, format=self.format, geometry=geometry, array=_ShiftedArray(self._array, start),
                      attribute_store=self._attributes, writable=False, backend=self.backend,
                      ome_version=self.ome_version, scale=self.scale, kind=self.kind)

    def array_shape(self, box: Box) -> tuple[int, ...]:
        """The shape of the array that :meth:`read` returns for ``box``: (z, y, x) or (c, z, y, x)."""
        return box.shape if self.num_channels is None else (self.num_channels, *box.shape)

    def read(self, box: Box) -> np.ndarray:
        """The voxels of ``box`` (all channels), shaped as :meth:`array_shape` says.

        ``box`` must lie inside :attr:`bounds`, else :class:`~volseg.errors.GeometryMismatchError`
        names the box and the bounds. An empty box gives an empty array. Chunks never written read as 0.
        """
        return self.read_async(box).result()

    def read_async(self, box: Box) -> ResultFuture[np.ndarray]:
        """Start :meth:`read`; box errors are raised here, storage errors by ``result()``."""
        self._check_box(box, "read")
        return self._array.read(box)

    def write(self, box: Box, array: np.ndarray) -> None:
        """Write ``array`` into ``box`` and wait until it is durably stored.

        ``array`` must have exactly :meth:`array_shape` ``(box)`` and :attr:`dtype` — volseg never
        casts silently. Writing a box that covers only part of a :attr:`write_chunk` reads, merges
        and rewrites that chunk, which races with other writers of the same chunk; blockwise writers
        should own whole write chunks (see :meth:`volseg.geometry.BlockGrid.aligned`).
        """
        self.write_async(box, array).result()

    def write_async(self, box: Box, array: np.ndarray, handover: bool = False) -> ResultFuture[None]:
        """Start :meth:`write`; ``result()`` returns once the data is durable.

        Input errors (read-only volume, box, shape, dtype) are raised here. ``array`` may be reused
        as soon as this returns, unless ``handover`` is set: the caller then hands ``array`` over for
        good (it never modifies it again), and the store writes from it without a private copy, which
        saves a copy of every block and the memory of that copy while the write drains.
        """
        if not self.writable:
            raise VolumeFormatError(
                f"The volume {self.url} was opened read-only, so the box {box} cannot be written.",
                "open it with mode='r+' (http(s):// volumes are always read-only).",
            )
        self._check_box(box, "write")
        data = np.asarray(array)
        expected = self.array_shape(box)
        if data.shape != expected:
            axes = "(z, y, x)" if self.num_channels is None else "(c, z, y, x)"
            raise VolumeFormatError(
                f"Cannot write an array of shape {data.shape} into the box {box} of {self.url}: "
                f"expected shape {expected} {axes}.",
                "pass an array with the box's shape (and all channels first, if any).",
            )
        if data.dtype != self.dtype:
            raise VolumeFormatError(
                f"Cannot write {data.dtype.name} data into {self.url}, which stores {self.dtype.name}.",
                f"convert the array first, e.g. array.astype(np.{self.dtype.name}), after checking that "
                "the values fit.",
            )
        return self._array.write(box, data, handover)

    @property
    def attributes(self) -> dict[str, Any]:
        """The volume's JSON user attributes, freshly read (format-owned keys left out)."""
        return self._attributes.read()

    def update_attributes(self, values: dict[str, Any]) -> None:
        """Merge ``values`` into the user attributes (shallow: each given key is replaced).

        Atomic against concurrent updates from other processes. Needs mode ``"r+"``.
        """
        if not self.writable:
            raise VolumeFormatError(
                f"The volume {self.url} was opened read-only, so its attributes cannot be updated.",
                "open it with mode='r+'.",
            )
        self._attributes.update(values)

    def _check_box(self, box: Box, action: str) -> None:
        if not isinstance(box, Box):
            raise TypeError(f"expected a volseg.geometry.Box, got {type(box).__name__}")
        if box.ndim != 3:
            raise GeometryMismatchError(
                f"Cannot {action} the box {box} of {self.url}: it has {box.ndim} axes, volumes are "
                "addressed by 3 (z, y, x).",
                "give a (z, y, x) box; channels are always read and written whole.",
            )
        if not self.bounds.contains(box):
            raise GeometryMismatchError(
                f"Cannot {action} the box {box} of {self.url}: it reaches outside the volume's bounds "
                f"{self.bounds} (z, y, x, 0-based voxel indices; the voxel offset {self.voxel_offset} "
                "is not part of them).",
                "clip the box to the bounds, e.g. box.intersect(volume.bounds).",
            )


class _ShiftedArray:
    """An :class:`ArrayBackend` whose box ``b`` is box ``b + start`` of another (a region's view)."""

    def __init__(self, array: ArrayBackend, start: tuple[int, ...]) -> None:
        self._array, self._start = array, start

    def _shift(self, box: Box) -> Box:
        return Box(tuple(b + s for b, s in zip(box.start, self._start, strict=True)),
                   tuple(e + s for e, s in zip(box.stop, self._start, strict=True)))

    def read(self, box: Box) -> ResultFuture[np.ndarray]:
        return self._array.read(self._shift(box))

    def write(self, box: Box, array: np.ndarray, handover: bool = False) -> ResultFuture[None]:
        raise VolumeFormatError("A region of a volume is read-only.", "write to the volume itself.")


def _absolute(spec: VolumeSpec) -> VolumeSpec:
    """The spec with a relative local path made absolute now: whoever reopens it (a Ray actor, after
    unpickling) may run in another working directory. Any other URL keeps the form it was given in."""
    parsed = parse_url(spec.url)
    return replace(spec, url=str(parsed)) if parsed.relative else spec
