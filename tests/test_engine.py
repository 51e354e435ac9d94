"""The engine at scale: blocks as a lazy stream, done-marks grouped per super-block, resumes that recompute
exactly the blocks without a mark (also after a crash between a block's write and its mark, and from the
per-block marks of older versions)."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tensorstore as ts

from volseg.engine import ledger as ledger_module
from volseg.engine.ledger import SUPER_BLOCK, BlockLedger, DoneMarks
from volseg.engine.serial import SerialExecutor
from volseg.engine.stage import Resolved, RunStats, pending_blocks, run_block, run_stage
from volseg.errors import ConfigError
from volseg.geometry import Block, BlockGrid, Box, PointSet
from volseg.inference.peaks import PeakStage
from volseg.inference.postprocess import ConfirmStage, MinAreaStage
from volseg.instances.labels import InstanceParams
from volseg.instances.stages import FaceContactStage, RelabelStage
from volseg.instances.stitching import RelabelTable
from volseg.io import create_volume, open_volume
from volseg.io.storage import open_kvstore
from volseg.io.urls import parse_url


class CoreIdStage:
    """Writes each block's id + 1 into its core; outcome: the id, or None for even ids (so the marks
    keep outcomes of some blocks only)."""

    name = "ids"

    def __init__(self, volume: Any) -> None:
        self.volume = volume

    def read_box(self, block: Block) -> Box:
        return block.core

    def read(self, block: Block) -> Resolved:
        return Resolved()

    def compute(self, block: Block, data: Any) -> np.ndarray:
        return np.full(block.core.shape, block.id + 1, np.uint16)

    def write(self, block: Block, computed: np.ndarray) -> list[Any]:
        return [self.volume.write_async(block.core, computed)]

    def outcome(self, block: Block, computed: np.ndarray) -> int | None:
        return None if block.id % 2 == 0 else block.id

    def to(self, device: str) -> None:
        return None


class RecordingExecutor(SerialExecutor):
    """The serial executor, remembering the blocks it ran and what kind of object gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[int] = []
        self.source: Any = None

    def run(self, stage, blocks, on_done=None, ledger=None):  # type: ignore[override]
        self.source = blocks

        def recorded() -> Iterator[Block]:
            for block in blocks:
                self.ran.append(block.id)
                yield block

        return super().run(stage, recorded(), on_done, ledger)


class Crash(BaseException):
    """The driver dies (not an error a run handles)."""


def _volume(tmp_path, shape=(4, 40, 60), name="ids.zarr"):
    return create_volume(str(tmp_path / name), shape=shape, dtype="uint16", voxel_size_nm=(8.0, 8.0, 8.0),
                         chunk_shape=(1, 10, 10))


def _grid(volume) -> BlockGrid:
    return BlockGrid.aligned(volume.bounds, (1, 10, 10), 0, volume.bounds, (1, 10, 10))  # 96 blocks


def _expected(grid: BlockGrid) -> np.ndarray:
    values = np.zeros(grid.roi.shape, np.uint16)
    for block in grid:
        values[block.core.slices] = block.id + 1
    return values


@pytest.fixture
def small_groups(monkeypatch):
    """Super-blocks of 8 blocks, so a small grid spans several mark objects."""
    monkeypatch.setattr(ledger_module, "SUPER_BLOCK", 8)
    return 8


# --- the lazy block stream --------------------------------------------------------------------------------


def test_the_block_stream_gives_the_grids_blocks_in_order():
    grid = BlockGrid(Box((0, 0, 0), (7, 33, 50)), (2, 8, 16), (1, 3, 2), Box((0, 0, 0), (9, 40, 50)))
    stream = pending_blocks(grid)
    assert isinstance(stream, Iterator)
    assert list(stream) == list(grid)
    done = DoneMarks()
    done.add(0, np.arange(SUPER_BLOCK) % 3 == 0, {})
    assert list(pending_blocks(grid, done)) == [block for block in grid if block.id % 3 != 0]


