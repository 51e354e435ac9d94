"""Reading volumes over real HTTP from a loopback server (read-only storage)."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from volseg.errors import UnsupportedURLError, VolumeNotFoundError
from volseg.geometry import Box
from volseg.io import create_volume, open_volume

SHAPE = (9, 20, 27)
VOXEL = (40.0, 4.0, 4.5)
OFFSET = (1, 2, 3)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the default backlog of 5 stalls tensorstore's parallel requests for 1 s


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """A directory served by a ThreadingHTTPServer on 127.0.0.1 (ephemeral port) and its base URL."""
    root = tmp_path_factory.mktemp("www")
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _write(url: str, dtype: str, **kw: object) -> np.ndarray:
    vol = create_volume(
        url, shape=SHAPE, dtype=dtype, voxel_size_nm=VOXEL, voxel_offset=OFFSET, chunk_shape=(4, 8, 16), **kw
    )  # type: ignore[arg-type]
    data = np.random.default_rng(5).integers(0, 2**31, size=vol.array_shape(vol.bounds)).astype(dtype)
    vol.write(vol.bounds, data)
    return data


def test_precomputed_over_http(served: tuple[Path, str]) -> None:
    root, base = served
    data = _write(f"precomputed://{root}/vol", "uint16")
    vol = open_volume(f"precomputed://{base}/vol")
    assert vol.format == "precomputed" and not vol.writable
    assert vol.shape == SHAPE and vol.voxel_size_nm == VOXEL and vol.voxel_offset == OFFSET
    np.testing.assert_array_equal(vol.read(vol.bounds), data)
    box = Box((2, 3, 4), (9, 17, 25))
    np.testing.assert_array_equal(vol.read(box), data[box.slices])
    probed = open_volume(f"{base}/vol")  # no prefix: the format is found by probing over HTTP
    assert probed.format == "precomputed"
    np.testing.assert_array_equal(probed.read(box), data[box.slices])


def test_compressed_segmentation_over_http_with_both_backends(served: tuple[Path, str]) -> None:
    root, base = served
    labels = _write(f"precomputed://{root}/seg", "uint64", kind="segmentation")
    for backend in ("tensorstore", "cloudvolume"):
        vol = open_volume(f"precomputed://{base}/seg", backend=backend)  # type: ignore[arg-type]
        assert vol.backend == backend and vol.kind == "segmentation"
        np.testing.assert_array_equal(vol.read(vol.bounds), labels)


def test_cloudvolume_reads_volseg_output_over_http(served: tuple[Path, str]) -> None:
    from cloudvolume import CloudVolume

    root, base = served
    data = _write(f"precomputed://{root}/cvread", "uint8")
    cv = CloudVolume(f"precomputed://{base}/cvread", progress=False, cache=False)
    np.testing.assert_array_equal(np.asarray(cv[cv.bounds])[..., 0], data.T)


def test_ome_zarr_over_http(served: tuple[Path, str]) -> None:
    root, base = served
    data = _write(f"{root}/img.zarr", "float32")
    vol = open_volume(f"{base}/img.zarr")
    assert vol.format == "zarr3" and vol.ome_version == "0.5" and vol.voxel_offset == OFFSET
    np.testing.assert_array_equal(vol.read(vol.bounds), data)


def test_http_is_read_only_and_missing_is_reported(served: tuple[Path, str]) -> None:
    root, base = served
    _write(f"precomputed://{root}/ro", "uint8")
    with pytest.raises(UnsupportedURLError, match="read-only"):
        open_volume(f"precomputed://{base}/ro", "r+")
    with pytest.raises(VolumeNotFoundError, match="info"):
        open_volume(f"precomputed://{base}/absent")
