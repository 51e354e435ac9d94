"""Data safety (issue 12): an output never aliases an input, --overwrite replaces only what volseg
wrote, checkpoints are never replaced silently, two runs never write one output, and Ctrl-C or a bad
block stop cleanly. Each case reproduces a mistake that destroyed or mixed data before."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from tests.conftest import SMALL_UNET, TINY_PROMPTDAS, marked_blocks, write_config
from tests.test_cli import assert_user_error, run_cli, tree_digest
from volseg.cli import main
from volseg.engine.lease import LEASE_KEY, Lease, LeaseLostError, OutputBusyError, holder_record, holding
from volseg.io import create_volume, open_volume
from volseg.io.locations import container_of, location_of
from volseg.models import build_model
from volseg.models.checkpoint import save_checkpoint

SHAPE = (8, 64, 64)


@pytest.fixture
def user(tmp_path, monkeypatch, small_checkpoint):
    """A user's working directory: their own dataset ``user.zarr`` (raw, written with zarr-python, not
    volseg), a checkpoint, and a run config factory writing to ``output``."""
    monkeypatch.chdir(tmp_path)
    group = zarr.open_group("user.zarr", mode="w")
    raw = group.create_array("raw", shape=SHAPE, chunks=(4, 32, 32), dtype="uint8", dimension_names=["z", "y", "x"])
    raw[:] = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)
    group.attrs["voxel_size_nm_zyx"] = [40, 4, 4]

    def config(output: str, **overrides) -> Path:
        data = {"input": {"url": "user.zarr/raw"},
                "model": {"name": "unet", "options": dict(SMALL_UNET.options), "checkpoint": str(small_checkpoint)},
                "inference": {"window": [1, 32, 32], "stride": [1, 24, 24], "device": "cpu"},
                "output": {"probabilities": output, "chunk": [4, 32, 32]},
                "execution": {"executor": "serial"}, **overrides}
        return write_config(tmp_path / "run.yaml", data)

    return config


# --- 1. no output may be an input -------------------------------------------------------------------


@pytest.mark.parametrize("spelling", [
    "./user.zarr/raw", "{cwd}/user.zarr/raw", "{cwd}/user.zarr/raw/", "file://{cwd}/user.zarr/raw",
    "zarr3://user.zarr/raw", "user.zarr/raw|zarr3:", "user.zarr/other/../raw", "link.zarr/raw", "user.zarr//raw",
    "user.zarr/raw/prob", "user.zarr", "user.zarr/prob", "link.zarr/prob", ".",
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_in_or_holds_the_input_is_refused(user, tmp_path, capsys, spelling, overwrite):
    os.symlink(tmp_path / "user.zarr", tmp_path / "link.zarr")
    config = user(spelling.format(cwd=tmp_path))
    before = tree_digest(tmp_path)
    code, err = run_cli(["run", str(config), "--no-progress", *(["--overwrite"] if overwrite else [])], capsys)
    assert_user_error(code, err, "output.probabilities")
    assert "delete" not in err and "--overwrite" not in err
    assert tree_digest(tmp_path) == before


def test_every_output_field_and_input_is_guarded(user, tmp_path, capsys, small_checkpoint):
    points = tmp_path / "clicks.csv"
    points.write_text("z,y,x\n1,2,3\n")
    before = tree_digest(tmp_path / "user.zarr"), tree_digest(small_checkpoint.parent), points.read_bytes()
    cases = [
        ({"output": {"probabilities": "out.zarr/prob", "density": "user.zarr/raw"}}, "output.density"),
        ({"output": {"probabilities": "out.zarr/prob", "density": "out.zarr/prob/d"}}, "output.density"),
        ({"instances": {"url": "user.zarr/inst", "method": "connected_components"}}, "instances.url"),
        ({"output": {"probabilities": str(small_checkpoint.parent)}}, "model.checkpoint"),
        ({"output": {"probabilities": str(points)}}, "prompts.points"),
    ]
    for overrides, field in cases:
        data = yaml.safe_load(user("out.zarr/prob").read_text())
        data.update(overrides, prompts={"points": str(points)})
        config = write_config(tmp_path / "run.yaml", data)
        code, err = run_cli(["run", str(config), "--no-progress", "--overwrite"], capsys)
        assert_user_error(code, err, field)
    assert (tree_digest(tmp_path / "user.zarr"), tree_digest(small_checkpoint.parent), points.read_bytes()) == before
    assert not (tmp_path / "out.zarr").exists()


def test_locations_compare_resolved_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.zarr").mkdir()
    os.symlink(tmp_path / "data.zarr", tmp_path / "alias")
    same = ["data.zarr/raw", f"{tmp_path}/data.zarr/raw/", f"file://{tmp_path}/data.zarr/raw", "n5://data.zarr/raw",
            "alias/raw", "data.zarr/./x/../raw"]
    assert len({location_of(url) for url in same}) == 1
    assert location_of("gs://b/em/raw") == location_of("zarr3://gs://b/em//raw/")
    assert location_of("gs://b/em/raw") != location_of("s3://b/em/raw")
    assert location_of("gs://b/em/raw/x").relation(location_of("gs://b/em")) == "inside"
    assert location_of("memory://a/b").relation(location_of("memory://a/b/c")) == "contains"
    assert location_of("data.zarr/raw2").relation(location_of("data.zarr/raw")) is None


def test_the_container_of_a_volume_is_its_outermost_group(tmp_path):
    create_volume(f"{tmp_path}/em.n5/volumes/raw", shape=(2, 8, 8), dtype="uint8", voxel_size_nm=(1, 1, 1))
    (tmp_path / "em.n5" / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    assert container_of(f"{tmp_path}/em.n5/volumes/raw").path == f"{tmp_path}/em.n5/"
    create_volume(f"{tmp_path}/plain/raw", shape=(2, 8, 8), dtype="uint8", voxel_size_nm=(1, 1, 1))
    assert container_of(f"{tmp_path}/plain/raw").path == f"{tmp_path}/plain/raw/"  # an OME group stands alone
    assert container_of("memory://bucket/x.zarr/a/b").path == "bucket/x.zarr/"


# --- 2. --overwrite replaces only what volseg wrote ----------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_overwrite_never_replaces_an_array_volseg_did_not_write(user, tmp_path, capsys, overwrite):
    results = zarr.open_array("results.zarr", mode="w", shape=SHAPE, chunks=(4, 32, 32), dtype="float32",
                              dimension_names=["z", "y", "x"])
    results[:] = 0.25
    results.attrs["voxel_size_nm_zyx"] = [40, 4, 4]  # the same geometry as the output would have
    config = user("results.zarr")
    before = tree_digest(tmp_path)
    code, err = run_cli(["run", str(config), "--no-progress", *(["--overwrite"] if overwrite else [])], capsys)
    assert_user_error(code, err, "results.zarr", "did not write", "another path")
    assert "delete" not in err and "pass --overwrite" not in err
    assert tree_digest(tmp_path) == before
    assert np.all(zarr.open_array("results.zarr")[:] == 0.25)


def test_overwrite_replaces_the_output_of_another_volseg_run(user, tmp_path, capsys):
    assert main(["run", str(user("out.zarr/prob")), "--no-progress"]) == 0
    first = open_volume("out.zarr/prob").read(open_volume("out.zarr/prob").bounds)
    other = user("out.zarr/prob", inference={"window": [1, 32, 32], "stride": [1, 16, 16], "device": "cpu"})
    code, err = run_cli(["run", str(other), "--no-progress"], capsys)
    assert_user_error(code, err, "another volseg run", "--overwrite")
    assert main(["run", str(other), "--no-progress", "--overwrite"]) == 0
    assert not np.array_equal(open_volume("out.zarr/prob").read(open_volume("out.zarr/prob").bounds), first)


# --- 3. checkpoints are never replaced silently ---------------------------------------------------------


def _train_config(tmp_path: Path, small_dataset: Path, checkpoint: Path, spec=SMALL_UNET, **train) -> Path:
    data = {"model": {"name": spec.name, "options": dict(spec.options)},
            "train": {"raw": {"url": f"{small_dataset}/raw"}, "labels": {"url": f"{small_dataset}/mito"},
                      "steps": 2, "batch_size": 2, "crop": [1, 32, 32], "checkpoint": str(checkpoint), **train}}
    return write_config(tmp_path / "train.yaml", data)


def test_train_refuses_an_existing_checkpoint_unless_overwrite(tmp_path, small_dataset, capsys):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.safetensors", build_model(TINY_PROMPTDAS), TINY_PROMPTDAS,
                                 {"mode": "earlier"})
    config = _train_config(tmp_path, small_dataset, checkpoint)
    before = tree_digest(tmp_path)
    code, err = run_cli(["train", str(config), "--no-progress"], capsys)
    assert_user_error(code, err, "train.checkpoint", "already exists", "--overwrite")
    assert tree_digest(tmp_path) == before
    assert main(["train", str(config), "--no-progress", "--overwrite"]) == 0
    assert json.loads((tmp_path / "model.json").read_text())["model"]["name"] == "unet"


@pytest.mark.parametrize("foreign", ["model.safetensors", "model.json", "model_loss.png"])
def test_overwrite_never_replaces_checkpoint_files_volseg_did_not_write(tmp_path, small_dataset, capsys, foreign):
    (tmp_path / foreign).write_bytes(b"the user's own file")
    config = _train_config(tmp_path, small_dataset, tmp_path / "model.safetensors")
    before = tree_digest(tmp_path)
    code, err = run_cli(["train", str(config), "--no-progress", "--overwrite"], capsys)
    assert_user_error(code, err, foreign, "not written by volseg")
    assert tree_digest(tmp_path) == before


def test_checkpoint_paths_are_checked_before_training(tmp_path, small_dataset, capsys):
    (tmp_path / "afile").write_text("x")
    data = tree_digest(small_dataset)
    for path, needle in ((tmp_path / "afile" / "m.safetensors", "is a file"),
                         (tmp_path / "m.pt", ".safetensors"),
                         (small_dataset / "m.safetensors", "dataset that holds the input")):
        config = _train_config(tmp_path, small_dataset, path, steps=10**6)  # would train for hours
        before = tree_digest(tmp_path)
        code, err = run_cli(["train", str(config), "--no-progress"], capsys)
        assert_user_error(code, err, "train.checkpoint", needle)
        assert tree_digest(tmp_path) == before
    assert tree_digest(small_dataset) == data


def test_a_checkpoint_that_appears_while_training_is_kept(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"written meanwhile by another run")
    from volseg.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="appeared while this model trained"):
        save_checkpoint(path, build_model(SMALL_UNET), SMALL_UNET, {}, replace=False)
    assert path.read_bytes() == b"written meanwhile by another run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# --- 4. a run holds its outputs exclusively ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_one_of_two_runs_gets_the_lease(tmp_path, where):
    """``memory://`` stands in for a bucket: the same tensorstore conditional writes (a real gs:// or s3://
    bucket cannot be reached from this test environment)."""
    url = str(tmp_path / "out.zarr") if where == "local" else "memory://bucket/out.zarr"
    first, second = (Lease(url, run, 60, holder_record()) for run in ("run-a", "run-b"))
    assert first.acquire() is None
    with pytest.raises(OutputBusyError, match="run run-a"):
        second.acquire()
    first.token.confirm()
    first.renew()
    first.release()
    assert second.acquire() is None
    with pytest.raises(LeaseLostError):
        first.token.confirm()
    second.release()


def test_a_stale_lease_is_taken_over_and_its_holder_stops(tmp_path):
    url = str(tmp_path / "out.zarr")
    stalled = Lease(url, "stalled", 0.5, {**holder_record(), "domain": "another machine"})
    stalled.acquire()
    with pytest.raises(OutputBusyError):
        Lease(url, "next", 0.5, holder_record()).acquire()
    time.sleep(0.6)
    taker = Lease(url, "next", 0.5, holder_record())
    assert "took over" in taker.acquire()
    with pytest.raises(LeaseLostError):
        stalled.renew()
    with pytest.raises(LeaseLostError):
        stalled.token.confirm()
    stalled.release()  # not its lease any more: left alone
    taker.token.confirm()


def test_the_lease_of_a_killed_run_on_this_machine_is_taken_over_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {**holder_record(), "pid": int(dead.stdout)}
    Lease(str(tmp_path / "out.zarr"), "killed", 3600, record).acquire()
    assert "took over" in Lease(str(tmp_path / "out.zarr"), "next", 3600, holder_record()).acquire()


def test_leases_are_released_and_leave_no_folders(tmp_path):
    urls = [str(tmp_path / "new" / "a.zarr"), str(tmp_path / "new" / "b.zarr")]
    with holding(urls, 10) as leases:
        assert all((Path(u) / ".volseg" / LEASE_KEY).is_file() for u in urls)
        leases.check()
    assert not (tmp_path / "new").exists()


def test_two_concurrent_runs_on_one_output(user, tmp_path, small_checkpoint):
    """Two `volseg run` started together on one output with different configs: one writes it, the other is
    refused naming the holder (or the finished run); the output is exactly the winner's."""
    first = yaml.safe_load(user("out.zarr/prob").read_text())
    second = {**first, "inference": {**first["inference"], "stride": [1, 16, 16]}}
    write_config(tmp_path / "a.yaml", first)
    write_config(tmp_path / "b.yaml", second)
    procs = [subprocess.Popen([sys.executable, "-m", "volseg.cli", "run", name, "--no-progress"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("a.yaml", "b.yaml")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = ["a.yaml", "b.yaml"][[code for code, _ in results].index(0)]
    loser_err = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser_err
    assert "being written by another volseg run" in loser_err or "another volseg run" in loser_err
    mixed = open_volume("out.zarr/prob").read(open_volume("out.zarr/prob").bounds)
    assert main(["run", winner, "--no-progress", "--overwrite"]) == 0  # the winner's bytes, recomputed
    assert open_volume("out.zarr/prob").read(open_volume("out.zarr/prob").bounds).tobytes() == mixed.tobytes()


# --- 6. no traceback: a bad block, Ctrl-C ----------------------------------------------------------------


def test_a_corrupt_input_chunk_fails_its_block_by_id_with_the_serial_executor(user, tmp_path, capsys):
    chunk = tmp_path / "user.zarr" / "raw" / "c" / "1" / "1" / "0"
    chunk.write_bytes(b"not a zstd frame")
    config = user("out.zarr/prob", execution={"executor": "serial", "block": [4, 32, 32], "max_attempts": 2})
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 1 and "Traceback" not in err, err
    failed = re.search(r"(\d+) of 8 blocks failed after 2 attempts: block ids", err)
    assert failed is not None and 1 <= int(failed.group(1)) < 8, err
    assert "chunk" in err or "decod" in err.lower(), err
    assert marked_blocks(tmp_path / "out.zarr" / "prob") == 8 - int(failed.group(1))


def test_ctrl_c_stops_a_run_that_the_next_run_resumes(user, tmp_path):
    # many small blocks, so that the run cannot finish between its first done-mark and the signal
    config = user("out.zarr/prob", execution={"executor": "serial", "block": [2, 16, 16], "prefetch": 0},
                  inference={"window": [1, 32, 32], "stride": [1, 2, 2], "device": "cpu"})
    data = yaml.safe_load(config.read_text())
    data["output"]["chunk"] = [2, 16, 16]
    config.write_text(yaml.safe_dump(data))
    # Ctrl-C as a shell delivers it: the child starts with SIGINT's default action, whatever an earlier test
    # left in this process (a child inherits an ignored SIGINT, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen([sys.executable, "-m", "volseg.cli", "run", str(config), "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    marks = tmp_path / "out.zarr" / "prob" / ".volseg"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not marked_blocks(marks.parent) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert code == 130, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "volseg run: interrupted (Ctrl-C); blocks already written are marked done; run the same command again "
        "to resume."]
    assert not (marks / LEASE_KEY).exists()
    done = marked_blocks(marks.parent)
    assert 1 <= done < (SHAPE[0] // 2) * (SHAPE[1] // 16) * (SHAPE[2] // 16)


# --- 8. one config, one set of bytes ----------------------------------------------------------------------


def test_the_thread_count_is_part_of_the_run_signature(user, capsys):
    assert main(["run", str(user("out.zarr/prob")), "--no-progress"]) == 0
    other = user("out.zarr/prob", execution={"executor": "serial", "threads": 1})
    code, err = run_cli(["run", str(other), "--no-progress"], capsys)
    assert_user_error(code, err, "another volseg run")


def test_a_resume_on_another_kind_of_device_is_refused(user, tmp_path, capsys):
    """A run started on one device kind and continued on another would mix two sets of floats in one
    output (a GPU cannot run here: the stamp of a run started on a GPU is written by hand)."""
    config = user("out.zarr/prob", execution={"executor": "serial", "block": [4, 32, 32]})
    assert main(["run", str(config), "--no-progress"]) == 0
    volume = open_volume("out.zarr/prob", "r+")
    volume.update_attributes({"volseg": {**volume.attributes["volseg"], "device": "cuda"}})
    before = tree_digest(tmp_path / "out.zarr")
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert_user_error(code, err, "started on cuda", "cpu")
    assert tree_digest(tmp_path / "out.zarr") == before
    assert main(["run", str(config), "--no-progress", "--overwrite"]) == 0
    assert open_volume("out.zarr/prob").attributes["volseg"]["device"] == "cpu"
