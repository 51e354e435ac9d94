"""The cloud-volume backend: Neuroglancer precomputed through :class:`cloudvolume.CloudVolume`.

For users whose volumes already live behind cloud-volume (its credentials, caches, HTTP hosting).
cloud-volume indexes x, y, z, channel in global coordinates (starting at ``voxel_offset``); this backend
shifts boxes by the offset and transposes to volseg's (c,) z, y, x. Reads of chunks never written give
zeros (``fill_missing``).

On local disk cloud-volume gzips chunk files by default (``<chunk>.gz``), which tensorstore and
Neuroglancer see as missing chunks; :func:`gzipped_chunks_on_disk` detects such volumes so that
:func:`volseg.io.open_volume` reads them with this backend. Writes keep a volume's existing convention
(gzip files if it has them, plain chunk files otherwise). Operations run on a small thread pool, so
``read_async``/``write_async`` overlap I/O like the tensorstore backend does.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from volseg.errors import UnsupportedURLError, VolsegError, VolumeFormatError
from volseg.geometry import Box
from volseg.io.array import OpenedArray, VolumeGeometry, as_zyx
from volseg.io.attributes import PRECOMPUTED_SIDECAR, AttributeStore
from volseg.io.storage import REMOTE_SCHEMES, read_json, run_bounded, short_error, storage_error, unreachable
from volseg.io.urls import VolumeURL

CLOUDVOLUME_SCHEMES = frozenset({"file", "gs", "s3", "http", "https"})
_POOL_WORKERS = 4
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_POOL_WORKERS, thread_name_prefix="volseg-cloudvolume")
        return _pool


class CloudVolumeArray:
    """:class:`~volseg.io.array.ArrayBackend` over a CloudVolume at one mip level."""

    def __init__(self, volume: Any, offset_zyx: tuple[int, int, int], has_channels: bool) -> None:
        self._volume = volume
        self._offset_xyz = offset_zyx[::-1]
        self._has_channels = has_channels

    def _slices_xyz(self, box: Box) -> tuple[slice, ...]:
        return tuple(
            slice(b + o, e + o)
            for b, e, o in zip(box.start[::-1], box.stop[::-1], self._offset_xyz, strict=True)
        )

    def _read_now(self, box: Box) -> np.ndarray:
        num_channels = int(self._volume.num_channels)
        if box.empty:
            shape = (num_channels, *box.shape) if self._has_channels else box.shape
            return np.zeros(shape, dtype=np.dtype(self._volume.dtype))
        cutout = np.asarray(self._volume[self._slices_xyz(box)])  # x, y, z, c
        zyx = cutout.transpose(3, 2, 1, 0)
        return np.ascontiguousarray(zyx if self._has_channels else zyx[0])

    def _write_now(self, box: Box, array: np.ndarray) -> None:
        if box.empty:
            return
        xyz = array.transpose(3, 2, 1, 0) if self._has_channels else array.T[..., np.newaxis]
        self._volume[self._slices_xyz(box)] = np.ascontiguousarray(xyz)

    def read(self, box: Box) -> Future[np.ndarray]:
        """Start reading ``box`` on the backend's thread pool."""
        return _executor().submit(self._read_now, box)

    def write(self, box: Box, array: np.ndarray, handover: bool = False) -> Future[None]:
        """Start writing ``array`` (a private copy of it, unless it is handed over)."""
        return _executor().submit(self._write_now, box, array if handover else array.copy())


def gzipped_chunks_on_disk(url: VolumeURL, scale: int | None) -> bool:
    """Whether the local precomputed scale ``scale`` stores gzipped chunk files (``*.gz``).

    Looks at up to 64 entries of the scale's directory; always ``False`` for non-local URLs (object
    stores serve gzip through Content-Encoding, which every reader handles).
    """
    if url.scheme != "file":
        return False
    scales = (read_json(url, "info") or {}).get("scales") or []
    level = scale or 0
    if not 0 <= level < len(scales) or "key" not in scales[level]:
        return False
    directory = os.path.join(url.path, str(scales[level]["key"]))
    try:
        with os.scandir(directory) as entries:
            for count, entry in enumerate(entries):
                if entry.name.endswith(".gz"):
                    return True
                if count >= 64:
                    break
    except (FileNotFoundError, NotADirectoryError):
        return False
    return False


