"""`volseg run` / `validate` end to end, and every kind of bad input: exit code 2, one clear line
naming the field or file, no traceback, nothing written or overwritten."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import SMALL_UNET, TINY_PROMPTDAS, write_config
from volseg.cli import main
from volseg.geometry import Box
from volseg.inference.blockwise import predict_box
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.io import create_volume, open_volume
from volseg.models import input_contract
from volseg.models.checkpoint import load_checkpoint


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_cli(args, capsys) -> tuple[int, str]:
    """The exit code and stderr of this one command (what earlier commands printed is dropped)."""
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def whole_volume_prediction(raw, checkpoint):
    predictor = TorchPredictor(load_checkpoint(checkpoint, SMALL_UNET), input_contract(SMALL_UNET), (1, 32, 32), 1)
    windows = WindowGrid(raw.shape, (1, 32, 32), (1, 20, 24))
    return predict_box(raw.read(raw.bounds), predictor, windows, raw.bounds)


def test_run_writes_the_whole_volume_prediction(tmp_path, run_config, small_checkpoint, capsys):
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 0, err
    prob = open_volume(str(tmp_path / "out.zarr/prob"))
    density = open_volume(str(tmp_path / "out.zarr/density"))
    raw = open_volume(run_config()["input"]["url"])
    assert prob.voxel_size_nm == raw.voxel_size_nm and prob.shape == raw.shape
    assert prob.chunk_shape == (2, 16, 16)
    whole = whole_volume_prediction(raw, small_checkpoint)
    np.testing.assert_allclose(prob.read(prob.bounds), whole[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(density.read(density.bounds), whole[1], atol=1e-5, rtol=0)
    # the same run again is accepted (same signature) and gives the same bytes
    before = tree_digest(tmp_path / "out.zarr/prob")
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 0, err
    assert tree_digest(tmp_path / "out.zarr/prob") == before


def test_ortho_planes_run_on_cubic_voxels_and_are_refused_on_stretched_ones(tmp_path, run_config, small_checkpoint,
                                                                            capsys):
    from volseg.data.synthetic import generate_volume
    from volseg.inference.planes import PLANE_SETS

    data = generate_volume((10, 72, 80), "fibsem", seed=4)  # 8 nm cubes
    cubic = create_volume(str(tmp_path / "fib.zarr/raw"), shape=data.raw.shape, dtype=data.raw.dtype,
                          voxel_size_nm=data.voxel_size_nm, chunk_shape=(4, 32, 32))
    cubic.write(cubic.bounds, data.raw)
    inference = {**run_config()["inference"], "planes": "ortho"}
    config = write_config(tmp_path / "ortho.yaml", run_config(input={"url": str(tmp_path / "fib.zarr/raw")},
                                                              inference=inference))
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 0, err
    model = load_checkpoint(small_checkpoint, SMALL_UNET)
    predictor = TorchPredictor(model, input_contract(SMALL_UNET), (1, 32, 32), 1)
    windows = WindowGrid(cubic.shape, (1, 32, 32), (1, 20, 24))
    whole = predict_box(data.raw, predictor, windows, cubic.bounds, planes=PLANE_SETS["ortho"])
    np.testing.assert_allclose(open_volume(str(tmp_path / "out.zarr/prob")).read(cubic.bounds), whole[0],
                               atol=1e-5, rtol=0)
    # serial-section voxels (40 × 4 × 4 nm): ortho is refused before anything is written; auto reads xy
    stretched = write_config(tmp_path / "stretched.yaml", run_config(
        inference=inference, output={"probabilities": str(tmp_path / "tem.zarr/prob"), "chunk": [2, 16, 16]}))
    assert_user_error(*run_cli(["run", str(stretched), "--no-progress"], capsys), "inference.planes", "stretched")
    assert not (tmp_path / "tem.zarr").exists()
    auto = write_config(tmp_path / "auto.yaml", run_config(
        inference={**inference, "planes": "auto"},
        output={"probabilities": str(tmp_path / "tem.zarr/prob"), "chunk": [2, 16, 16]}))
    code, err = run_cli(["run", str(auto), "--no-progress"], capsys)
    assert code == 0, err
    raw = open_volume(run_config()["input"]["url"])
    np.testing.assert_allclose(open_volume(str(tmp_path / "tem.zarr/prob")).read(raw.bounds),
                               whole_volume_prediction(raw, small_checkpoint)[0], atol=1e-5, rtol=0)


def test_ortho_warns_of_thin_blocks_only_where_windows_are_recomputed(tmp_path, run_config, caplog):
    from volseg.config import load_config
    from volseg.data.synthetic import generate_volume
    from volseg.inference.segment import plan_segmentation

    data = generate_volume((10, 72, 80), "fibsem", seed=4)  # 8 nm cubes
    cubic = create_volume(str(tmp_path / "fib.zarr/raw"), shape=data.raw.shape, dtype=data.raw.dtype,
                          voxel_size_nm=data.voxel_size_nm, chunk_shape=(4, 32, 32))
    cubic.write(cubic.bounds, data.raw)
    inference = {**run_config()["inference"], "planes": "ortho"}  # windows 32 deep in xz and yz
    # blocks 4 deep: 3 blocks over 10 slices each compute the xz / yz windows; a 4-slice ROI is one block deep
    for roi, warns in ((None, True), ({"start": [2, 0, 0], "stop": [6, 72, 80]}, False)):
        path = write_config(tmp_path / f"thin{warns}.yaml", run_config(
            input={"url": str(tmp_path / "fib.zarr/raw")}, inference=inference,
            **({} if roi is None else {"roi": roi})))
        caplog.clear()
        with caplog.at_level("WARNING"):
            plan = plan_segmentation(load_config(path))
        assert plan.grid.grid_shape[0] == (3 if warns else 1)
        assert ("computed by every block it reaches" in caplog.text) == warns, caplog.text


@pytest.mark.parametrize(
    ("name", "shard", "dtype"),
    [("out.n5/prob", None, "float32"), ("precomputed://{tmp}/prob_pc", None, "float32"),
     ("zarr2://{tmp}/out2.zarr/prob", None, "float32"), ("out3.zarr/prob", [4, 32, 48], "uint8")],
)
def test_run_into_every_output_format(tmp_path, run_config, small_checkpoint, capsys, name, shard, dtype):
    url = name.format(tmp=tmp_path) if "{tmp}" in name else str(tmp_path / name)
    output = {"probabilities": url, "chunk": [2, 16, 16], "dtype": dtype}
    if shard:
        output["shard"] = shard
    config = write_config(tmp_path / "run.yaml", run_config(output=output))
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 0, err
    prob = open_volume(url)
    assert prob.write_chunk == tuple(shard or (2, 16, 16))
    whole = whole_volume_prediction(open_volume(run_config()["input"]["url"]), small_checkpoint)[0]
    if dtype == "uint8":
        whole = np.rint(whole * 255)
    np.testing.assert_allclose(prob.read(prob.bounds), whole, atol=1e-5 if dtype == "float32" else 1, rtol=0)


def test_validate_checks_everything_and_writes_nothing(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config())
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "blocks of core (4, 32, 48)" in out
    assert not (tmp_path / "out.zarr").exists()


def test_console_script_exit_code_and_message(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", {"inptu": {"url": "x"}})
    proc = subprocess.run([sys.executable, "-m", "volseg.cli", "validate", str(bad)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "inptu" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_config_file(tmp_path, capsys):
    code, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert_user_error(code, err, "nope.yaml", "does not exist")


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("input:\n  url: [unclosed\nmodel: {}\n")
    code, err = run_cli(["run", str(path)], capsys)
    assert_user_error(code, err, "broken.yaml", "line")


@pytest.mark.parametrize(
    ("section", "value", "needles"),
    [
        ("inference", {"window": [1, 32, 32], "strid": [1, 8, 8]}, ["inference.strid", "not a known field"]),
        ("inference", {"window": [1, 32, 32], "stride": [1, 40, 8]}, ["stride 40", "axis y"]),
        ("inference", {"window": [1, 32, 32], "blend": "median"}, ["inference.blend", "cosine"]),
        ("output", {"probabilities": "x.zarr", "dtype": "int7"}, ["output.dtype", "float32"]),
        ("execution", {"block": [4, -32, 48]}, ["execution.block"]),
    ],
)
def test_config_errors_name_the_field(tmp_path, run_config, capsys, section, value, needles):
    config = write_config(tmp_path / "run.yaml", run_config(**{section: value}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "run.yaml", *needles)
    assert not (tmp_path / "out.zarr").exists()


def test_missing_input_volume(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config(input={"url": str(tmp_path / "absent.zarr")}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "absent.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_wrong_input_dtype(tmp_path, run_config, capsys):
    labels = create_volume(str(tmp_path / "labels.zarr"), shape=(4, 32, 32), dtype="uint64",
                           voxel_size_nm=(40, 4, 4))
    config = write_config(tmp_path / "run.yaml", run_config(input={"url": labels.url}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "input.url", "uint64", "uint8")
    assert not (tmp_path / "out.zarr").exists()


def test_wrong_axis_order(tmp_path, run_config, capsys):
    group = zarr.open_group(str(tmp_path / "xyz.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=(32, 32, 4), dtype="uint8", chunks=(32, 32, 4))
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "xyz"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [4, 4, 40]}]}],
    }]
    config = write_config(tmp_path / "run.yaml", run_config(input={"url": str(tmp_path / "xyz.zarr")}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "xyz.zarr", "z")
    assert not (tmp_path / "out.zarr").exists()


def test_existing_output_with_other_geometry_is_untouched(tmp_path, run_config, capsys):
    other = create_volume(str(tmp_path / "out.zarr/prob"), shape=(10, 72, 80), dtype="float32",
                          voxel_size_nm=(40, 4, 4), chunk_shape=(5, 36, 40))
    other.write(other.bounds, np.full(other.shape, 7, np.float32))
    before = tree_digest(tmp_path / "out.zarr")
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--overwrite"], capsys)
    assert_user_error(code, err, "out.zarr/prob", "chunk_shape")
    assert tree_digest(tmp_path / "out.zarr") == before


def test_misaligned_blocks(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config(execution={"block": [4, 24, 48]}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "axis y", "multiple of 16")
    assert not (tmp_path / "out.zarr").exists()


def test_checkpoint_that_does_not_fit(tmp_path, run_config, small_checkpoint, capsys):
    model = {"name": "unet", "options": {"dims": 2, "width": 8, "levels": 2}, "checkpoint": str(small_checkpoint)}
    config = write_config(tmp_path / "run.yaml", run_config(model=model))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, str(small_checkpoint), "width")
    assert not (tmp_path / "out.zarr").exists()


def test_checkpoint_whose_card_is_gone_is_checked_by_shapes(tmp_path, run_config, small_checkpoint, capsys):
    weights = tmp_path / "bare.safetensors"
    weights.write_bytes(small_checkpoint.read_bytes())  # no .json card beside it
    model = {"name": "unet", "options": {"dims": 2, "width": 8, "levels": 2}, "checkpoint": str(weights)}
    config = write_config(tmp_path / "run.yaml", run_config(model=model))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "bare.safetensors", "shape mismatch")


def test_missing_checkpoint(tmp_path, run_config, capsys):
    model = {"name": "unet", "options": dict(SMALL_UNET.options), "checkpoint": str(tmp_path / "no.safetensors")}
    config = write_config(tmp_path / "run.yaml", run_config(model=model))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "no.safetensors", "model.checkpoint")


def test_output_of_another_run_is_refused_unless_overwrite(tmp_path, run_config, capsys):
    first = write_config(tmp_path / "a.yaml", run_config())
    assert main(["run", str(first), "--no-progress"]) == 0
    before = tree_digest(tmp_path / "out.zarr")
    changed = run_config(inference={"window": [1, 32, 32], "stride": [1, 16, 16], "device": "cpu"})
    second = write_config(tmp_path / "b.yaml", changed)
    capsys.readouterr()
    code, err = run_cli(["run", str(second), "--no-progress"], capsys)
    assert_user_error(code, err, "another volseg run", "--overwrite")
    assert tree_digest(tmp_path / "out.zarr") == before
    assert main(["run", str(second), "--no-progress", "--overwrite"]) == 0
    assert tree_digest(tmp_path / "out.zarr") != before


def test_output_that_is_the_input(tmp_path, run_config, capsys):
    cfg = run_config()
    cfg["output"] = {"probabilities": cfg["input"]["url"]}
    config = write_config(tmp_path / "run.yaml", cfg)
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "input")


def test_roi_outside_the_volume(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config(roi={"start": [0, 0, 0], "stop": [10, 80, 80]}))
    code, err = run_cli(["run", str(config)], capsys)
    assert_user_error(code, err, "roi")
    assert not (tmp_path / "out.zarr").exists()


def promptdas_config(run_config, checkpoint):
    model = {"name": TINY_PROMPTDAS.name, "options": dict(TINY_PROMPTDAS.options), "checkpoint": str(checkpoint)}
    return run_config(model=model)


def test_run_with_point_prompts(tmp_path, run_config, promptdas_checkpoint, capsys):
    (tmp_path / "clicks.csv").write_text("z,y,x\n2,30,40\n5,10,70\n")
    config = write_config(tmp_path / "run.yaml", promptdas_config(run_config, promptdas_checkpoint))
    code, err = run_cli(["run", str(config), "--no-progress", "--points", str(tmp_path / "clicks.csv")], capsys)
    assert code == 0, err
    prompted = open_volume(str(tmp_path / "out.zarr/prob")).read(Box.from_shape((10, 72, 80)))
    # another prompt set is another result: refused on the same output, accepted elsewhere
    (tmp_path / "other.csv").write_text("z,y,x\n2,31,40\n")
    code, err = run_cli(["run", str(config), "--no-progress", "--points", str(tmp_path / "other.csv")], capsys)
    assert_user_error(code, err, "another volseg run")
    cfg = promptdas_config(run_config, promptdas_checkpoint)
    cfg["output"] = {"probabilities": str(tmp_path / "plain.zarr/prob"), "chunk": [2, 16, 16]}
    code, err = run_cli(["run", str(write_config(tmp_path / "plain.yaml", cfg)), "--no-progress"], capsys)
    assert code == 0, err
    plain = open_volume(str(tmp_path / "plain.zarr/prob")).read(Box.from_shape((10, 72, 80)))
    changed = np.abs(prompted - plain) > 1e-4
    assert changed[2].any() and changed[5].any()  # slices with a click change
    assert not changed[0].any() and not changed[9].any()  # slices without one do not


def test_points_outside_the_volume(tmp_path, run_config, promptdas_checkpoint, capsys):
    (tmp_path / "clicks.csv").write_text("z,y,x\n2,30,40\n12,10,70\n")
    config = write_config(tmp_path / "run.yaml", promptdas_config(run_config, promptdas_checkpoint))
    code, err = run_cli(["run", str(config), "--points", str(tmp_path / "clicks.csv")], capsys)
    assert_user_error(code, err, "clicks.csv", "outside the volume")
    assert not (tmp_path / "out.zarr").exists()


def test_points_for_a_model_without_prompts(tmp_path, run_config, capsys):
    (tmp_path / "clicks.csv").write_text("z,y,x\n2,30,40\n")
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--points", str(tmp_path / "clicks.csv")], capsys)
    assert_user_error(code, err, "takes no prompts", "promptdas")
    assert not (tmp_path / "out.zarr").exists()


def test_points_only_to_confirm(tmp_path, run_config, capsys):
    """A model without prompts takes --points with --confirm-nm: they only confirm components. Without
    points, --confirm-nm is refused before anything is written."""
    (tmp_path / "clicks.csv").write_text("z,y,x\n2,30,40\n")
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--confirm-nm", "100"], capsys)
    assert_user_error(code, err, "--confirm-nm", "--points")
    assert not (tmp_path / "out.zarr").exists()
    code, err = run_cli(["run", str(config), "--points", str(tmp_path / "clicks.csv"), "--confirm-nm", "-1"], capsys)
    assert_user_error(code, err, "--confirm-nm", "negative")
    assert not (tmp_path / "out.zarr").exists()
    capsys.readouterr()
    code = main(["run", str(config), "--no-progress", "--points", str(tmp_path / "clicks.csv"), "--confirm-nm", "100"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "confirm: " in printed.out and "prompts: 1 points" in printed.out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"volseg {importlib.metadata.version('volseg')}"


def test_set_overrides_a_config_value_as_the_file_would(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config())
    assert main(["validate", str(config), "--set", "execution.block=[2, 32, 48]"]) == 0
    assert "blocks of core (2, 32, 48)" in capsys.readouterr().out
    # a new section, and several overrides in order (the last wins)
    assert main(["validate", str(config), "--set", "execution.block=[8, 32, 48]",
                 "--set", "execution.block=[4, 16, 48]", "--set", f"eval.labels.url={run_config()['input']['url']}",
                 "--set", "eval.threshold=0.7"]) == 0
    assert "blocks of core (4, 16, 48)" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "needles"), [
    ("execution.block=[3, 32, 48]", ["execution", "block"]),     # misaligned with the chunks, as in a file
    ("inference.batch_size=-1", ["inference", "batch_size"]),    # out of range
    ("execution.blok=[4, 32, 48]", ["blok"]),                    # an unknown field
    ("execution.block", ["--set", "section.field=value"]),       # no value
    ("input.url.x=1", ["--set", "input.url", "not a section"]),  # through a value
])
def test_a_bad_override_is_one_line_naming_it(tmp_path, run_config, capsys, override, needles):
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--no-progress", "--set", override], capsys)
    assert_user_error(code, err, *needles)
    assert not (tmp_path / "out.zarr").exists()


def test_without_bars_a_run_writes_plain_progress_lines(tmp_path, run_config, capsys):
    config = write_config(tmp_path / "run.yaml", run_config())
    code, err = run_cli(["run", str(config), "--no-progress"], capsys)
    assert code == 0, err
    assert re.search(r"segmenting: (\d+)/\1 blocks \(100%\), [\d.]+ Mvox/s, took \d+ s", err), err
    # -q keeps only warnings and errors
    code, err = run_cli(["run", str(config), "-q"], capsys)
    assert code == 0 and err == ""


# --- convert ------------------------------------------------------------------------------------------


def _stack(folder: Path, planes: np.ndarray, suffix: str = "png") -> None:
    from PIL import Image

    folder.mkdir()
    for z, plane in enumerate(planes):  # numbered without padding: 10 sorts after 9
        Image.fromarray(plane).save(folder / f"im{z}.{suffix}")


def test_convert_writes_a_stack_into_a_new_volume(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 255, (12, 33, 40), dtype=np.uint8)
    labels = rng.integers(0, 60000, (12, 33, 40)).astype(np.uint16)
    _stack(tmp_path / "im", grey)
    _stack(tmp_path / "seg", labels, "tif")
    code, err = run_cli(["convert", str(tmp_path / "im"), f"{tmp_path}/v.zarr/im", "--voxel-size-nm", "30", "8", "8",
                         "--chunk", "5", "16", "16", "--no-progress"], capsys)
    assert code == 0, err
    volume = open_volume(f"{tmp_path}/v.zarr/im")
    assert volume.voxel_size_nm == (30.0, 8.0, 8.0) and volume.chunk_shape == (5, 16, 16)
    np.testing.assert_array_equal(volume.read(volume.bounds), grey)
    code, err = run_cli(["convert", f"{tmp_path}/seg/*.tif", f"precomputed://{tmp_path}/seg_pc", "--voxel-size-nm",
                         "30", "8", "8", "--labels", "--no-progress"], capsys)
    assert code == 0, err
    segmentation = open_volume(f"precomputed://{tmp_path}/seg_pc")
    assert segmentation.kind == "segmentation"
    np.testing.assert_array_equal(segmentation.read(segmentation.bounds), labels)

    before = sorted(p.name for p in (tmp_path / "im").iterdir())
    for args, needles in [
        ([str(tmp_path / "im"), f"{tmp_path}/v.zarr/im"], ("exists",)),             # never over a volume
        ([str(tmp_path / "im"), str(tmp_path / "im" / "out.zarr")], ("SLICES",)),  # never into the slices
        ([f"{tmp_path}/nothing/*.png", f"{tmp_path}/n.zarr"], ("no image files match",)),
    ]:
        code, err = run_cli(["convert", *args, "--voxel-size-nm", "30", "8", "8", "--no-progress"], capsys)
        assert_user_error(code, err, *needles)
    assert sorted(p.name for p in (tmp_path / "im").iterdir()) == before


def test_convert_names_a_slice_that_does_not_fit(tmp_path, capsys) -> None:
    _stack(tmp_path / "im", np.zeros((3, 8, 8), np.uint8))
    from PIL import Image

    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "im" / "im3.png")
    code, err = run_cli(["convert", str(tmp_path / "im"), f"{tmp_path}/v.zarr", "--voxel-size-nm", "1", "1", "1",
                         "--chunk", "2", "8", "8", "--no-progress"], capsys)
    assert_user_error(code, err, "im3.png", "9×8")
