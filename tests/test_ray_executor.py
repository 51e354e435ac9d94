"""The Ray executor: same bytes as the serial executor, killed actors replaced, failing blocks reported
by id, a killed driver resumed, another model refused (`ray` marker: the session's local cluster)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import SMALL_UNET, marked_blocks, write_config
from tests.test_engine import CoreIdStage
from volseg.cli import main
from volseg.commands.run import run
from volseg.config import load_config, parse_config
from volseg.engine.ledger import MARK_SECONDS_ENV, BlockLedger
from volseg.engine.serial import SerialExecutor
from volseg.geometry import BlockGrid
from volseg.inference.job import SegmentationJob
from volseg.inference.segment import make_job, open_outputs, plan_segmentation
from volseg.io import create_volume, open_volume
from volseg.models import build_model
from volseg.models.checkpoint import save_checkpoint

pytestmark = pytest.mark.ray
THREADS = 2  # torch threads of the serial run and of each actor (same threads → same float bytes)


def outputs(config: dict) -> dict[str, np.ndarray]:
    return {name: open_volume(url).read(open_volume(url).bounds)
            for name, url in config["output"].items() if name in ("probabilities", "density")}


def ray_execution(**extra) -> dict:
    return {"block": [4, 32, 48], "executor": "ray", "actors": 2, "cpus_per_actor": THREADS, **extra}


@pytest.fixture
def reference(run_config, tmp_path):
    """The serial executor's outputs for the run_config model and grid."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        config = run_config(output={"probabilities": str(tmp_path / "serial.zarr/prob"),
                                    "density": str(tmp_path / "serial.zarr/density"), "chunk": [2, 16, 16]})
        run(parse_config(config), progress=False)
    finally:
        torch.set_num_threads(threads)
    return outputs(config)


def assert_same_bytes(config: dict, reference: dict[str, np.ndarray]) -> None:
    for name, values in outputs(config).items():
        assert values.dtype == reference[name].dtype
        assert values.tobytes() == reference[name].tobytes(), name


def test_ray_output_is_byte_identical_to_serial(ray_cluster, run_config, reference):
    config = run_config(execution=ray_execution())
    result = run(parse_config(config), progress=False)
    assert result.executor.startswith("Ray, 2 actors") and not result.failed
    assert result.stats.blocks_done == result.plan.grid.num_blocks == 18
    assert_same_bytes(config, reference)


def test_an_actor_killed_mid_run_is_replaced_and_the_output_is_unchanged(ray_cluster, run_config, reference):
    from volseg.engine.ray import RayExecutor

    config = run_config(execution=ray_execution())
    plan = plan_segmentation(parse_config(config))
    job = make_job(plan, open_outputs(plan))
    with RayExecutor(2, THREADS, 0, in_flight=2, max_attempts=3) as executor:
        victims = []

        def kill_first_actor(block, seconds, worker):
            if not victims:
                victims.append(executor.workers()[0]["pid"])
                os.kill(victims[0], signal.SIGKILL)

        stats = executor.run(job, plan.grid, on_done=kill_first_actor)
        assert executor.replaced == 1 and stats.retried >= 1 and not stats.failed
        assert victims[0] not in {w["pid"] for w in executor.workers()}
    assert stats.blocks_done == plan.grid.num_blocks
    assert_same_bytes(config, reference)


class FailsOnBlock(SegmentationJob):
    """A segmentation stage whose compute raises for one block id (on every attempt)."""

    bad_block = 5

    def compute(self, block, data):
        if block.id == self.bad_block:
            raise OSError(f"simulated storage failure in block {block.id}")
        return super().compute(block, data)


def test_a_block_failing_every_attempt_is_reported_and_the_rest_finish(ray_cluster, run_config, tmp_path):
    from volseg.engine.ray import RayExecutor

    plan = plan_segmentation(parse_config(run_config(execution=ray_execution())))
    good = make_job(plan, open_outputs(plan))
    job = FailsOnBlock(good.source, good.outputs, good.predictor, good.windows, good.blend, good.batch_windows)
    ledger = BlockLedger.beside(plan.outputs[0].url, plan.signature)
    with RayExecutor(2, THREADS, 0, in_flight=2, max_attempts=3) as executor:
        stats = executor.run(job, plan.grid, ledger=ledger)
    assert list(stats.failed) == [FailsOnBlock.bad_block]
    assert "simulated storage failure in block 5" in stats.failed[5]
    assert stats.retried == 2 and stats.blocks_done == plan.grid.num_blocks - 1
    assert sorted(ledger.done("segment")) == [i for i in range(plan.grid.num_blocks) if i != 5]