_CLIENT_PACKAGES = frozenset({"google", "botocore", "boto3", "requests", "urllib3", "socket"})
"""Packages whose errors, raised while opening a remote volume, mean "not reachable or not allowed"."""


def _open_error(error: Exception, url: VolumeURL) -> VolsegError:
    """The volseg error for ``error`` raised by cloud-volume while opening ``url``.

    From gs://, s3:// or http(s)://, a network or OS error, or one of
    the credential and HTTP clients (missing credentials: google-auth's ``DefaultCredentialsError``,
    botocore's ``NoCredentialsError``), gives :class:`~volseg.errors.StorageUnreachableError`;
    anything else (a missing or malformed ``info``) :class:`~volseg.errors.VolumeFormatError`.
    """
    first_sentence = " ".join(str(error).split()).split(". ")[0]
    cause = f"{type(error).__name__}: {short_error(first_sentence, 160)}"
    package = type(error).__module__.split(".")[0]
    if url.scheme in REMOTE_SCHEMES and (isinstance(error, OSError) or package in _CLIENT_PACKAGES):
        return unreachable(url, cause)
    return storage_error(
        cause, url, f"cloud-volume could not open {url.url}", VolumeFormatError,
        "check that the URL points at a Neuroglancer precomputed volume (its info file).",
    )


def cloudvolume_path(url: VolumeURL) -> str:
    """The cloud-volume path of ``url`` (``precomputed://`` + location)."""
    if url.scheme not in CLOUDVOLUME_SCHEMES:
        raise UnsupportedURLError(
            f"The cloud-volume backend cannot open {url.url}: it supports "
            f"{', '.join(sorted(CLOUDVOLUME_SCHEMES))} locations, not {url.scheme}://.",
            "use backend='tensorstore' (or 'auto') for this URL.",
        )
    return f"precomputed://{url.location}"


def open_cloudvolume(url: VolumeURL, mode: str, scale: int | None) -> OpenedArray:
    """Open the precomputed volume at ``url`` with cloud-volume at mip ``scale`` (default 0).

    The open (which reads ``info``, and for gs:// and s3:// first looks up credentials) waits at most
    the storage timeout; it and any failure of it raise one line naming ``url`` (see :func:`_open_error`).
    """
    from cloudvolume import CloudVolume

    path = cloudvolume_path(url)
    mip = scale or 0
    compress = None if gzipped_chunks_on_disk(url, mip) else False
    try:
        volume = run_bounded(
            lambda: CloudVolume(
                path,
                mip=mip,
                bounded=True,
                fill_missing=True,
                non_aligned_writes=True,
                progress=False,
                cache=False,
                parallel=1,
                delete_black_uploads=False,
                compress=compress,
            ),
            url,
        )
    except (VolsegError, TypeError, AttributeError, NameError):  # already one line, or a bug in volseg
        raise
    except Exception as err:  # whatever cloud-volume or its storage clients raise: classified there
        raise _open_error(err, url) from err
    if mode == "r+" and volume.scale.get("sharding"):
        raise VolumeFormatError(
            f"Mip {mip} of {url.url} is sharded; volseg's cloud-volume backend cannot write it.",
            "open it read-only, or write to an unsharded volume.",
        )
    num_channels = int(volume.num_channels)
    offset = as_zyx(list(volume.voxel_offset)[::-1], "voxel offset")
    geometry = VolumeGeometry(
        shape=as_zyx(list(volume.volume_size)[::-1], "shape"),
        dtype=np.dtype(volume.dtype),
        voxel_size_nm=as_zyx(list(volume.resolution)[::-1], "voxel size", float),
        voxel_offset=offset,
        chunk_shape=as_zyx(list(volume.chunk_size)[::-1], "chunk shape"),
        shard_shape=None,
        num_channels=num_channels if num_channels > 1 else None,
    )
    return OpenedArray(
        format="precomputed",
        geometry=geometry,
        array=CloudVolumeArray(volume, offset, num_channels > 1),
        attribute_store=AttributeStore(url, PRECOMPUTED_SIDECAR),
        kind=str(volume.layer_type),
    )
