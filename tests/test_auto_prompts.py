"""Global density peaks found blockwise equal the whole-volume peaks; an auto-prompted run is the same
whatever the block shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import TINY_PROMPTDAS
from volseg.commands.run import run
from volseg.config import parse_config
from volseg.errors import ConfigError
from volseg.geometry import BlockGrid, Box
from volseg.inference.peaks import local_peaks, peak_radius
from volseg.io import open_volume
from volseg.io.points import read_points


def smooth_field(shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.random(shape), (1.0, 2.0, 2.0))
    field = (field - field.min()) / (field.max() - field.min())
    field[3, 10:14, 10:14] = 1.0                           # a plateau: one peak, the lowest index
    return field.astype(np.float32)


def blockwise_peaks(field: np.ndarray, core: tuple[int, int, int], radius, threshold: float) -> np.ndarray:
    bounds = Box.from_shape(field.shape)
    found = []
    for block in BlockGrid(bounds, core, 0, bounds):
        box = block.core.grow(radius).intersect(bounds)
        found.append(local_peaks(field[box.slices], box, block.core, threshold, radius))
    return np.concatenate(found)


def as_set(peaks: np.ndarray) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in p) for p in peaks}


@pytest.mark.parametrize("core", [(3, 7, 11), (1, 16, 5), (9, 40, 40), (2, 1, 64)])
@pytest.mark.parametrize("radius", [(1, 3, 3), (0, 2, 5)])
def test_blockwise_peaks_equal_whole_volume_peaks(core, radius):
    field = smooth_field((9, 40, 45), seed=4)
    whole = Box.from_shape(field.shape)
    reference = local_peaks(field, whole, whole, 0.5, radius)
    assert len(reference) >= 5 and len(as_set(reference)) == len(reference)
    assert sum(1 for p in reference if p[0] == 3 and 10 <= p[1] < 14 and 10 <= p[2] < 14) == 1
    found = blockwise_peaks(field, core, radius, 0.5)
    assert len(found) == len(reference) and as_set(found) == as_set(reference)


def test_peaks_are_local_maxima_above_the_threshold():
    field = np.zeros((1, 9, 9), np.float32)
    field[0, 2, 2], field[0, 2, 4], field[0, 7, 7], field[0, 5, 1] = 0.9, 0.8, 0.6, 0.2
    box = Box.from_shape(field.shape)
    assert as_set(local_peaks(field, box, box, 0.5, (0, 2, 2))) == {(0, 2, 2), (0, 7, 7)}


def test_peak_radius_is_zero_along_z_for_2d_windows():
    assert peak_radius(100, (40, 4, 4), (1, 128, 128)) == (0, 25, 25)
    assert peak_radius(100, (8, 8, 8), (16, 64, 64)) == (12, 12, 12)


@pytest.fixture
def auto_config(run_config, promptdas_checkpoint, tmp_path):
    def make(block, name):
        return run_config(
            model={"name": TINY_PROMPTDAS.name, "options": dict(TINY_PROMPTDAS.options),
                   "checkpoint": str(promptdas_checkpoint)},
            inference={"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 8, "device": "cpu"},
            output={"probabilities": str(tmp_path / f"{name}.zarr/prob"),
                    "density": str(tmp_path / f"{name}.zarr/density"), "chunk": [2, 16, 16]},
            prompts={"auto": True, "peak_threshold": 0.02, "min_distance_nm": 40},
            execution={"block": block, "executor": "serial"})
    return make


def test_auto_prompted_run_is_the_same_blockwise_and_whole(auto_config):
    outputs = {}
    for block, name in (([4, 32, 48], "blocks"), ([10, 80, 80], "whole")):
        config = auto_config(block, name)
        result = run(parse_config(config), progress=False)
        assert [p.name for p in result.passes] == ["density", "peaks", "segment-prompted"]
        assert result.passes[1].stats.outcomes == {}  # the peaks are in storage, not in the driver
        outputs[name] = (result.prompts.read(result.plan.grid.roi).zyx,
                         *(open_volume(config["output"][k]).read(open_volume(config["output"][k]).bounds)
                           for k in ("probabilities", "density")))
    prompts, prob, density = outputs["blocks"]
    assert len(prompts) > 0 and np.array_equal(prompts, outputs["whole"][0])
    assert np.abs(prob - outputs["whole"][1]).max() <= 1e-5
    assert np.abs(density - outputs["whole"][2]).max() <= 1e-5


def test_prompts_change_the_probabilities(auto_config, tmp_path):
    config = auto_config([4, 32, 48], "auto")
    run(parse_config(config), progress=False)
    plain = auto_config([4, 32, 48], "plain")
    del plain["prompts"]
    run(parse_config(plain), progress=False)
    read = lambda url: open_volume(url).read(open_volume(url).bounds)  # noqa: E731
    assert np.abs(read(config["output"]["probabilities"]) - read(plain["output"]["probabilities"])).max() > 1e-3


def test_auto_prompts_need_a_density_output(auto_config):
    config = auto_config([4, 32, 48], "nodensity")
    del config["output"]["density"]
    with pytest.raises(ConfigError, match=r"output\.density"):
        run(parse_config(config), progress=False)


def test_neuroglancer_state_links_every_volume_and_the_prompts(auto_config, tmp_path):
    import json
    import threading
    import urllib.request

    from volseg.commands.view import link, make_server, neuroglancer_state, volume_routes

    config = parse_config(auto_config([4, 32, 48], "view"))
    result = run(config, progress=False)
    state = neuroglancer_state(config, result.prompts, port=0)
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["image", "probabilities", "density", "prompts"]
    prompts = result.prompts.read(result.plan.grid.roi)
    assert len(state["layers"][-1]["annotations"]) == len(prompts)
    (tmp_path / "state.json").write_text(json.dumps(state))           # the prompts layer reads back exactly
    source = result.plan.source
    np.testing.assert_allclose(read_points(tmp_path / "state.json", source.voxel_size_nm, source.voxel_offset,
                                           layer="prompts").zyx, prompts.zyx, atol=1e-4)
    routes = volume_routes(config)                         # each local volume under its own route
    assert routes["probabilities"] == Path(config.output.probabilities).resolve() and set(routes) == {
        "image", "probabilities", "density"}
    assert state["layers"][1]["source"] == "zarr3://http://127.0.0.1:0/probabilities"
    assert link(state).startswith("https://neuroglancer-demo.appspot.com/#!%7B")
    assert "volseg view" in result.viewer_line()

    server = make_server(routes, 0)                        # what `volseg view` serves, with CORS for Neuroglancer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        origin = "https://neuroglancer-demo.appspot.com"
        request = urllib.request.Request(f"{server.url}/probabilities/zarr.json", headers={"Origin": origin})
        with urllib.request.urlopen(request) as reply:
            assert reply.headers["Access-Control-Allow-Origin"] == origin
            assert json.loads(reply.read())["zarr_format"] == 3
    finally:
        server.shutdown()
        server.server_close()


def test_many_prompts_are_routed_from_storage_with_the_same_bytes(auto_config, tmp_path, monkeypatch):
    """A prompt set of at least ``INDEXED_POINTS`` points is written to a point index beside the run's
    marks and each block reads the points of its read box from there: the same bytes as shipping the
    whole set with the stage."""
    from volseg.commands import run as run_module
    from volseg.io.point_index import PointIndex

    rng = np.random.default_rng(3)
    csv = tmp_path / "clicks.csv"
    zyx = np.column_stack([rng.integers(0, s, 60) for s in (10, 72, 80)])
    csv.write_text("z,y,x\n" + "\n".join(",".join(map(str, p)) for p in zyx) + "\n")
    results, values = {}, {}
    for name, threshold in (("shipped", 10**9), ("indexed", 1)):
        monkeypatch.setattr(run_module, "INDEXED_POINTS", threshold)
        config = auto_config([4, 32, 48], name)
        config["prompts"] = {"points": str(csv)}
        results[name] = run(parse_config(config), progress=False)
        url = config["output"]["probabilities"]
        values[name] = open_volume(url).read(open_volume(url).bounds)
    indexed = results["indexed"].prompts
    assert isinstance(indexed, PointIndex) and not isinstance(results["shipped"].prompts, PointIndex)
    np.testing.assert_array_equal(indexed.read(indexed.bounds).zyx, results["shipped"].prompts.zyx)
    assert values["indexed"].tobytes() == values["shipped"].tobytes()
    assert any("60 points from" in line and "indexed at" in line for line in results["indexed"].summary_lines())


@pytest.mark.ray
def test_ray_actors_read_the_peaks_from_storage_and_write_the_serial_bytes(ray_cluster, auto_config):
    """The point index travels to Ray actors as its URL; each reads the cells of its blocks."""
    values = {}
    for name, execution in (("serial", {"executor": "serial"}),
                            ("ray", {"executor": "ray", "actors": 2, "cpus_per_actor": 1, "threads": 1})):
        config = auto_config([4, 32, 48], name)
        config["execution"].update({**execution, "threads": 1})
        run(parse_config(config), progress=False)
        url = config["output"]["probabilities"]
        values[name] = open_volume(url).read(open_volume(url).bounds)
    assert values["ray"].tobytes() == values["serial"].tobytes()