def test_a_huge_metadata_only_volume_starts_without_enumerating_its_blocks(tmp_path):
    """A zarr v3 array of 10^12 blocks whose chunks are never written: the executor gets an iterator and
    its first block at once (a list of them would not fit in memory)."""
    chunk = (16, 1024, 1024)
    shape = [chunk[0] * 10**4, chunk[1] * 10**4, chunk[2] * 10**4]
    ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "huge.zarr")}}, create=True,
            dtype=ts.uint8, shape=shape, chunk_layout=ts.ChunkLayout(chunk_shape=list(chunk))).result()
    volume = open_volume(str(tmp_path / "huge.zarr"))
    grid = BlockGrid.aligned(volume.bounds, chunk, 0, volume.bounds, chunk)
    assert grid.num_blocks == 10**12
    seen: list[Block] = []

    class FirstBlockOnly:
        def run(self, stage, blocks, on_done=None, ledger=None):
            assert isinstance(blocks, Iterator)
            seen.append(next(blocks))
            return RunStats()

    run_stage(FirstBlockOnly(), CoreIdStage(None), grid, BlockLedger.beside(str(tmp_path / "out.zarr"), "s"))
    assert seen == [grid.block(0)] and seen[0].core == Box((0, 0, 0), chunk)


# --- grouped done-marks -----------------------------------------------------------------------------------


def test_done_marks_are_one_object_per_super_block_with_the_outcomes(tmp_path, small_groups):
    volume = _volume(tmp_path)
    grid = _grid(volume)
    ledger = BlockLedger.beside(volume.url, "signature-1")
    result = run_stage(SerialExecutor(), CoreIdStage(volume), grid, ledger)
    assert result.stats.blocks_done == 96 and result.resumed == 0
    assert result.stats.outcomes == {i: i for i in range(1, 96, 2)}  # None outcomes are not kept
    keys = ledger.store.list(ts.KvStore.KeyRange("", "\xff")).result()
    assert sorted(key.decode() for key in keys) == sorted(f"signature-1/ids/groups/{g}" for g in range(12))
    done = BlockLedger.beside(volume.url, "signature-1").done("ids")
    assert list(done) == list(range(96)) and len(done) == 96 and done.outcomes == {i: i for i in range(1, 96, 2)}
    assert len(done.complete) == 12 and not done.partial


def test_a_resume_recomputes_exactly_the_blocks_without_a_mark(tmp_path, small_groups):
    volume = _volume(tmp_path)
    grid = _grid(volume)
    ledger = BlockLedger.beside(volume.url, "signature-1")
    unfinished = {3, 8, 9, 10, 11, 12, 13, 14, 15, 40, 95}
    SerialExecutor().run(CoreIdStage(volume), [b for b in grid if b.id not in unfinished], ledger=ledger)

    executor = RecordingExecutor()
    result = run_stage(executor, CoreIdStage(open_volume(volume.url, "r+")), grid, BlockLedger.beside(volume.url,
                                                                                                       "signature-1"))
    assert executor.ran == sorted(unfinished) and isinstance(executor.source, Iterator)
    assert result.resumed == 96 - len(unfinished) and result.stats.blocks_done == len(unfinished)
    assert result.stats.outcomes == {i: i for i in range(1, 96, 2)}  # those of earlier runs from the marks
    assert open_volume(volume.url).read(volume.bounds).tobytes() == _expected(grid).tobytes()


def test_a_crash_between_a_blocks_write_and_its_mark_recomputes_it(tmp_path, small_groups):
    """The driver dies right after block 20's data is written, before its mark: blocks 0..19 stay marked,
    and the resume recomputes 20 and everything after it, nothing before."""
    volume = _volume(tmp_path)
    grid = _grid(volume)

    class DyingLedger(BlockLedger):
        dead = False

        def mark(self, stage: str, block_id: int, outcome: Any = None) -> None:
            if block_id == 20:
                self.dead = True
                raise Crash
            super().mark(stage, block_id, outcome)
            super().flush()  # as if the background writer had written every mark so far

        def flush(self) -> None:  # a killed driver writes nothing more
            if not self.dead:
                super().flush()

    with pytest.raises(Crash):
        run_stage(SerialExecutor(), CoreIdStage(volume), grid, DyingLedger.beside(volume.url, "signature-1"))
    ledger = BlockLedger.beside(volume.url, "signature-1")
    assert sorted(ledger.done("ids")) == list(range(20))
    assert open_volume(volume.url).read(grid.block(20).core)[0, 0, 0] == 21  # written, not marked

    executor = RecordingExecutor()
    run_stage(executor, CoreIdStage(open_volume(volume.url, "r+")), grid, ledger)
    assert executor.ran == list(range(20, 96))
    assert open_volume(volume.url).read(volume.bounds).tobytes() == _expected(grid).tobytes()


