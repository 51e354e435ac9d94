"""Small 2D components removed from the probabilities (``output.min_area_nm2``): blockwise equals one
whole-volume pass byte for byte, pieces of a large component are kept, resumes reuse done-marks, and
`volseg run` applies it to its own output."""

from __future__ import annotations

import pickle
from pathlib import Path

import cc3d
import numpy as np
import pytest
from scipy import ndimage

from tests.conftest import stored
from volseg.config import parse_config
from volseg.engine.ledger import BlockLedger
from volseg.engine.serial import SerialExecutor
from volseg.engine.stage import RunStats, run_block, run_stage
from volseg.errors import ConfigError, OutputExistsError
from volseg.geometry import BlockGrid, Box
from volseg.inference.job import to_storage
from volseg.inference.postprocess import FIRST_HALO_PX, MinAreaStage, min_area_pixels
from volseg.io import Volume, create_volume, open_volume

SHAPE = (3, 150, 172)
VOXEL_NM = (30.0, 8.0, 8.0)
CORE = (2, 40, 44)


def _scene(seed: int) -> np.ndarray:
    """Probabilities (float32, z, y, x): smoothed noise, whose foreground falls into blobs of one pixel
    to a few hundred; a frame crossing many blocks in slice 0; and in slice 2, where there is no noise,
    straight lines one pixel wide of 40 to 140 pixels that reach past the first halo from a core."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=SHAPE), sigma=(0, 1.5, 1.5))
    probability = (1 / (1 + np.exp(-8 * (noise / noise.std() - 0.8)))).astype(np.float32)
    probability[0, 20:130, 30] = probability[0, 20:130, 150] = 0.9
    probability[0, 20, 30:151] = probability[0, 129, 30:151] = 0.9
    probability[2] = 0.1
    for row, (start, length) in enumerate([(2, 90), (30, 140), (50, 99), (60, 100), (80, 40), (100, 70)]):
        probability[2, 10 + 20 * row, start:start + length] = 0.8
    return probability


def _stored(root: Path, probability: np.ndarray, dtype: str, chunk: tuple[int, ...] = CORE) -> Volume:
    volume = create_volume(f"{root}/probabilities.zarr", shape=probability.shape, dtype=dtype,
                           voxel_size_nm=VOXEL_NM, chunk_shape=chunk)
    volume.write(volume.bounds, to_storage(probability, np.dtype(dtype)))
    return volume


def _reference(stored: np.ndarray, threshold: float, min_px: int) -> np.ndarray:
    """The whole volume at once: per slice, 8-connected components of the foreground under min_px
    pixels set to 0."""
    scaled = stored if stored.dtype.kind == "f" else stored.astype(np.float32) / np.float32(255)
    cleaned = stored.copy()
    for z, plane in enumerate(scaled):
        labels = cc3d.connected_components(plane > threshold, connectivity=8)
        small = np.bincount(labels.ravel()) < min_px
        small[0] = False
        cleaned[z][small[labels]] = 0
    return cleaned


def _grid(volume: Volume, core: tuple[int, ...] = CORE, roi: Box | None = None) -> BlockGrid:
    return BlockGrid.aligned(roi or volume.bounds, core, 0, volume.bounds, volume.write_chunk)


def _clean(volume: Volume, min_px: int, grid: BlockGrid | None = None, executor: SerialExecutor | None = None,
           ledger: BlockLedger | None = None) -> tuple[RunStats, np.ndarray]:
    """Run the stage over the blocks not marked done, as `volseg run` does; the stats and the output."""
    stage = MinAreaStage(open_volume(volume.url, "r+"), 0.5, min_px)
    stats = run_stage(executor or SerialExecutor(), stage, grid or _grid(volume), ledger).stats
    assert not stats.failed
    return stats, open_volume(volume.url).read(volume.bounds)


def _component_sizes(stored: np.ndarray, threshold: float) -> np.ndarray:
    scaled = stored if stored.dtype.kind == "f" else stored.astype(np.float32) / np.float32(255)
    return np.concatenate([np.bincount(cc3d.connected_components(p > threshold, connectivity=8).ravel())[1:]
                           for p in scaled])


@pytest.mark.parametrize(("dtype", "min_px"), [("float32", 100), ("uint8", 100), ("float32", 20)])
def test_blockwise_equals_whole_volume(tmp_path, dtype, min_px) -> None:
    volume = _stored(tmp_path, _scene(0), dtype)
    before = volume.read(volume.bounds)
    stats, cleaned = _clean(volume, min_px)
    expected = _reference(before, 0.5, min_px)
    assert cleaned.tobytes() == expected.tobytes()

    sizes = _component_sizes(before, 0.5)
    assert (sizes < min_px).sum() > 50 and (sizes >= min_px).sum() > 5  # many removed, some kept
    assert sizes.max() > 4 * FIRST_HALO_PX  # the frame: larger than any halo, across many blocks
    assert not np.array_equal(cleaned, before) and cleaned.any()
    assert sum(o["zeroed"] for o in stats.outcomes.values()) == np.count_nonzero(before != cleaned)
    wide = [o["wide_read"] for o in stats.outcomes.values()]
    assert any(wide) == (min_px > FIRST_HALO_PX) and not all(wide)  # wide reads only where in doubt
    # lines reaching past the first halo: the 90 and 99 pixel ones go, the 100 and 140 pixel ones stay
    assert [not (cleaned[2, 10 + 20 * row] == 0).any() for row in range(6)] == [
        min_px <= 90, True, min_px <= 99, True, min_px <= 40, min_px <= 70]


def test_a_component_of_small_pieces_is_kept(tmp_path) -> None:
    """A staircase crossing block borders back and forth: each block holds pieces under min_px, the whole
    has more; a shorter staircase (under min_px in all) goes."""
    min_px, core = 30, (1, 8, 8)
    probability = np.zeros((1, 48, 48), np.float32)
    for step in range(10):  # 10 rows of 4 pixels, 8-connected at the corners: 40 pixels
        probability[0, 3 + step, 6 + (step % 2) * 4: 10 + (step % 2) * 4] = 1
    probability[0, 26, 14:20] = probability[0, 27, 20:26] = 1  # 12 pixels, across the border x = 16
    volume = _stored(tmp_path, probability, "float32", core)
    grid = _grid(volume, core)
    labels = cc3d.connected_components(probability[0] > 0.5, connectivity=8)
    assert sorted(np.bincount(labels.ravel())[1:]) == [12, 40]
    pieces = [np.bincount(cc3d.connected_components(probability[0][block.core.slices[1:]] > 0.5,
                                                    connectivity=8).ravel())[1:] for block in grid]
    assert max(np.concatenate(pieces)) < min_px and sum(len(p) > 0 for p in pieces) >= 4

    _, cleaned = _clean(volume, min_px, grid)
    expected = probability.copy()
    expected[0, 26:28] = 0
    assert cleaned.tobytes() == expected.tobytes()


def test_each_channel_is_cleaned_on_its_own(tmp_path) -> None:
    channels = np.stack([_scene(0), _scene(1)])
    volume = create_volume(f"{tmp_path}/probabilities.zarr", shape=SHAPE, dtype="float32", voxel_size_nm=VOXEL_NM,
                           chunk_shape=CORE, num_channels=2)
    volume.write(volume.bounds, channels)
    _, cleaned = _clean(volume, 100)
    assert cleaned.tobytes() == np.stack([_reference(c, 0.5, 100) for c in channels]).tobytes()


def test_only_the_roi_is_written(tmp_path) -> None:
    """Blocks clean their cores inside the roi; components are measured over the whole volume."""
    probability = _scene(1)
    volume = _stored(tmp_path, probability, "float32")
    before = volume.read(volume.bounds)
    roi = Box((0, 40, 44), (3, 120, 132))
    _, cleaned = _clean(volume, 20, _grid(volume, roi=roi))
    expected = before.copy()
    expected[roi.slices] = _reference(before, 0.5, 20)[roi.slices]
    assert cleaned.tobytes() == expected.tobytes()


class RecordingExecutor(SerialExecutor):
    """The serial executor, remembering which blocks it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[int] = []

    def run(self, stage, blocks, on_done=None, ledger=None):  # type: ignore[override]
        blocks = list(blocks)
        self.ran += [block.id for block in blocks]
        return super().run(stage, blocks, on_done, ledger)


