"""Tests of the synthetic EM volume generator (small seeded volumes, CPU only)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from scipy import ndimage

from volseg.data.synthetic import DOMAINS, DomainStyle, SyntheticVolume, generate_volume
from volseg.errors import ConfigError

SHAPE = (24, 160, 160)


@pytest.fixture(scope="module", params=sorted(DOMAINS))
def volume(request: pytest.FixtureRequest) -> SyntheticVolume:
    return generate_volume(SHAPE, request.param, seed=7)


def _same_look_geometry(look: str, geometry: str) -> DomainStyle:
    """The look of ``look`` with the voxel size and object scale (hence the objects) of ``geometry``."""
    return dataclasses.replace(
        DOMAINS[look],
        voxel_size_nm=DOMAINS[geometry].voxel_size_nm,
        object_scale=DOMAINS[geometry].object_scale,
    )


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_same_seed_gives_same_bytes(domain: str) -> None:
    a = generate_volume((16, 96, 96), domain, seed=3)
    b = generate_volume((16, 96, 96), domain, seed=3)
    assert a.raw.tobytes() == b.raw.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes()
    assert a.centers_zyx.tobytes() == b.centers_zyx.tobytes()


def test_different_seeds_differ() -> None:
    a = generate_volume((16, 96, 96), "tem", seed=3)
    b = generate_volume((16, 96, 96), "tem", seed=4)
    assert not np.array_equal(a.raw, b.raw)
    assert not np.array_equal(a.labels, b.labels)


def test_dtypes_shapes_and_metadata(volume: SyntheticVolume) -> None:
    style = DOMAINS[volume.domain]
    assert volume.raw.shape == volume.labels.shape == SHAPE
    assert volume.raw.dtype == np.uint8
    assert volume.labels.dtype == np.uint32
    assert volume.mito.dtype == np.uint8
    np.testing.assert_array_equal(volume.mito, (volume.labels > 0).astype(np.uint8))
    assert volume.centers_zyx.dtype == np.float64
    assert volume.centers_zyx.shape == (volume.num_instances, 3)
    assert volume.voxel_size_nm == style.voxel_size_nm
    assert volume.raw.std() > 10  # uses the grey range, not a flat image


@pytest.mark.parametrize("domain", sorted(DOMAINS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_foreground_fraction_in_range(domain: str, seed: int) -> None:
    v = generate_volume((32, 128, 128), domain, seed=seed)
    assert 0.05 <= v.mito.mean() <= 0.2
    assert v.num_instances >= 1


def test_instances_are_numbered_connected_and_hold_their_centre(volume: SyntheticVolume) -> None:
    n = volume.num_instances
    assert n >= 2
    np.testing.assert_array_equal(np.unique(volume.labels), np.arange(n + 1))
    structure = np.ones((3, 3, 3), dtype=bool)
    for index, box in enumerate(ndimage.find_objects(volume.labels)):
        label = index + 1
        _, components = ndimage.label(volume.labels[box] == label, structure=structure)
        assert components == 1, f"instance {label} is split into {components} pieces"
        centre = volume.centers_zyx[index]
        assert np.all(centre >= 0) and np.all(centre < np.asarray(SHAPE))
        assert volume.labels[tuple(np.rint(centre).astype(int))] == label


def test_mitochondria_are_darker_than_cytoplasm(volume: SyntheticVolume) -> None:
    mito = volume.labels > 0
    assert volume.raw[mito].mean() < volume.raw[~mito].mean() - 15


def test_look_never_changes_geometry() -> None:
    tem = generate_volume(SHAPE, "tem", seed=5)
    fib_look = generate_volume(SHAPE, _same_look_geometry("fibsem", "tem"), seed=5)
    np.testing.assert_array_equal(tem.labels, fib_look.labels)
    np.testing.assert_array_equal(tem.centers_zyx, fib_look.centers_zyx)
    assert fib_look.domain == "fibsem"


def _background_noise(raw: np.ndarray) -> float:
    """Robust standard deviation of the difference of x-neighbours: noise, barely blurred edges."""
    diff = np.diff(raw.astype(np.float32), axis=2)
    return float(1.4826 * np.median(np.abs(diff - np.median(diff))) / np.sqrt(2))


def test_domains_differ_measurably_on_the_same_objects() -> None:
    tem = generate_volume(SHAPE, "tem", seed=5)
    fib = generate_volume(SHAPE, _same_look_geometry("fibsem", "tem"), seed=5)
    mito = tem.labels > 0
    assert not np.array_equal(tem.raw, fib.raw)

    def contrast(v: SyntheticVolume) -> float:
        return float(v.raw[~mito].mean() - v.raw[mito].mean())

    assert contrast(tem) > 2.0 * contrast(fib)
    assert tem.raw.std() > 1.5 * fib.raw.std()
    assert _background_noise(fib.raw) > 1.5 * _background_noise(tem.raw)


def test_voxel_sizes_differ_and_objects_scale_with_them() -> None:
    tem, fib = DOMAINS["tem"], DOMAINS["fibsem"]
    assert tem.voxel_size_nm != fib.voxel_size_nm
    assert tem.voxel_size_nm[0] > 4 * tem.voxel_size_nm[1]  # serial sections: thick in z
    assert len(set(fib.voxel_size_nm)) == 1  # FIB-SEM: isotropic
    # Same physical extent (1 µm in-plane) at 4 and 8 nm: the same kind of objects, 4x the voxels.
    fine = generate_volume((16, 256, 256), dataclasses.replace(tem, voxel_size_nm=(40.0, 4.0, 4.0)), seed=0)
    coarse = generate_volume((16, 128, 128), dataclasses.replace(tem, voxel_size_nm=(40.0, 8.0, 8.0)), seed=0)

    def mean_instance_voxels(v: SyntheticVolume) -> float:
        return float(np.bincount(v.labels.ravel())[1:].mean())

    assert 2.5 < mean_instance_voxels(fine) / mean_instance_voxels(coarse) < 6.0


def test_pickle_round_trip() -> None:
    v = generate_volume((8, 64, 64), "fibsem", seed=1)
    w = pickle.loads(pickle.dumps(v))
    np.testing.assert_array_equal(w.raw, v.raw)
    np.testing.assert_array_equal(w.labels, v.labels)
    assert w.voxel_size_nm == v.voxel_size_nm and w.domain == v.domain


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape_zyx": (8, 64, 64), "domain": "confocal"}, "Unknown synthetic domain"),
        ({"shape_zyx": (64, 64)}, "not a 3D shape"),
        ({"shape_zyx": (0, 64, 64)}, "not a 3D shape"),
        ({"shape_zyx": (8, 64, 64), "density": 0.9}, "density"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_volume(**kwargs)  # type: ignore[arg-type]


def test_domain_style_rejects_bad_voxel_size() -> None:
    with pytest.raises(ConfigError, match="voxel_size_nm"):
        dataclasses.replace(DOMAINS["tem"], voxel_size_nm=(40.0, 0.0, 4.0))