def test_marks_of_an_interrupted_pass_are_written_when_it_stops(tmp_path, small_groups):
    """Ctrl-C (or any error) in the middle of a pass: the blocks finished before it keep their marks."""
    volume = _volume(tmp_path)
    grid = _grid(volume)

    def interrupt(block: Block, seconds: float, worker: str) -> None:
        if block.id == 30:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(SerialExecutor(), CoreIdStage(volume), grid, BlockLedger.beside(volume.url, "s"), on_done=interrupt)
    assert sorted(BlockLedger.beside(volume.url, "s").done("ids")) == list(range(31))


def test_marks_reach_storage_while_a_pass_runs(tmp_path, monkeypatch):
    """A background thread writes the marks every FLUSH_SECONDS, without waiting for the pass to end (what a
    driver killed outright loses)."""
    monkeypatch.setattr(ledger_module, "FLUSH_SECONDS", 0.01)
    url = str(tmp_path / "out.zarr")
    ledger, reader = BlockLedger.beside(url, "s"), BlockLedger.beside(url, "s")
    ledger.mark("ids", 7, {"x": 1})
    deadline = time.monotonic() + 60
    while 7 not in reader.done("ids") and time.monotonic() < deadline:
        time.sleep(0.01)
    done = reader.done("ids")
    assert list(done) == [7] and done.outcomes == {7: {"x": 1}}
    ledger.flush()


def test_two_writers_of_one_super_block_lose_no_mark(tmp_path, small_groups):
    """Each write merges with what the object holds (compare-and-swap), so even two drivers (one that
    lost its lease and has not noticed yet) keep each other's marks."""
    volume = _volume(tmp_path)
    first, second = BlockLedger.beside(volume.url, "s"), BlockLedger.beside(volume.url, "s")
    first.mark("ids", 1, {"a": 1})
    second.mark("ids", 2)
    second.flush()
    first.mark("ids", 3)
    first.flush()
    done = BlockLedger.beside(volume.url, "s").done("ids")
    assert list(done) == [1, 2, 3] and done.outcomes == {1: {"a": 1}}


def test_per_block_marks_of_an_older_version_resume_and_are_folded_into_groups(tmp_path, small_groups):
    """Outputs of earlier volseg versions hold one mark per block (``<signature>/<stage>/<id>``): a resume
    reads them, recomputes only the other blocks, and leaves grouped marks only."""
    volume = _volume(tmp_path)
    grid = _grid(volume)
    SerialExecutor().run(CoreIdStage(volume), [b for b in grid if b.id < 50])
    ledger = BlockLedger.beside(volume.url, "signature-1")
    for block_id in range(50):
        outcome = None if block_id % 2 == 0 else block_id
        ledger.store.write(f"signature-1/ids/{block_id}", json.dumps(outcome).encode()).result()

    executor = RecordingExecutor()
    result = run_stage(executor, CoreIdStage(open_volume(volume.url, "r+")), grid, ledger)
    assert executor.ran == list(range(50, 96)) and result.resumed == 50
    assert result.stats.outcomes == {i: i for i in range(1, 96, 2)}
    keys = [key.decode() for key in ledger.store.list(ts.KvStore.KeyRange("", "\xff")).result()]
    assert keys and all(key.startswith("signature-1/ids/groups/") for key in keys)
    assert open_volume(volume.url).read(volume.bounds).tobytes() == _expected(grid).tobytes()


def test_marks_of_another_signature_are_not_read(tmp_path):
    volume = _volume(tmp_path)
    ledger = BlockLedger.beside(volume.url, "signature-1")
    ledger.mark("ids", 5)
    ledger.flush()
    assert list(BlockLedger.beside(volume.url, "signature-2").done("ids")) == []
    assert list(ledger.done("other-stage")) == []