def test_cli_exits_non_zero_naming_failed_blocks_and_a_rerun_resumes(ray_cluster, run_config, reference, tmp_path,
                                                                    small_dataset, capsys):
    raw = tmp_path / "copy.zarr"
    shutil.copytree(small_dataset, raw)
    chunk = raw / "raw" / "0" / "c" / "2" / "1" / "1"                # z 8..9, y 32..63, x 32..63
    intact = chunk.read_bytes()
    chunk.write_bytes(b"not a compressed chunk")
    config = run_config(input={"url": f"{raw}/raw"}, execution=ray_execution(max_attempts=2))
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["run", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "blocks failed after 2 attempts: block ids" in err and "run the same command again" in err
    failed = int(err.split("block ids ")[1].split(",")[0].split(" ")[0])
    ledger = BlockLedger.beside(config["output"]["probabilities"], plan_segmentation(load_config(path)).signature)
    done_before = ledger.done("segment")
    assert failed not in done_before and 0 < len(done_before) < 18

    chunk.write_bytes(intact)                                   # the storage is repaired: rerun
    result = run(load_config(path), progress=False)
    assert result.passes[0].resumed == len(done_before)
    assert result.stats.blocks_done == 18 - len(done_before)
    assert_same_bytes(config, reference)


def test_a_killed_driver_resumes_only_unfinished_blocks(ray_cluster, run_config, reference, tmp_path):
    """Marks are written by the driver alone, so what a killed driver left marked stays as it is (its
    actors may still finish a block, which the resume then computes again)."""
    config = run_config(execution=ray_execution(actors=1, in_flight=1))
    path = write_config(tmp_path / "run.yaml", config)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address,
           MARK_SECONDS_ENV: "0.05"}  # marks reach storage while the run is still going
    driver = subprocess.Popen([sys.executable, "-m", "volseg.cli", "run", str(path), "--no-progress"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = config["output"]["probabilities"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and marked_blocks(output) < 3 and driver.poll() is None:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = marked_blocks(output)
    assert 3 <= done_before < 18, "the driver should be killed mid-run"

    result = run(load_config(path), progress=False)
    assert result.passes[0].resumed == done_before
    assert result.stats.blocks_done == 18 - done_before
    assert_same_bytes(config, reference)


def test_another_model_on_the_same_output_is_refused(ray_cluster, run_config, tmp_path, capsys):
    config = run_config(execution=ray_execution())
    assert main(["run", str(write_config(tmp_path / "a.yaml", config)), "--no-progress"]) == 0
    before = outputs(config)
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "other.safetensors", build_model(SMALL_UNET), SMALL_UNET, {"mode": "test"})
    config["model"]["checkpoint"] = str(other)
    assert main(["run", str(write_config(tmp_path / "b.yaml", config)), "--no-progress"]) == 2
    assert "holds the output of another volseg run" in capsys.readouterr().err
    for name, values in outputs(config).items():
        assert values.tobytes() == before[name].tobytes()


def test_serial_and_ray_executors_share_one_api():
    from volseg.engine.ray import RayExecutor

    assert list(SerialExecutor.run.__annotations__) == list(RayExecutor.run.__annotations__)


def test_relative_paths_reach_actors_in_another_working_directory(ray_cluster, run_config, reference, tmp_path,
                                                                   small_dataset, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)                                    # actors run elsewhere: paths travel absolute
    config = run_config(input={"url": os.path.relpath(f"{small_dataset}/raw")},
                        output={"probabilities": "rel.zarr/prob", "density": "rel.zarr/density", "chunk": [2, 16, 16]},
                        execution=ray_execution())
    result = run(parse_config(config), progress=False)
    assert not result.failed and (work / "rel.zarr/prob").is_dir()
    assert_same_bytes(config, reference)


def test_one_config_gives_one_set_of_bytes_on_either_executor(ray_cluster, run_config, tmp_path):
    """Default settings, no thread count set by hand: serial and Ray compute each block with
    execution.threads torch threads, so their bytes are identical (the thread count changes floats)."""
    written = {}
    for executor in ("serial", "ray"):
        config = run_config(output={"probabilities": str(tmp_path / f"{executor}.zarr/prob"),
                                    "density": str(tmp_path / f"{executor}.zarr/density"), "chunk": [2, 16, 16]},
                            execution={"block": [4, 32, 48], "executor": executor})
        run(parse_config(config), progress=False)
        written[executor] = outputs(config)
    for name, values in written["serial"].items():
        assert values.tobytes() == written["ray"][name].tobytes(), name


# --- many quick blocks, actors placed late ------------------------------------------------------------------


class QuickIds(CoreIdStage):
    """Writes each block's id + 1 into its core at once (blocks of microseconds: the executor packs them
    several to a task); block ``bad`` raises on every attempt."""

    bad = 77

    def compute(self, block, data):
        if block.id == self.bad:
            raise OSError(f"simulated failure of block {block.id}")
        return super().compute(block, data)


class ReportsPid(CoreIdStage):
    """Takes 20 ms a block; its outcome is the pid of the actor that ran it."""

    def compute(self, block, data):
        time.sleep(0.02)
        return super().compute(block, data)

    def outcome(self, block, computed):
        return os.getpid()


def id_volume(tmp_path, blocks: int):
    """A volume of ``blocks`` blocks of 2 × 8 × 8 voxels along y, and its grid (ids in y order)."""
    volume = create_volume(str(tmp_path / "ids.zarr"), shape=(2, 8 * blocks, 8), dtype="uint16",
                           voxel_size_nm=(8.0, 8.0, 8.0), chunk_shape=(2, 8, 8))
    return volume, BlockGrid.aligned(volume.bounds, (2, 8, 8), 0, volume.bounds, (2, 8, 8))


def test_quick_blocks_travel_several_to_a_task_and_a_failing_one_is_retried_alone(ray_cluster, tmp_path):
    from volseg.engine.ray import RayExecutor

    volume, grid = id_volume(tmp_path, 600)
    done = []
    with RayExecutor(2, 1, 0, in_flight=2, max_attempts=3) as executor:
        stats = executor.run(QuickIds(volume), iter(grid), on_done=lambda block, s, w: done.append(block.id))
        assert executor.batch_size() > 1
    good = [i for i in range(grid.num_blocks) if i != QuickIds.bad]
    assert sorted(done) == good  # every other block once, none repeated
    assert list(stats.failed) == [QuickIds.bad] and "simulated failure of block 77" in stats.failed[QuickIds.bad]
    assert stats.retried == 2 and stats.blocks_done == len(good)
    written = volume.read(volume.bounds)[0, :, 0].reshape(-1, 8)[:, 0]
    assert written.tolist() == [0 if i == QuickIds.bad else i + 1 for i in range(grid.num_blocks)]


def test_actors_waiting_for_resources_join_the_run_once_placed(ray_cluster, tmp_path):
    """Three actors of one CPU while a placement group holds 3 of the cluster's 4 CPUs: one is placed and
    starts at once; the others wait (as on an autoscaling cluster before its nodes join) and take blocks as
    soon as the group is removed. Nothing waits for the unplaced actors before the first block."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from volseg.engine.ray import RayExecutor

    volume, grid = id_volume(tmp_path, 160)
    group = placement_group([{"CPU": 3}])
    ray_cluster.get(group.ready(), timeout=60)
    with RayExecutor(3, 1, 0, in_flight=2) as executor:

        def blocks():
            for block in grid:
                if block.id == 40:  # the first 40 blocks ran on the one placed actor; now free the CPUs
                    assert executor.placed() == 1
                    remove_placement_group(group)
                    deadline = time.monotonic() + 120
                    while executor.placed() < 3 and time.monotonic() < deadline:
                        time.sleep(0.2)
                yield block

        stats = executor.run(ReportsPid(volume), blocks())
    pids = stats.outcomes
    assert stats.blocks_done == grid.num_blocks and not stats.failed
    assert len({pids[i] for i in range(40)}) == 1
    assert len({pids[i] for i in range(40, grid.num_blocks)}) == 3
    assert volume.read(volume.bounds)[0, :, 0].reshape(-1, 8)[:, 0].tolist() == [i + 1 for i in range(grid.num_blocks)]


def test_a_growing_pool_sizes_itself_to_the_cluster(ray_cluster, tmp_path):
    """With ``grow`` (no execution.actors on a joined cluster) the executor starts the actors that the
    cluster's CPUs hold, here 4 of one CPU, beyond the one it was given."""
    from volseg.engine.ray import RayExecutor

    volume, grid = id_volume(tmp_path, 120)
    with RayExecutor(1, 1, 0, in_flight=2, grow=True) as executor:

        def blocks():
            for block in grid:
                if block.id == 20:
                    deadline = time.monotonic() + 120
                    while executor.placed() < 4 and time.monotonic() < deadline:
                        time.sleep(0.2)
                yield block

        stats = executor.run(ReportsPid(volume), blocks())
        assert len(executor.slots) == 4
    assert len({stats.outcomes[i] for i in range(20, grid.num_blocks)}) == 4
