"""Volume storage: open or create volumes by URL and read/write them by (z, y, x) boxes.

Example::

    vol = create_volume("out.zarr", shape=(8, 64, 64), dtype="uint8", voxel_size_nm=(40, 4, 4))
    vol.write(vol.bounds, np.zeros(vol.shape, np.uint8))
    open_volume("out.zarr").read(Box((0, 0, 0), (2, 2, 2))).shape    # (2, 2, 2)

Formats: zarr v2/v3 (incl. OME-Zarr and zarr v3 sharding), N5, Neuroglancer precomputed; storage:
local paths, ``file://``, ``memory://``, ``gs://``, ``s3://`` and read-only ``http(s)://``.
"""

from volseg.io.array import ResultFuture, VolumeGeometry
from volseg.io.chunks import choose_output_chunks
from volseg.io.creation import create_volume
from volseg.io.opening import open_spec, open_volume
from volseg.io.urls import VolumeURL, parse_url
from volseg.io.volume import Volume, VolumeSpec

__all__ = [
    "ResultFuture",
    "Volume",
    "VolumeGeometry",
    "VolumeSpec",
    "VolumeURL",
    "choose_output_chunks",
    "create_volume",
    "open_spec",
    "open_volume",
    "parse_url",
]