def test_done_marks_count_and_list_by_super_block():
    done = DoneMarks()
    done.add(0, np.ones(SUPER_BLOCK, bool), {})
    partial = np.zeros(SUPER_BLOCK, bool)
    partial[[0, 5]] = True
    done.add(2, partial, {2 * SUPER_BLOCK + 5: "x"})
    done.add(2, np.eye(1, SUPER_BLOCK, 7, dtype=bool)[0], {})  # marks accumulate
    assert len(done) == SUPER_BLOCK + 3 and done.complete == {0} and set(done.partial) == {2}
    assert list(done)[-3:] == [2 * SUPER_BLOCK, 2 * SUPER_BLOCK + 5, 2 * SUPER_BLOCK + 7]
    assert SUPER_BLOCK - 1 in done and SUPER_BLOCK not in done and 2 * SUPER_BLOCK + 7 in done
    num_blocks = 2 * SUPER_BLOCK + 9
    left = list(done.pending(num_blocks))
    assert left == [i for i in range(num_blocks) if i not in done]
    assert len(left) == num_blocks - len(done)


def test_a_bad_mark_interval_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger_module.MARK_SECONDS_ENV, "soon")
    with pytest.raises(ConfigError, match="VOLSEG_MARK_SECONDS='soon' is not a positive number of seconds"):
        BlockLedger.beside(str(tmp_path / "out.zarr"), "s")


def test_a_ledger_pickles_without_its_unwritten_marks(tmp_path):
    ledger = BlockLedger.beside(str(tmp_path / "out.zarr"), "signature-1")
    ledger.mark("ids", 3)
    copy = pickle.loads(pickle.dumps(ledger))
    assert (copy.where, copy.signature, copy.leases) == (ledger.where, ledger.signature, ledger.leases)
    assert copy._unwritten == {}


# --- the box a block reads --------------------------------------------------------------------------------


class RecordingVolume:
    """A volume that remembers every box read from it."""

    def __init__(self, volume: Any) -> None:
        self.volume = volume
        self.boxes: list[Box] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.volume, name)

    def read_async(self, box: Box) -> Any:
        self.boxes.append(box)
        return self.volume.read_async(box)

    def read(self, box: Box) -> np.ndarray:
        self.boxes.append(box)
        return self.volume.read(box)


def test_what_a_block_reads_lies_in_its_read_box(tmp_path):
    """Peaks, small components (whose second, wider read comes only when a component is in doubt),
    relabelling and face contacts each read inside the box their stage says a block reads."""
    rng = np.random.default_rng(0)
    values = np.zeros((2, 40, 200), np.float32)
    values[0] = rng.random((40, 200))  # peaks
    values[1, 5, :90] = 1.0  # a line of 90 pixels: under min_px = 100, but in doubt after the first halo of 64
    stored = create_volume(str(tmp_path / "p.zarr"), shape=values.shape, dtype="float32",
                           voxel_size_nm=(8.0, 8.0, 8.0), chunk_shape=(2, 20, 20))
    stored.write(stored.bounds, values)
    labels = create_volume(str(tmp_path / "l.zarr"), shape=values.shape, dtype="uint64",
                           voxel_size_nm=(8.0, 8.0, 8.0), chunk_shape=(2, 20, 20))
    grid = BlockGrid.aligned(stored.bounds, (2, 20, 20), 0, stored.bounds, (2, 20, 20))
    recorded, readers = RecordingVolume(stored), RecordingVolume(labels)
    table = RelabelTable(np.zeros(grid.num_blocks, np.int64), np.zeros(grid.num_blocks, np.int64),
                         np.zeros(0, np.uint64), np.zeros(0, np.uint64), 0)
    merge_folder = parse_url(str(tmp_path / "merge"))
    open_kvstore(merge_folder).write("relabel/0", table.encode()).result()
    stages = [PeakStage(recorded, 0.5, (1, 3, 3)), MinAreaStage(recorded, 0.5, 100),
              ConfirmStage(recorded, 0.5, PointSet(np.zeros((0, 3))), 1, 100),
              RelabelStage(merge_folder, grid.num_blocks, readers),
              FaceContactStage(InstanceParams("connected_components", 0.5, connectivity=26), grid, readers)]
    outcomes = {}
    for stage in stages:
        for block in grid:
            recorded.boxes.clear()
            readers.boxes.clear()
            outcomes[stage.name, block.id] = run_block(stage, block)
            reads = recorded.boxes + readers.boxes
            assert reads and all(stage.read_box(block).contains(box) for box in reads), (stage.name, block.id)
    assert outcomes["min-area", 0]["wide_read"]  # the wider read was exercised, and stayed in the box
    assert outcomes["confirm", 0]["wide_read"]
