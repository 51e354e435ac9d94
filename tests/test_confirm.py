"""Components confirmed by point prompts (``prompts.confirm_nm``): blockwise equals one whole-volume pass
byte for byte (components across blocks, points in other blocks and other slices, wide components kept),
a point index gives the bytes a point set gives, and `volseg run` applies it to its own output."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import stored
from volseg.config import parse_config
from volseg.engine.serial import SerialExecutor
from volseg.engine.stage import run_stage
from volseg.errors import ConfigError
from volseg.geometry import BlockGrid, PointSet
from volseg.inference.job import to_storage
from volseg.inference.postprocess import ConfirmStage, unconfirmed_components
from volseg.io import Volume, create_volume, open_volume
from volseg.io.point_index import PointIndex

SHAPE = (6, 200, 230)
VOXEL_NM = (10.0, 8.0, 8.0)
CORE = (2, 40, 48)
EXTENT = 90  # pixels: wider components are kept unjudged; the first halo (64) is narrower


def _scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (float32, z, y, x) and points (N×3, float): smoothed noise whose foreground falls into
    blobs across block borders; a frame wider than the extent in slice 0; in slice 3 straight lines one
    pixel wide, of 70 to 150 pixels, some marked by a point of slice 1 at their far end (outside the
    first halo of the block their other end lies in)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), sigma=(0, 2.0, 2.0))
    probability = (1 / (1 + np.exp(-8 * (noise / noise.std() - 1.0)))).astype(np.float32)
    probability[0, 20:190, 30] = probability[0, 20:190, 200] = 0.9
    probability[0, 20, 30:201] = probability[0, 189, 30:201] = 0.9
    probability[3] = 0.1
    points = [rng.uniform((0, 0, 0), np.array(SHAPE) - 1, size=(40, 3))]
    lines = [(2, 80, True), (30, 90, False), (50, 89, True), (60, 150, False), (100, 70, False), (20, 85, True),
             (40, 91, False)]  # 90: as wide as the extent (judged), 91: wider (kept)
    for row, (start, length, marked) in enumerate(lines):
        y = 10 + 30 * row
        probability[3, y, start:start + length] = 0.8
        if marked:
            points.append(np.array([[1.2, y + 0.3, start + length - 1.4]]))
    return probability, np.concatenate(points)


def _reference(stored: np.ndarray, points: np.ndarray, reach: int, extent: int, threshold: float = 0.5
               ) -> np.ndarray:
    """The whole volume at once: per slice, the 8-connected components no point of a slice within reach
    lies in (rounded), spanning at most ``extent`` pixels in y and in x, set to 0."""
    scaled = stored if stored.dtype.kind == "f" else stored.astype(np.float32) / np.float32(255)
    voxels = np.rint(points).astype(int)
    cleaned = stored.copy()
    for z, plane in enumerate(scaled):
        labels, _ = ndimage.label(plane > threshold, structure=np.ones((3, 3)))
        near = voxels[np.abs(voxels[:, 0] - z) <= reach]
        marked = set(labels[near[:, 1], near[:, 2]].tolist())
        for label, found in enumerate(ndimage.find_objects(labels), start=1):
            narrow = all(s.stop - s.start <= extent for s in found)
            if narrow and label not in marked:
                cleaned[z][labels == label] = 0
    return cleaned


def _stored(path: str, probability: np.ndarray, dtype: str = "float32") -> Volume:
    volume = create_volume(path, shape=probability.shape, dtype=dtype, voxel_size_nm=VOXEL_NM, chunk_shape=CORE)
    volume.write(volume.bounds, to_storage(probability, np.dtype(dtype)))
    return volume


def _confirm(volume: Volume, points: PointSet | PointIndex, reach: int) -> tuple[list[dict], np.ndarray]:
    stage = ConfirmStage(open_volume(volume.url, "r+"), 0.5, points, reach, EXTENT)
    grid = BlockGrid.aligned(volume.bounds, CORE, 0, volume.bounds, volume.write_chunk)
    stats = run_stage(SerialExecutor(), stage, grid).stats
    assert not stats.failed
    return list(stats.outcomes.values()), open_volume(volume.url).read(volume.bounds)


@pytest.mark.parametrize(("dtype", "reach"), [("float32", 2), ("uint8", 2), ("float32", 0)])
def test_blockwise_equals_whole_volume(tmp_path, dtype, reach) -> None:
    probability, points = _scene(0)
    volume = _stored(f"{tmp_path}/p.zarr", probability, dtype)
    before = volume.read(volume.bounds)
    outcomes, cleaned = _confirm(volume, PointSet(points), reach)
    expected = _reference(before, points, reach, EXTENT)
    assert cleaned.tobytes() == expected.tobytes()

    assert np.count_nonzero(before != expected) > 1000 and (expected > 0.5 * before.max()).sum() > 1000
    assert sum(o["zeroed"] for o in outcomes) == np.count_nonzero(before != cleaned)
    assert any(o["wide_read"] for o in outcomes) and not all(o["wide_read"] for o in outcomes)
    assert (cleaned[0, 20, 30:201] == before[0, 20, 30:201]).all()  # the frame: wider than the extent, kept
    # the lines: marked ones stay when slice 1 is within reach; unmarked ones under the extent go
    kept = [bool((cleaned[3, 10 + 30 * row] > 0.5 * before.max()).any()) for row in range(7)]
    assert kept == [reach >= 2, False, reach >= 2, True, False, reach >= 2, True]


def test_a_point_index_gives_the_same_bytes(tmp_path) -> None:
    probability, points = _scene(1)
    first = _stored(f"{tmp_path}/a.zarr", probability)
    second = _stored(f"{tmp_path}/b.zarr", probability)
    index = PointIndex.create(f"{tmp_path}/points", first.bounds, CORE, VOXEL_NM, (0.0, 0.0, 0.0))
    index.write(PointSet(points))
    reads, read = [], index.read
    index.read = lambda box: reads.append(box) or read(box)  # count the index's reads
    outcomes, cleaned = _confirm(second, index, 1)
    assert _confirm(first, PointSet(points), 1)[1].tobytes() == cleaned.tobytes()
    # each block reads its points once, however many halos it reads the probabilities with
    assert any(o["wide_read"] for o in outcomes) and len(reads) == len(outcomes)


def test_stage_pickles_and_cleans_the_same_after(tmp_path) -> None:
    """Ray ships the stage to actors, with its points."""
    probability, points = _scene(0)
    volume = _stored(f"{tmp_path}/p.zarr", probability)
    stage = ConfirmStage(volume, 0.5, PointSet(points), 2, EXTENT)
    copy = pickle.loads(pickle.dumps(stage))
    grid = BlockGrid.aligned(volume.bounds, CORE, 0, volume.bounds, volume.write_chunk)
    for block in grid:
        first, second = stage.compute(block, stage.read(block).result()), copy.compute(block, copy.read(block).result())
        assert (first.zeroed, first.wide_read) == (second.zeroed, second.wide_read)
        assert (first.values is None) == (second.values is None)
        if first.values is not None:
            assert first.values.tobytes() == second.values.tobytes()


def test_a_component_seen_whole_is_judged_by_the_points_of_its_reach() -> None:
    foreground = np.zeros((3, 20, 20), bool)
    foreground[:, 2:6, 2:6] = True  # a blob in every slice, marked in slice 0 only
    foreground[1, 10:14, 10:14] = True  # unmarked
    points = np.array([[0.0, 3.0, 3.0], [-1.0, 11.0, 11.0]])  # the second: a slice before the box
    whole = (slice(None),) * 3
    removed, doubtful = unconfirmed_components(foreground, whole, [], points, 1, 10)
    assert not doubtful
    assert removed[2, 2:6, 2:6].all() and not removed[:2, 2:6, 2:6].any()  # slice 2 is 2 slices from slice 0
    assert removed[1, 10:14, 10:14].all()
    removed, _ = unconfirmed_components(foreground, whole, [], points, 2, 10)  # reaches slice 1's blob
    assert not removed.any()
    removed, _ = unconfirmed_components(foreground, whole, [], points[:0], 0, 3)  # 4 wide: over the extent
    assert not removed.any()


def test_config() -> None:
    output = {"probabilities": "p.zarr"}
    plain = parse_config({"output": output, "prompts": {"points": "p.csv"}})
    assert plain.prompts.confirm_nm == 0
    same = parse_config({"output": output, "prompts": {"points": "p.csv", "confirm_nm": 0}})
    assert same.output_fingerprint() == plain.output_fingerprint()
    changed = parse_config({"output": output, "prompts": {"points": "p.csv", "confirm_nm": 100}})
    assert changed.output_fingerprint() != plain.output_fingerprint()
    with pytest.raises(ConfigError, match=r"prompts\.confirm_nm"):
        parse_config({"output": output, "prompts": {"points": "p.csv", "confirm_nm": -1}})


def test_volseg_run_confirms_by_its_prompts(run_config, small_dataset, tmp_path) -> None:
    """`volseg run` with prompts.confirm_nm (a model that takes no prompts: the points only confirm) writes
    the probabilities of a run without it, with the unconfirmed components removed as one whole-volume
    pass would; the density is untouched."""
    from volseg.commands.run import run

    raw = open_volume(f"{small_dataset}/raw")
    rng = np.random.default_rng(3)
    points = rng.uniform((0, 0, 0), np.array(raw.shape) - 1, size=(30, 3))
    csv = tmp_path / "points.csv"
    csv.write_text("z,y,x\n" + "".join(f"{z},{y},{x}\n" for z, y, x in points))
    inference = {"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu", "threshold": 0.5}
    execution = {"block": [4, 32, 48], "executor": "serial", "threads": 1}
    plain = run_config(inference=inference, execution=execution)
    run(parse_config(plain), progress=False)
    output = {"probabilities": str(tmp_path / "confirmed.zarr/prob"),
              "density": str(tmp_path / "confirmed.zarr/density"), "chunk": [2, 16, 16]}
    reach_nm = 2 * raw.voxel_size_nm[0]
    config = run_config(inference=inference, output=output, execution=execution,
                        prompts={"points": str(csv), "confirm_nm": reach_nm})
    result = run(parse_config(config), progress=False)
    assert [p.name for p in result.passes] == ["segment", "confirm"]
    assert any(line.startswith("confirm: ") for line in result.summary_lines())

    before, cleaned = stored(plain["output"]["probabilities"]), stored(output["probabilities"])
    extent = int(np.ceil(2000 / min(raw.voxel_size_nm[1:])))
    expected = _reference(before, points, 2, extent)
    assert np.count_nonzero(before != expected) > 100 and (expected > 0.5).any()
    assert cleaned.tobytes() == expected.tobytes()
    assert stored(plain["output"]["density"]).tobytes() == stored(output["density"]).tobytes()
