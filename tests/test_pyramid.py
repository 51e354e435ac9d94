"""Multiscale outputs (``output.levels``): each level is the one below downsampled blockwise, equal to
downsampling the whole level; OME-Zarr multiscales and precomputed scales that readers open."""

from __future__ import annotations

import json

import numpy as np
import tensorstore as ts
import zarr

from tests.conftest import write_config
from volseg.cli import main
from volseg.commands.run import run
from volseg.config import parse_config
from volseg.engine.serial import SerialExecutor
from volseg.geometry import Box
from volseg.inference.pyramid import build_pyramid
from volseg.io import create_volume, open_volume
from volseg.io.pyramid import level_factors


def test_factors_make_voxels_isotropic_first() -> None:
    assert level_factors((30, 8, 8), 5) == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert level_factors((5, 5, 5), 3) == [(2, 2, 2), (2, 2, 2)]
    assert level_factors((8, 8, 40), 2) == [(2, 2, 1)]


def _whole(volume, factor, method) -> np.ndarray:
    return ts.downsample(ts.array(volume.read(volume.bounds)), list(factor), method).read().result()


def test_volseg_run_writes_levels_equal_to_downsampling_whole_levels(run_config, tmp_path) -> None:
    config = run_config(instances={"url": f"precomputed://{tmp_path}/instances_pc", "method": "connected_components"})
    config["output"] = {**config["output"], "dtype": "uint8", "levels": 3, "chunk": [2, 8, 8]}
    config["execution"] = {"block": [4, 16, 24], "executor": "serial"}
    result = run(parse_config(config), progress=False)
    assert not result.failed
    names = [p.name for p in result.passes]
    assert names[-6:] == [f"pyramid-{n}-{k}" for n in ("probabilities", "density", "instances") for k in (1, 2)]

    for url, method in ((config["output"]["probabilities"], "mean"), (config["output"]["density"], "mean"),
                        (config["instances"]["url"], "mode")):
        below = open_volume(url)
        for level, factor in enumerate(level_factors(below.voxel_size_nm, 3), start=1):
            volume = open_volume(url, scale=level)
            assert volume.shape == tuple(-(-s // f) for s, f in zip(below.shape, factor, strict=True))
            assert volume.voxel_size_nm == tuple(v * f for v, f in zip(below.voxel_size_nm, factor, strict=True))
            np.testing.assert_array_equal(volume.read(volume.bounds), _whole(below, factor, method))
            below = volume
    info = json.loads((tmp_path / "instances_pc" / "info").read_text())  # the scales kept the properties
    assert len(info["scales"]) == 3 and info["segment_properties"] == "segment_properties"
    assert (tmp_path / "instances_pc" / "segment_properties" / "info").is_file()
    group = zarr.open_group(config["output"]["probabilities"], mode="r")
    assert [d["path"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]] == ["0", "1", "2"]

    again = run(parse_config(config), progress=False)  # everything resumes, nothing is recomputed
    assert all(p.stats.blocks_done == 0 for p in again.passes if p.name.startswith(("segment", "pyramid")))


def test_levels_over_a_roi_cover_only_its_part(tmp_path) -> None:
    base = create_volume(f"{tmp_path}/v.zarr", shape=(4, 40, 50), dtype="float32", voxel_size_nm=(8, 8, 8),
                         chunk_shape=(2, 8, 8))
    values = np.random.default_rng(0).random(base.shape).astype(np.float32)
    base.write(base.bounds, values)
    roi = Box((0, 8, 16), (4, 24, 40))
    build_pyramid(SerialExecutor(), base, 2, "mean", "v", roi=roi)
    level = open_volume(f"{tmp_path}/v.zarr", scale=1).read(Box((0, 0, 0), (2, 20, 25)))
    expected = _whole(base, (2, 2, 2), "mean")
    # the roi at level 1 is y 4..12, x 8..20, widened to whole chunks of 8: y 0..16, x 8..24
    np.testing.assert_array_equal(level[:, :16, 8:24], expected[:, :16, 8:24])
    assert not level[:, 16:].any() and not level[:, :, :8].any() and not level[:, :, 24:].any()  # never written


def test_levels_for_an_n5_output_are_refused_before_anything_is_written(run_config, tmp_path, capsys) -> None:
    config = run_config()
    config["output"] = {"probabilities": str(tmp_path / "p.n5"), "levels": 2}
    path = write_config(tmp_path / "run.yaml", config)
    capsys.readouterr()
    assert main(["run", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output.probabilities" in err and "output.levels" in err
    assert not (tmp_path / "p.n5").exists()