def test_resume_cleans_only_the_blocks_left_and_gives_the_same_bytes(tmp_path) -> None:
    volume = _stored(tmp_path, _scene(2), "uint8")
    expected = _reference(volume.read(volume.bounds), 0.5, 100)
    grid = _grid(volume)
    ledger = BlockLedger.beside(volume.url, "signature-1")
    stage = MinAreaStage(volume, 0.5, 100)
    SerialExecutor().run(stage, [block for block in grid if block.id % 3 != 1], ledger=ledger)  # then killed
    run_block(stage, grid.block(1))  # written, killed before its done-mark

    executor = RecordingExecutor()
    _, cleaned = _clean(volume, 100, grid, executor, ledger)
    every = list(range(grid.num_blocks))
    assert executor.ran == [b for b in every if b % 3 == 1] and sorted(ledger.done(stage.name)) == every
    assert cleaned.tobytes() == expected.tobytes()

    again = RecordingExecutor()
    assert _clean(volume, 100, grid, again, ledger)[1].tobytes() == expected.tobytes() and again.ran == []


def test_stage_pickles_small_and_cleans_the_same_after(tmp_path) -> None:
    """Ray ships the stage to actors: it pickles as the volume's spec and two numbers."""
    volume = _stored(tmp_path, _scene(0), "float32")
    stage = MinAreaStage(volume, 0.5, 100)
    block = _grid(volume).block(5)
    copy = pickle.loads(payload := pickle.dumps(stage))
    assert len(payload) < 4096
    first, second = stage.compute(block, stage.read(block).result()), copy.compute(block, copy.read(block).result())
    assert first.zeroed > 0 and first.values is not None and second.values is not None
    assert (first.zeroed, first.wide_read, first.values.tobytes()) == (second.zeroed, second.wide_read,
                                                                       second.values.tobytes())


