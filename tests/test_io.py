"""Tests of volseg.io: URLs, every format in both directions, OME-Zarr, geometry checks and errors.

"Both directions" means: written by volseg and read by the format's own library (zarr-python,
tensorstore, cloud-volume), and written by that library and read by volseg — values compared exactly,
geometry (voxel size, offset, chunks) checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorstore as ts
import zarr

from volseg.errors import (
    AlignmentError,
    GeometryMismatchError,
    OutputExistsError,
    UnsupportedURLError,
    VolsegError,
    VolumeFormatError,
    VolumeNotFoundError,
)
from volseg.geometry import Box
from volseg.io import Volume, choose_output_chunks, create_volume, open_volume, parse_url

SHAPE = (9, 20, 27)  # odd sizes: edge chunks are partial
VOXEL = (40.0, 4.0, 4.5)
OFFSET = (1, 2, 3)
CHUNKS = (4, 8, 16)


def _data(shape: tuple[int, ...], dtype: Any, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (to prove nothing was changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _new(url: str, dtype: Any = "uint16", **kw: Any) -> tuple[Volume, np.ndarray]:
    """Create a volume at ``url``, fill it with seeded data, return both."""
    args: dict[str, Any] = {
        "shape": SHAPE,
        "dtype": dtype,
        "voxel_size_nm": VOXEL,
        "voxel_offset": OFFSET,
        "chunk_shape": CHUNKS,
        **kw,
    }
    vol = create_volume(url, **args)
    data = _data(vol.array_shape(vol.bounds), dtype)
    vol.write(vol.bounds, data)
    return vol, data


def _assert_geometry(vol: Volume, *, chunks: tuple[int, int, int] = CHUNKS) -> None:
    assert vol.shape == SHAPE
    assert vol.voxel_size_nm == pytest.approx(VOXEL)
    assert vol.voxel_offset == OFFSET
    assert vol.chunk_shape == chunks
    assert vol.bounds == Box((0, 0, 0), SHAPE)


# --- URLs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fmt", "kvstore"),
    [
        ("gs://em-bucket/vols/raw", None, {"driver": "gcs", "bucket": "em-bucket", "path": "vols/raw/"}),
        ("zarr3://gs://em-bucket/a/b/", "zarr3", {"driver": "gcs", "bucket": "em-bucket", "path": "a/b/"}),
        (
            "precomputed://gs://em-bucket/seg",
            "precomputed",
            {"driver": "gcs", "bucket": "em-bucket", "path": "seg/"},
        ),
        ("s3://my-bucket/p/q", None, {"driver": "s3", "bucket": "my-bucket", "path": "p/q/"}),
        ("zarr3://s3://my-bucket/p", "zarr3", {"driver": "s3", "bucket": "my-bucket", "path": "p/"}),
        ("n5://s3://my-bucket/x.n5", "n5", {"driver": "s3", "bucket": "my-bucket", "path": "x.n5/"}),
        ("s3://my-bucket/p|zarr2:", "zarr2", {"driver": "s3", "bucket": "my-bucket", "path": "p/"}),
        ("gs://em-bucket", None, {"driver": "gcs", "bucket": "em-bucket", "path": ""}),
    ],
)
def test_cloud_urls_parse_to_valid_tensorstore_specs(url: str, fmt: str | None, kvstore: dict) -> None:
    parsed = parse_url(url)
    assert parsed.format == fmt
    assert parsed.kvstore() == kvstore
    validated = ts.KvStore.Spec(parsed.kvstore()).to_json()
    assert validated == {k: v for k, v in kvstore.items() if v}  # tensorstore drops an empty path
    spec = ts.Spec({"driver": "zarr3", "kvstore": parsed.kvstore()}).to_json()
    assert spec["kvstore"]["bucket"] == kvstore["bucket"]
    assert parse_url(str(parsed)).kvstore() == kvstore  # the canonical form parses back


def test_local_memory_and_http_urls(tmp_path: Path) -> None:
    assert parse_url(str(tmp_path / "v.zarr")).kvstore() == {"driver": "file", "path": f"{tmp_path}/v.zarr/"}
    assert parse_url(f"file://{tmp_path}/v").kvstore() == {"driver": "file", "path": f"{tmp_path}/v/"}
    assert parse_url(f"n5://{tmp_path}/v.n5").format == "n5"
    assert parse_url(f"zarr://file://{tmp_path}/v").format == "zarr"
    assert parse_url("memory://a/b").kvstore() == {"driver": "memory", "path": "a/b/"}
    http = parse_url("precomputed://https://example.org:8080/data/vol")
    assert http.read_only and http.format == "precomputed"
    assert http.kvstore() == {"driver": "http", "base_url": "https://example.org:8080", "path": "/data/vol/"}
    assert ts.KvStore.Spec(http.kvstore()).to_json()["base_url"] == "https://example.org:8080"
    assert parse_url("memory://a/b").child("0").kvstore()["path"] == "a/b/0/"


@pytest.mark.parametrize(("url", "relative"), [
    ("v.zarr", True), ("zarr3://v.zarr", True), ("file://v.zarr", True), ("v.zarr|zarr3:", True),
    ("/data/v.zarr", False), ("zarr3://file:///data/v.zarr", False), ("memory://a/b", False), ("gs://b/p", False),
])
def test_a_volume_written_relative_travels_absolute(url: str, relative: bool, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # What a Ray actor in another working directory is given: relative local paths made absolute here,
    # every other URL in the form the user wrote.
    monkeypatch.chdir(tmp_path)
    parsed = parse_url(url)
    assert parsed.relative is relative
    if relative:
        assert str(parsed).endswith(f"file://{tmp_path}/v.zarr")
        assert parse_url(str(parsed)).kvstore() == {"driver": "file", "path": f"{tmp_path}/v.zarr/"}


@pytest.mark.parametrize(
    "url", ["ftp://host/vol", "zarr4://gs://b/p", "precomputed://ftp://x/y", "gs:///nobucket"]
)
def test_unknown_scheme_or_prefix_is_rejected(url: str) -> None:
    with pytest.raises(UnsupportedURLError) as err:
        open_volume(url)
    message = str(err.value)
    assert "Fix:" in message
    if "bucket" not in message:
        assert "gs://" in message and "precomputed://" in message and "zarr3://" in message


def test_missing_volume_names_url_and_metadata(tmp_path: Path) -> None:
    url = str(tmp_path / "nothing-here")
    with pytest.raises(VolumeNotFoundError) as err:
        open_volume(url)
    assert url in str(err.value)
    for key in ("zarr.json", ".zarray", "attributes.json", "info"):
        assert key in str(err.value)
    with pytest.raises(VolumeNotFoundError, match="info"):
        open_volume(f"precomputed://{url}")


# --- zarr -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "kw", "zarr_format"),
    [
        ("zarr2://", {}, 2),
        ("zarr3://", {}, 3),
        ("", {"shard_shape": (8, 16, 32)}, 3),
        ("zarr://", {"num_channels": 3}, 3),
        ("zarr2://", {"num_channels": 2}, 2),
    ],
)
def test_zarr_written_by_volseg_reads_with_zarr_python(
    tmp_path: Path, prefix: str, kw: dict, zarr_format: int
) -> None:
    path = tmp_path / "out.zarr"
    vol, data = _new(f"{prefix}{path}", **kw)
    assert vol.format == f"zarr{zarr_format}" and vol.ome_version == ("0.5" if zarr_format == 3 else "0.4")
    group = zarr.open_group(str(path), mode="r")
    array = group["0"]
    channels = () if "num_channels" not in kw else (kw["num_channels"],)
    assert array.shape == (*channels, *SHAPE)
    assert array.chunks == (*channels, *CHUNKS)
    if "shard_shape" in kw:
        assert array.shards == kw["shard_shape"]
        assert vol.write_chunk == kw["shard_shape"] and vol.shard_shape == kw["shard_shape"]
    else:
        assert vol.write_chunk == CHUNKS and vol.shard_shape is None
    np.testing.assert_array_equal(array[...], data)
    attrs = group.attrs.asdict()
    multiscale = (attrs["ome"] if zarr_format == 3 else attrs)["multiscales"][0]
    names = [a["name"] for a in multiscale["axes"]]
    assert names == (["c"] if channels else []) + ["z", "y", "x"]
    transforms = multiscale["datasets"][0]["coordinateTransformations"]
    assert transforms[0]["scale"][-3:] == list(VOXEL)
    assert transforms[1]["translation"][-3:] == [o * v for o, v in zip(OFFSET, VOXEL, strict=True)]
    if zarr_format == 3:
        assert array.metadata.dimension_names == (("c",) if channels else ()) + ("z", "y", "x")
    reopened = open_volume(str(path))
    _assert_geometry(reopened)
    assert reopened.num_channels == kw.get("num_channels") and reopened.shard_shape == kw.get("shard_shape")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_plain_zarr_array_written_by_zarr_python_reads_with_volseg(tmp_path: Path, zarr_format: int) -> None:
    data = _data(SHAPE, "float32")
    path = tmp_path / "plain.zarr"
    shards = (8, 16, 32) if zarr_format == 3 else None
    array = zarr.create_array(
        str(path),
        shape=SHAPE,
        chunks=CHUNKS,
        shards=shards,
        dtype="float32",
        zarr_format=zarr_format,
        attributes={"resolution": list(VOXEL), "voxel_offset": list(OFFSET)},
    )
    array[...] = data
    vol = open_volume(str(path))
    assert vol.format == f"zarr{zarr_format}" and vol.ome_version is None
    _assert_geometry(vol)
    assert vol.shard_shape == shards
    np.testing.assert_array_equal(vol.read(vol.bounds), data)
    box = Box((2, 3, 5), (7, 19, 26))
    np.testing.assert_array_equal(vol.read(box), data[box.slices])


def test_plain_zarr_defaults_and_funlib_offset(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "a.zarr"), shape=SHAPE, chunks=CHUNKS, dtype="uint8")
    vol = open_volume(str(tmp_path / "a.zarr"))
    assert vol.voxel_size_nm == (1.0, 1.0, 1.0) and vol.voxel_offset == (0, 0, 0)
    attributes = {"voxel_size": [40, 8, 8], "offset": [400, 80, 16]}  # funlib: offset in nm
    zarr.create_array(
        str(tmp_path / "b.zarr"), shape=SHAPE, chunks=CHUNKS, dtype="uint8", attributes=attributes
    )
    vol = open_volume(str(tmp_path / "b.zarr"))
    assert vol.voxel_size_nm == (40.0, 8.0, 8.0) and vol.voxel_offset == (10, 10, 2)


def _write_ome(path: Path, zarr_format: int, axes: list[str], levels: list[np.ndarray], unit: str) -> None:
    """A multiscale OME-Zarr image written with zarr-python and hand-written metadata (level i at "i")."""
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    datasets = []
    for i, level in enumerate(levels):
        chunks = (1,) * (level.ndim - 3) + (4, 8, 8)
        array = group.create_array(str(i), shape=level.shape, chunks=chunks, dtype=level.dtype)
        array[...] = level
        factor = 2.0**i
        lead = [1.0] * (len(axes) - 3)  # non-spatial axes
        scale = [*lead, 0.04 * factor, 0.004 * factor, 0.004 * factor]  # micrometres
        datasets.append(
            {
                "path": str(i),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": [*lead, 0.4, 0.4, 0.8]},
                ],
            }
        )
    kinds = {"c": "channel", "t": "time"}
    image = {
        "name": "img",
        "axes": [
            {"name": a, "type": kinds.get(a, "space"), **({"unit": unit} if a in "zyx" else {})} for a in axes
        ],
        "datasets": datasets,
    }
    if zarr_format == 2:
        group.attrs["multiscales"] = [{"version": "0.4", **image}]
    else:
        group.attrs["ome"] = {"version": "0.5", "multiscales": [image]}


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_ome_zarr_multiscale_scale_1_doubles_voxel_size(tmp_path: Path, zarr_format: int) -> None:
    full = _data((8, 16, 16), "uint8")
    half = full[::2, ::2, ::2].copy()
    path = tmp_path / "ome.zarr"
    _write_ome(path, zarr_format, ["z", "y", "x"], [full, half], "micrometer")
    vol0 = open_volume(str(path))
    vol1 = open_volume(str(path), scale=1)
    assert vol0.ome_version == ("0.4" if zarr_format == 2 else "0.5")
    assert vol0.voxel_size_nm == pytest.approx((40.0, 4.0, 4.0))
    assert vol1.voxel_size_nm == pytest.approx((80.0, 8.0, 8.0))
    assert vol0.voxel_offset == (10, 100, 200) and vol1.voxel_offset == (5, 50, 100)
    assert vol1.shape == (4, 8, 8) and vol1.scale == 1
    np.testing.assert_array_equal(vol1.read(vol1.bounds), half)
    np.testing.assert_array_equal(vol0.read(vol0.bounds), full)
    with pytest.raises(VolumeFormatError, match=r"0\.\.1"):
        open_volume(str(path), scale=2)


def test_ome_zarr_with_channels(tmp_path: Path) -> None:
    data = _data((2, 8, 16, 16), "uint16")
    _write_ome(tmp_path / "c.zarr", 3, ["c", "z", "y", "x"], [data], "nanometer")
    vol = open_volume(str(tmp_path / "c.zarr"))
    assert vol.num_channels == 2 and vol.shape == (8, 16, 16)
    assert vol.voxel_size_nm == pytest.approx((0.04, 0.004, 0.004))
    box = Box((1, 2, 3), (5, 9, 16))
    np.testing.assert_array_equal(vol.read(box), data[(slice(None), *box.slices)])


@pytest.mark.parametrize(
    ("axes", "zarr_format"), [(["x", "y", "z"], 2), (["z", "x", "y"], 3), (["t", "z", "y", "x"], 3)]
)
def test_ome_zarr_in_another_axis_order_is_rejected(
    tmp_path: Path, axes: list[str], zarr_format: int
) -> None:
    _write_ome(tmp_path / "bad.zarr", zarr_format, axes, [_data((2,) * len(axes), "uint8")], "nanometer")
    with pytest.raises(VolumeFormatError) as err:
        open_volume(str(tmp_path / "bad.zarr"))
    assert str(axes) in str(err.value) and "['z', 'y', 'x']" in str(err.value)


def test_zarr3_dimension_names_in_another_order_are_rejected(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "a"), shape=(2, 3, 4), dtype="uint8", dimension_names=["x", "y", "z"])
    with pytest.raises(VolumeFormatError, match=r"\['z', 'y', 'x'\]"):
        open_volume(str(tmp_path / "a"))


@pytest.mark.parametrize("shape", [(16, 16), (1, 2, 3, 4, 5)])
def test_wrong_rank_is_rejected(tmp_path: Path, shape: tuple[int, ...]) -> None:
    zarr.create_array(str(tmp_path / "a"), shape=shape, dtype="uint8")
    with pytest.raises(VolumeFormatError) as err:
        open_volume(str(tmp_path / "a"))
    assert f"{len(shape)}-dimensional" in str(err.value) and "(z, y, x)" in str(err.value)


def test_zarr_group_without_multiscales_is_rejected(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(VolumeFormatError, match="multiscales"):
        open_volume(str(tmp_path / "g"))


# --- N5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_channels", [None, 2])
def test_n5_written_by_volseg_reads_with_tensorstore(tmp_path: Path, num_channels: int | None) -> None:
    path = tmp_path / "out.n5"
    vol, data = _new(str(path), num_channels=num_channels)
    assert vol.format == "n5"
    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}}).result()
    # N5 lists dimensions fastest first: tensorstore sees x, y, z (, c) = volseg's array transposed.
    np.testing.assert_array_equal(store.read().result(), data.T)
    attrs = json.loads((path / "attributes.json").read_text())
    assert attrs["resolution"][:3] == list(VOXEL[::-1]) and attrs["voxel_offset"] == list(OFFSET[::-1])
    assert attrs["blockSize"][:3] == list(CHUNKS[::-1])
    reopened = open_volume(str(path))
    _assert_geometry(reopened)
    assert reopened.num_channels == num_channels


def test_n5_written_by_tensorstore_reads_with_volseg(tmp_path: Path) -> None:
    data_xyz = _data(SHAPE[::-1], "uint64")
    metadata = {
        "dimensions": list(SHAPE[::-1]),
        "blockSize": list(CHUNKS[::-1]),
        "dataType": "uint64",
        "compression": {"type": "gzip"},
        "pixelResolution": {"dimensions": [0.0045, 0.004, 0.04], "unit": "um"},
    }
    store = ts.open(
        {"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "a.n5")}, "metadata": metadata},
        create=True,
    ).result()
    store.write(data_xyz).result()
    vol = open_volume(f"n5://{tmp_path}/a.n5")
    assert vol.shape == SHAPE and vol.chunk_shape == CHUNKS and vol.dtype == np.uint64
    assert vol.voxel_size_nm == pytest.approx(VOXEL)
    np.testing.assert_array_equal(vol.read(vol.bounds), data_xyz.T)


def test_n5_multiscale_group(tmp_path: Path) -> None:
    root = tmp_path / "ms.n5"
    levels = [_data((8, 8, 8), "uint8"), _data((4, 4, 4), "uint8", seed=1)]
    for i, level in enumerate(levels):
        meta = {
            "dimensions": [level.shape[0]] * 3,
            "blockSize": [4, 4, 4],
            "dataType": "uint8",
            "compression": {"type": "raw"},
        }
        kv = {"driver": "file", "path": str(root / f"s{i}")}
        ts.open({"driver": "n5", "kvstore": kv, "metadata": meta}, create=True).result().write(
            level.T
        ).result()
    (root / "attributes.json").write_text(
        json.dumps({"resolution": [4, 4, 40], "scales": [[1, 1, 1], [2, 2, 2]]})
    )
    vol = open_volume(str(root), scale=1)
    assert vol.voxel_size_nm == pytest.approx((80.0, 8.0, 8.0))
    np.testing.assert_array_equal(vol.read(vol.bounds), levels[1])


# --- precomputed --------------------------------------------------------------------------------------


def test_precomputed_written_by_volseg_reads_with_tensorstore_and_cloudvolume(tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    vol, data = _new(f"precomputed://{tmp_path}/img", dtype="uint8")
    assert vol.format == "precomputed" and vol.kind == "image"
    info = json.loads((tmp_path / "img" / "info").read_text())
    scale = info["scales"][0]
    assert scale["encoding"] == "raw" and scale["resolution"] == list(VOXEL[::-1])
    assert scale["voxel_offset"] == list(OFFSET[::-1]) and scale["chunk_sizes"] == [list(CHUNKS[::-1])]
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/img/"}).result()
    assert list(store.domain.inclusive_min) == [*OFFSET[::-1], 0]
    np.testing.assert_array_equal(store.read().result()[..., 0], data.T)
    cv = CloudVolume(f"file://{tmp_path}/img", progress=False)
    np.testing.assert_array_equal(np.asarray(cv[cv.bounds])[..., 0], data.T)
    _assert_geometry(open_volume(str(tmp_path / "img")))


def _cloudvolume_write(path: Path, data: np.ndarray, compress: bool | None) -> None:
    from cloudvolume import CloudVolume

    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="image",
        data_type=data.dtype.name,
        encoding="raw",
        resolution=list(VOXEL[::-1]),
        voxel_offset=list(OFFSET[::-1]),
        volume_size=list(SHAPE[::-1]),
        chunk_size=list(CHUNKS[::-1]),
    )
    cv = CloudVolume(f"file://{path}", info=info, progress=False, compress=compress)
    cv.commit_info()
    cv[cv.bounds] = data.T


def test_precomputed_written_by_cloudvolume_reads_with_both_backends(tmp_path: Path) -> None:
    data = _data(SHAPE, "uint16")
    _cloudvolume_write(tmp_path / "cv", data, compress=False)
    box = Box((1, 2, 3), (8, 19, 26))
    for backend in ("tensorstore", "cloudvolume"):
        vol = open_volume(f"precomputed://file://{tmp_path}/cv", backend=backend)  # type: ignore[arg-type]
        assert vol.backend == backend
        _assert_geometry(vol)
        np.testing.assert_array_equal(vol.read(vol.bounds), data)
        np.testing.assert_array_equal(vol.read_async(box).result(), data[box.slices])


def test_cloudvolume_gzipped_chunk_files_open_with_cloudvolume(tmp_path: Path) -> None:
    data = _data(SHAPE, "uint8")
    _cloudvolume_write(tmp_path / "gz", data, compress=None)  # cloud-volume's default: <chunk>.gz on disk
    assert any(p.suffix == ".gz" for p in (tmp_path / "gz").rglob("*"))
    vol = open_volume(str(tmp_path / "gz"))
    assert vol.backend == "cloudvolume"
    np.testing.assert_array_equal(vol.read(vol.bounds), data)
    with pytest.raises(VolumeFormatError, match="gzipped"):
        open_volume(str(tmp_path / "gz"), backend="tensorstore")


def test_cloudvolume_backend_writes_precomputed(tmp_path: Path) -> None:
    create_volume(
        f"precomputed://{tmp_path}/w",
        shape=SHAPE,
        dtype="uint8",
        voxel_size_nm=VOXEL,
        voxel_offset=OFFSET,
        chunk_shape=CHUNKS,
        num_channels=2,
    )
    vol = open_volume(f"precomputed://{tmp_path}/w", "r+", backend="cloudvolume")
    data = _data((2, *SHAPE), "uint8")
    vol.write(vol.bounds, data)
    patch = Box((4, 8, 16), (8, 16, 27))  # chunk-aligned, reaching the volume edge in x
    vol.write_async(patch, np.full((2, *patch.shape), 7, np.uint8)).result()
    data[(slice(None), *patch.slices)] = 7
    np.testing.assert_array_equal(open_volume(f"precomputed://{tmp_path}/w").read(vol.bounds), data)
    vol.update_attributes({"signature": "abc"})
    assert open_volume(str(tmp_path / "w")).attributes == {"signature": "abc"}


def test_compressed_segmentation_uint64_labels_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ids = np.array([0, 1, 2**33 + 5, 2**63 + 17, 123456789012], dtype=np.uint64)
    labels = ids[rng.integers(0, len(ids), size=SHAPE)]
    vol = create_volume(
        f"precomputed://{tmp_path}/seg",
        shape=SHAPE,
        dtype=np.uint64,
        voxel_size_nm=VOXEL,
        chunk_shape=CHUNKS,
        kind="segmentation",
    )
    vol.write(vol.bounds, labels)
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert info["type"] == "segmentation"
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    back = open_volume(f"{tmp_path}/seg")
    assert back.kind == "segmentation" and back.dtype == np.uint64
    np.testing.assert_array_equal(back.read(back.bounds), labels)
    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/seg/"}).result()
    np.testing.assert_array_equal(store.read().result()[..., 0], labels.T)


def test_precomputed_written_by_tensorstore_reads_with_volseg(tmp_path: Path) -> None:
    data = _data(SHAPE, "float32")
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": f"file://{tmp_path}/f/",
            "multiscale_metadata": {"type": "image", "data_type": "float32", "num_channels": 1},
            "scale_metadata": {
                "size": list(SHAPE[::-1]),
                "voxel_offset": list(OFFSET[::-1]),
                "resolution": list(VOXEL[::-1]),
                "chunk_size": list(CHUNKS[::-1]),
                "encoding": "raw",
            },
        },
        create=True,
    ).result()
    store[..., 0].write(data.T).result()
    vol = open_volume(f"precomputed://{tmp_path}/f")
    _assert_geometry(vol)
    np.testing.assert_array_equal(vol.read(vol.bounds), data)


# --- all formats -------------------------------------------------------------------------------------

FORMAT_URLS = {
    "zarr2": "zarr2://{d}/v",
    "zarr3": "{d}/v.zarr",
    "n5": "{d}/v.n5",
    "precomputed": "precomputed://file://{d}/v",
}


@pytest.mark.parametrize("fmt", FORMAT_URLS)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64", "float32", "int16"])
def test_dtypes_round_trip(tmp_path: Path, fmt: str, dtype: str) -> None:
    url = FORMAT_URLS[fmt].format(d=tmp_path)
    _, data = _new(url, dtype=dtype)
    back = open_volume(url)
    assert back.format == fmt and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.read(back.bounds), data)


def test_memory_volume_round_trip_across_opens() -> None:
    url = "memory://test_io/roundtrip"
    _, data = _new(url, dtype="uint32", attributes={"run": 1})
    again = open_volume(url)
    _assert_geometry(again)
    assert again.format == "zarr3" and again.attributes == {"run": 1}
    np.testing.assert_array_equal(again.read(again.bounds), data)
    reused = create_volume(
        url, shape=SHAPE, dtype="uint32", voxel_size_nm=VOXEL, voxel_offset=OFFSET, chunk_shape=CHUNKS
    )
    np.testing.assert_array_equal(reused.read(reused.bounds), data)


@pytest.mark.parametrize("fmt", FORMAT_URLS)
def test_partial_writes_keep_neighbouring_voxels(tmp_path: Path, fmt: str) -> None:
    vol, data = _new(FORMAT_URLS[fmt].format(d=tmp_path))
    box = Box((3, 5, 7), (6, 13, 20))  # not chunk-aligned
    patch = _data(box.shape, "uint16", seed=9)
    vol.write(box, patch)
    data[box.slices] = patch
    np.testing.assert_array_equal(vol.read(vol.bounds), data)
    assert vol.read(Box((2, 2, 2), (2, 5, 9))).shape == (0, 3, 7)


# --- create: reuse, geometry mismatch ------------------------------------------------------------------


SAME = {
    "shape": SHAPE,
    "dtype": "uint16",
    "voxel_size_nm": VOXEL,
    "voxel_offset": OFFSET,
    "chunk_shape": CHUNKS,
}


@pytest.mark.parametrize("fmt", FORMAT_URLS)
def test_create_over_existing_with_other_geometry_changes_nothing(tmp_path: Path, fmt: str) -> None:
    url = FORMAT_URLS[fmt].format(d=tmp_path)
    _, data = _new(url, attributes={"signature": "s1"})
    before = _tree_digest(tmp_path)
    with pytest.raises(GeometryMismatchError) as err:
        create_volume(url, **{**SAME, "shape": (9, 20, 28), "dtype": "uint8", "voxel_size_nm": (30, 4, 4.5)})
    message = str(err.value)
    assert "shape: given (9, 20, 28), existing (9, 20, 27)" in message
    assert "dtype: given uint8, existing uint16" in message
    assert "voxel_size_nm: given (30, 4, 4.5), existing (40, 4, 4.5)" in message
    assert "another output path" in message and "chunk_shape" not in message
    with pytest.raises(
        GeometryMismatchError, match=r"chunk_shape: given \(8, 8, 16\), existing \(4, 8, 16\)"
    ):
        create_volume(url, **{**SAME, "chunk_shape": (8, 8, 16)})
    with pytest.raises(GeometryMismatchError, match=r"voxel_offset: given \(0, 0, 0\), existing \(1, 2, 3\)"):
        create_volume(url, **{**SAME, "voxel_offset": (0, 0, 0)})
    with pytest.raises(OutputExistsError):
        create_volume(url, **SAME, exist_ok=False)
    same = create_volume(url, **SAME, attributes={"signature": "s2"})
    assert _tree_digest(tmp_path) == before
    assert same.attributes == {"signature": "s1"}
    np.testing.assert_array_equal(same.read(same.bounds), data)


def test_create_with_another_format_over_existing_is_a_mismatch(tmp_path: Path) -> None:
    _new(f"zarr2://{tmp_path}/v")
    before = _tree_digest(tmp_path)
    with pytest.raises(GeometryMismatchError, match="format: given zarr3, existing zarr2"):
        create_volume(f"zarr3://{tmp_path}/v", **SAME)
    with pytest.raises(GeometryMismatchError, match="num_channels: given 2, existing None"):
        create_volume(f"{tmp_path}/v", **SAME, num_channels=2)
    assert _tree_digest(tmp_path) == before


def test_create_validates_request(tmp_path: Path) -> None:
    common: dict[str, Any] = {"shape": SHAPE, "voxel_size_nm": VOXEL}
    with pytest.raises(AlignmentError, match="axis y"):
        create_volume(
            f"{tmp_path}/a", dtype="uint8", chunk_shape=(4, 8, 8), shard_shape=(8, 12, 16), **common
        )
    with pytest.raises(VolumeFormatError, match="zarr v3"):
        create_volume(
            f"{tmp_path}/b.n5", dtype="uint8", chunk_shape=(4, 8, 8), shard_shape=(8, 8, 8), **common
        )
    with pytest.raises(VolumeFormatError, match="cannot store dtype float64"):
        create_volume(f"precomputed://{tmp_path}/c", dtype="float64", **common)
    with pytest.raises(VolumeFormatError, match="contradicts"):
        create_volume(f"n5://{tmp_path}/d", dtype="uint8", format="zarr3", **common)
    with pytest.raises(UnsupportedURLError, match="read-only"):
        create_volume("http://127.0.0.1:9/x", dtype="uint8", **common)
    with pytest.raises(VolumeFormatError, match="owns"):
        create_volume(f"{tmp_path}/e", dtype="uint8", attributes={"multiscales": []}, **common)
    assert not any(tmp_path.iterdir())


def test_default_chunks_follow_the_documented_rule() -> None:
    assert choose_output_chunks((1000, 4000, 4000), np.uint8) == (32, 256, 256)
    assert choose_output_chunks((1000, 4000, 4000), np.float32) == (16, 256, 256)
    assert choose_output_chunks((1000, 4000, 4000), np.uint64) == (16, 128, 128)
    assert choose_output_chunks((10, 100, 4000), np.uint8) == (10, 100, 256)
    assert choose_output_chunks((1000, 4000, 4000), np.uint8, input_chunk_zyx=(20, 96, 512)) == (20, 192, 256)
    with pytest.raises(VolumeFormatError):
        choose_output_chunks((10, 10), np.uint8)
    vol = create_volume(
        "memory://test_io/default_chunks", shape=(40, 300, 300), dtype="float32", voxel_size_nm=VOXEL
    )
    assert vol.chunk_shape == (16, 256, 256)


# --- the Volume API --------------------------------------------------------------------------------


def test_write_refuses_wrong_dtype_shape_mode_and_bounds(tmp_path: Path) -> None:
    vol, data = _new(f"{tmp_path}/v")
    box = Box((0, 0, 0), (2, 3, 4))
    with pytest.raises(VolumeFormatError, match=r"Cannot write float32 data .* stores uint16"):
        vol.write(box, np.zeros(box.shape, np.float32))
    with pytest.raises(VolumeFormatError, match=r"shape \(2, 3, 5\).*expected shape \(2, 3, 4\)"):
        vol.write(box, np.zeros((2, 3, 5), np.uint16))
    with pytest.raises(VolumeFormatError, match="read-only"):
        open_volume(f"{tmp_path}/v").write(box, np.zeros(box.shape, np.uint16))
    outside = Box((5, 0, 0), (10, 4, 4))
    with pytest.raises(GeometryMismatchError) as err:
        vol.write(outside, np.zeros(outside.shape, np.uint16))
    assert "[5:10, 0:4, 0:4)" in str(err.value) and "[0:9, 0:20, 0:27)" in str(err.value)
    with pytest.raises(GeometryMismatchError, match=r"\[-1:2, 0:4, 0:4\).*bounds \[0:9, 0:20, 0:27\)"):
        vol.read(Box((-1, 0, 0), (2, 4, 4)))
    with pytest.raises(GeometryMismatchError, match="2 axes"):
        vol.read(Box((0, 0), (2, 2)))
    np.testing.assert_array_equal(vol.read(vol.bounds), data)


def test_attributes_are_merged_atomically_and_reserved_keys_refused(tmp_path: Path) -> None:
    vol, _ = _new(f"{tmp_path}/v", attributes={"a": 1})

    def mark(i: int) -> None:
        vol.update_attributes({f"done/{i}": True})

    threads = [threading.Thread(target=mark, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    attrs = open_volume(f"{tmp_path}/v").attributes
    assert attrs == {"a": 1, **{f"done/{i}": True for i in range(16)}}
    with pytest.raises(VolumeFormatError, match="ome"):
        vol.update_attributes({"ome": {}})
    with pytest.raises(VolumeFormatError, match="JSON"):
        vol.update_attributes({"x": object()})
    with pytest.raises(VolumeFormatError, match="read-only"):
        open_volume(f"{tmp_path}/v").update_attributes({"b": 2})
    assert zarr.open_group(f"{tmp_path}/v", mode="r").attrs["ome"]["version"] == "0.5"


def test_volume_pickles_as_its_spec(tmp_path: Path) -> None:
    vol, data = _new(f"zarr2://{tmp_path}/v")
    clone = pickle.loads(pickle.dumps(vol))
    assert clone.url == vol.url and clone.writable and clone.format == "zarr2"
    assert clone.geometry == vol.geometry
    np.testing.assert_array_equal(clone.read(clone.bounds), data)


def test_async_reads_and_writes(tmp_path: Path) -> None:
    vol = create_volume(
        f"{tmp_path}/v", shape=(8, 32, 32), dtype="uint8", voxel_size_nm=VOXEL, chunk_shape=(4, 16, 16)
    )
    boxes = [Box((z, y, x), (z + 4, y + 16, x + 16)) for z in (0, 4) for y in (0, 16) for x in (0, 16)]
    futures = [vol.write_async(b, np.full(b.shape, i + 1, np.uint8)) for i, b in enumerate(boxes)]
    for f in futures:
        assert f.result() is None
    reads = [vol.read_async(b) for b in boxes]
    for i, f in enumerate(reads):
        np.testing.assert_array_equal(f.result(), np.full((4, 16, 16), i + 1, np.uint8))
    assert sorted(os.listdir(tmp_path / "v" / "0" / "c" / "0" / "0")) == ["0", "1"]


@pytest.mark.parametrize("backend", ["tensorstore", "cloudvolume"])
def test_a_write_keeps_the_values_given_unless_the_array_is_handed_over(tmp_path: Path, backend: str) -> None:
    create_volume(f"precomputed://{tmp_path}/w", shape=SHAPE, dtype="uint8", voxel_size_nm=VOXEL,
                  chunk_shape=CHUNKS)
    vol = open_volume(f"precomputed://{tmp_path}/w", "r+", backend=backend)  # type: ignore[arg-type]
    data = _data(SHAPE, "uint8")
    pending = vol.write_async(vol.bounds, data)
    data_given = data.copy()
    data[:] = 0  # the caller reuses its array at once: the write must still store what was given
    pending.result()
    np.testing.assert_array_equal(vol.read(vol.bounds), data_given)
    handed = _data(SHAPE, "uint8")[::-1].copy()
    vol.write_async(vol.bounds, handed, handover=True).result()
    np.testing.assert_array_equal(vol.read(vol.bounds), handed)


def test_errors_are_volseg_errors() -> None:
    for cls in (VolumeNotFoundError, VolumeFormatError, GeometryMismatchError, UnsupportedURLError):
        assert issubclass(cls, VolsegError)


def test_plain_array_inherits_the_voxel_size_of_its_group(tmp_path):
    group = zarr.open_group(str(tmp_path / "ds.zarr"), mode="w", zarr_format=3)
    group.attrs["voxel_size_nm_zyx"] = [50.0, 4.6, 4.6]
    group.create_array("raw", shape=(2, 8, 8), dtype="uint8", chunks=(1, 8, 8))
    own = group.create_array("own", shape=(2, 8, 8), dtype="uint8", chunks=(1, 8, 8))
    own.attrs["resolution"] = [40, 4, 4]
    assert open_volume(str(tmp_path / "ds.zarr/raw")).voxel_size_nm == (50.0, 4.6, 4.6)
    assert open_volume(str(tmp_path / "ds.zarr/own")).voxel_size_nm == (40.0, 4.0, 4.0)


@pytest.mark.parametrize("prefix", ["", "zarr2://"])
def test_outputs_in_a_zarr_container_are_ome_images_and_labels(tmp_path: Path, prefix: str) -> None:
    """The container is a zarr group listing its images; a segmentation is an NGFF label image, and one in
    ``<image>/labels/<name>`` is listed by that image's labels group: ome-zarr-py reads them so."""
    from ome_zarr.io import parse_url as ome_url
    from ome_zarr.reader import Reader

    base = tmp_path / "prediction.zarr"
    create_volume(f"{prefix}{base}/probabilities", shape=(4, 32, 32), dtype="uint8", voxel_size_nm=(30, 8, 8))
    instances = create_volume(f"{prefix}{base}/instances", shape=(4, 32, 32), dtype="uint64",
                              voxel_size_nm=(30, 8, 8), kind="segmentation")
    create_volume(f"{prefix}{base}/probabilities/labels/cells", shape=(4, 32, 32), dtype="uint32",
                  voxel_size_nm=(30, 8, 8), kind="segmentation")
    labels = np.zeros((4, 32, 32), np.uint64)
    labels[1:3, 5:20, 5:20] = 7
    instances.write(instances.bounds, labels)

    assert sorted(zarr.open_group(str(base), mode="r").keys()) == ["instances", "probabilities"]
    (node,) = Reader(ome_url(str(base / "instances")))()
    assert [type(spec).__name__ for spec in node.specs] == ["Label", "Multiscales"]
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    nodes = list(Reader(ome_url(str(base / "probabilities")))())
    assert [type(n.specs[0]).__name__ for n in nodes] == ["Multiscales", "Labels", "Label"]
    assert nodes[2].metadata["name"] == "cells"
    assert open_volume(f"{base}/instances").shape == (4, 32, 32)  # volseg opens them as before