def test_min_area_in_pixels_and_config() -> None:
    assert min_area_pixels(100 * 64, VOXEL_NM) == 100
    assert min_area_pixels(100 * 64 + 1, VOXEL_NM) == 101
    assert min_area_pixels(0, VOXEL_NM) == 0
    output = {"probabilities": "p.zarr"}
    plain = parse_config({"output": output})
    assert plain.output.min_area_nm2 == 0
    assert parse_config({"output": {**output, "min_area_nm2": 0}}).output_fingerprint() == plain.output_fingerprint()
    assert parse_config({"output": {**output, "min_area_nm2": 5}}).output_fingerprint() != plain.output_fingerprint()
    with pytest.raises(ConfigError, match=r"output\.min_area_nm2"):
        parse_config({"output": {**output, "min_area_nm2": -1}})


def test_volseg_run_removes_specks(run_config, tmp_path) -> None:
    """`volseg run` with output.min_area_nm2 writes its probabilities with the small components cleaned
    as one whole-volume pass would, keeps the density, and refuses to resume with another area."""
    from volseg.commands.run import run
    from volseg.commands.validate import validate

    inference = {"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu", "threshold": 0.55}
    execution = {"block": [4, 32, 48], "executor": "serial", "threads": 1}  # no oversubscribed cores: fast
    plain = run_config(inference=inference, execution=execution)
    run(parse_config(plain), progress=False)
    min_px, pixel_nm2 = 20, 4.0 * 4.0  # the test volume's pixels are 4 × 4 nm
    output = {"probabilities": str(tmp_path / "clean.zarr/prob"), "density": str(tmp_path / "clean.zarr/density"),
              "chunk": [2, 16, 16], "min_area_nm2": min_px * pixel_nm2}
    config = run_config(inference=inference, output=output, execution=execution)
    assert "is valid" in validate(parse_config(config))[0]
    result = run(parse_config(config), progress=False)
    assert [p.name for p in result.passes] == ["segment", "min-area"]
    assert any(line.startswith("min area: ") for line in result.summary_lines())

    before, cleaned = stored(plain["output"]["probabilities"]), stored(output["probabilities"])
    assert cleaned.tobytes() == _reference(before, 0.55, min_px).tobytes()
    sizes = _component_sizes(before, 0.55)
    assert (sizes < min_px).sum() > 100 and (sizes >= min_px).sum() > 10
    assert stored(plain["output"]["density"]).tobytes() == stored(output["density"]).tobytes()

    with pytest.raises(OutputExistsError, match="another volseg run"):
        changed = {**output, "min_area_nm2": 2 * min_px * pixel_nm2}
        run(parse_config(run_config(inference=inference, output=changed, execution=execution)), progress=False)
