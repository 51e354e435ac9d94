"""A corpus of user mistakes over every verb (issue 12): each gets exit code 2, one line naming the
field or file, no traceback, and leaves every file under the working directory byte-identical.

Every case runs in its own copy of one working directory (the user's data, checkpoints and files),
with relative paths, as a user runs volseg from their project folder.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr

from tests.conftest import SMALL_UNET, TINY_PROMPTDAS
from volseg.cli import main
from volseg.data.synthetic import generate_volume
from volseg.io import create_volume
from volseg.models import build_model
from volseg.models.checkpoint import save_checkpoint

MAX_MESSAGE = 400  # characters of the one error line (the issue asks for about 300, plus the paths)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The user's working directory every case starts from."""
    root = tmp_path_factory.mktemp("work")
    data = generate_volume((10, 72, 80), "tem", seed=3)
    voxel = data.voxel_size_nm
    for name, array in (("raw", data.raw), ("mito", data.mito)):
        volume = create_volume(f"{root}/data.zarr/{name}", shape=array.shape, dtype=array.dtype, voxel_size_nm=voxel,
                               chunk_shape=(4, 32, 32))
        volume.write(volume.bounds, array)
    labels = create_volume(f"{root}/labels64.zarr", shape=(10, 72, 80), dtype="uint64", voxel_size_nm=voxel)
    labels.write(labels.bounds, data.mito.astype(np.uint64))
    nan = create_volume(f"{root}/nan.zarr", shape=(10, 72, 80), dtype="float32", voxel_size_nm=voxel)
    values = data.raw.astype(np.float32) / 255
    values[3, 5:8, 9:11] = np.nan
    nan.write(nan.bounds, values)
    small = create_volume(f"{root}/small.zarr", shape=(10, 40, 80), dtype="uint8", voxel_size_nm=voxel)
    small.write(small.bounds, data.raw[:, :40])
    zarr.open_array(f"{root}/empty.zarr", mode="w", shape=(0, 72, 80), chunks=(4, 32, 32), dtype="uint8",
                    dimension_names=["z", "y", "x"])
    two = zarr.open_array(f"{root}/twochannels.zarr", mode="w", shape=(2, 10, 72, 80), chunks=(1, 4, 32, 32),
                          dtype="uint8", dimension_names=["c", "z", "y", "x"])
    two[:] = 1
    results = zarr.open_array(f"{root}/results.zarr", mode="w", shape=(10, 72, 80), chunks=(2, 16, 16),
                              dtype="float32", dimension_names=["z", "y", "x"])
    results[:] = 0.25
    results.attrs["voxel_size_nm_zyx"] = list(voxel)
    torch.manual_seed(0)
    save_checkpoint(root / "unet.safetensors", build_model(SMALL_UNET), SMALL_UNET, {"mode": "test"})
    save_checkpoint(root / "promptdas.safetensors", build_model(TINY_PROMPTDAS), TINY_PROMPTDAS, {"mode": "test"})
    (root / "garbage.safetensors").write_bytes(b"\x00\x01 not safetensors")
    (root / "points.csv").write_text("z,y,x\n2,10,10\n5,40,60\n")
    (root / "outside.csv").write_text("z,y,x\n2,10,10\n50,40,60\n")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (root / "notes.txt").write_text("the user's notes\n")
    (root / "report.json").write_text('{"the user\'s": "own report"}\n')
    (root / "afile").write_text("a regular file\n")
    return root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


MODEL_UNET = {"name": "unet", "options": dict(SMALL_UNET.options), "checkpoint": "unet.safetensors"}
MODEL_PROMPTDAS = {"name": "promptdas", "options": dict(TINY_PROMPTDAS.options), "checkpoint": "promptdas.safetensors"}
RUN = {"input": {"url": "data.zarr/raw"}, "model": MODEL_UNET,
       "inference": {"window": [1, 32, 32], "stride": [1, 20, 24], "device": "cpu"},
       "output": {"probabilities": "out.zarr/prob", "chunk": [2, 16, 16]},
       "execution": {"block": [4, 32, 48], "executor": "serial"}}
TRAIN = {"model": {"name": "unet", "options": dict(SMALL_UNET.options)},
         "train": {"raw": {"url": "data.zarr/raw"}, "labels": {"url": "data.zarr/mito"}, "steps": 10**6,
                   "batch_size": 2, "crop": [1, 32, 32], "checkpoint": "new.safetensors"}}
ADAPT = {"model": {"name": "promptdas", "options": dict(TINY_PROMPTDAS.options)},
         "adapt": {"mode": "uda", "target": {"raw": {"url": "data.zarr/raw"}}, "init": "promptdas.safetensors",
                   "steps": 10**6, "batch_size": 2, "crop": [1, 32, 32], "checkpoint": "adapted.safetensors"}}
SAM = {"model": {"name": "sam", "options": {"variant": "tiny"}},
       "sam_adapt": {"method": "sam-prompt", "labelled": {"raw": {"url": "data.zarr/raw"},
                                                          "labels": {"url": "data.zarr/mito"}},
                     "steps": 10**6, "checkpoint": "sam.safetensors"}}
EVAL = {"eval": {"labels": {"url": "data.zarr/mito"}, "prediction": {"url": "results.zarr"}, "report": "r.json"}}
PEAKS = {"output": {"probabilities": "results.zarr", "density": "results.zarr"}}
DEMO = {"synthetic": [{"url": "data.zarr", "shape": [8, 64, 64]}],
        **{k: v for k, v in RUN.items() if k != "execution"}, "train": TRAIN["train"], "adapt": ADAPT["adapt"],
        "eval": {"labels": {"url": "data.zarr/mito"}}}


def edit(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted paths set (``output__probabilities=...``); ``None`` deletes."""
    config = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return config


@dataclass(frozen=True)
class Case:
    """``volseg VERB config.yaml ARGS`` with ``config`` written (a dict, raw text, or None: no file)."""

    name: str
    verb: str
    config: dict[str, Any] | str | None
    needles: tuple[str, ...]
    args: tuple[str, ...] = ()
    setup: Callable[[Path], Any] | None = field(default=None, compare=False)
    argv: tuple[str, ...] | None = None  # the whole command line, instead of VERB config ARGS
    env: tuple[tuple[str, str], ...] = ()


def _points(kind: str) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        (root / "clicks.json").write_bytes(b"\xff\xfe{not json" if kind == "binary" else b'{"layers": []}')
    return write


CASES = [
    # --- the command line and the config file ----------------------------------------------------------
    Case("no config file", "run", None, ("missing.yaml", "does not exist"), argv=("run", "missing.yaml")),
    Case("yaml syntax", "run", "input: {url: [unclosed\n", ("config.yaml", "line")),
    Case("top level list", "run", "- input\n- output\n", ("config.yaml", "mapping")),
    Case("misspelt section", "run", edit(RUN, inptu={"url": "x"}), ("inptu", "not a known field")),
    Case("misspelt field", "run", edit(RUN, inference__strid=[1, 8, 8]), ("inference.strid",)),
    Case("unknown verb", "run", None, ("invalid choice",), argv=("segment", "config.yaml")),
    Case("unknown option", "run", RUN, ("--bogus",), args=("--bogus",)),
    Case("no config argument", "run", None, ("config",), argv=("run",)),
    Case("empty config", "run", "", ("config.yaml", "mapping")),
    # --- run: the input ---------------------------------------------------------------------------------
    Case("no input section", "run", edit(RUN, input=None), ("input",)),
    Case("no output section", "run", edit(RUN, output=None), ("output",)),
    Case("missing input volume", "run", edit(RUN, input__url="absent.zarr/raw"), ("absent.zarr",)),
    Case("input is a plain folder", "run", edit(RUN, input__url="."), ("input.url",)),
    Case("input is an empty folder", "run", edit(RUN, input__url="nothing"), ("No volume found",),
         setup=lambda root: (root / "nothing").mkdir()),
    Case("input is a group", "run", edit(RUN, input__url="data.zarr"), ("data.zarr",)),
    Case("label volume as input", "run", edit(RUN, input__url="labels64.zarr"), ("input.url", "uint64")),
    Case("input with channels", "run", edit(RUN, input__url="twochannels.zarr"), ("twochannels.zarr", "channels")),
    Case("empty input", "run", edit(RUN, input__url="empty.zarr"), ("input.url", "empty.zarr", "empty")),
    Case("NaN in a float input", "run", edit(RUN, input__url="nan.zarr"), ("input.url", "nan.zarr", "6 NaN")),
    Case("unknown scheme", "run", edit(RUN, input__url="ftp://host/em.zarr"), ("ftp://",)),
    Case("unknown format prefix", "run", edit(RUN, input__url="tiff://data.zarr/raw"), ("tiff",)),
    Case("input is a file", "run", edit(RUN, input__url="notes.txt"), ("notes.txt",)),
    Case("negative scale", "run", edit(RUN, input__scale=-1), ("input.scale",)),
    Case("missing scale", "run", edit(RUN, input__scale=3), ("data.zarr/raw", "cale")),
    # cloud storage cannot be reached from this test environment: no credentials, no network (a real bucket
    # cannot exist here), which is exactly the mistake of a user without credentials
    Case("bucket without credentials", "run", edit(RUN, input__url="gs://volseg-no-such-bucket/em.zarr/raw"),
         ("gs://volseg-no-such-bucket", "credentials"), env=(("VOLSEG_STORAGE_TIMEOUT_S", "2"),)),
    Case("output bucket without credentials", "run", edit(RUN, output__probabilities="s3://volseg-nope/out.zarr"),
         ("s3://volseg-nope", "AWS"), env=(("VOLSEG_STORAGE_TIMEOUT_S", "2"),)),
    # --- run: the model ---------------------------------------------------------------------------------
    Case("no checkpoint", "run", edit(RUN, model__checkpoint=None), ("model.checkpoint",)),
    Case("missing checkpoint", "run", edit(RUN, model__checkpoint="absent.safetensors"), ("absent.safetensors",)),
    Case("garbage checkpoint", "run", edit(RUN, model__checkpoint="garbage.safetensors"), ("garbage.safetensors",)),
    Case("checkpoint of another model", "run", edit(RUN, model__checkpoint="promptdas.safetensors"),
         ("promptdas.safetensors",)),
    Case("unknown model", "run", edit(RUN, model__name="resnet"), ("resnet",)),
    Case("stride above window", "run", edit(RUN, inference__stride=[1, 40, 24]), ("stride 40",)),
    Case("tta on a non-square window", "run", edit(RUN, inference__window=[1, 32, 48], inference__tta=4),
         ("tta 4", "square")),
    Case("GPU that is not there", "run", edit(RUN, inference__device="cuda:3"), ("inference.device",)),
    Case("bad device", "run", edit(RUN, inference__device="tpu"), ("inference.device",)),
    Case("3D window for a 2D model", "run", edit(RUN, inference__window=[4, 32, 32]), ("window",)),
    # --- run: geometry ----------------------------------------------------------------------------------
    Case("roi outside", "run", edit(RUN, roi={"start": [0, 0, 0], "stop": [10, 80, 80]}), ("roi",)),
    Case("roi reversed", "run", edit(RUN, roi={"start": [5, 0, 0], "stop": [2, 72, 80]}), ("roi",)),
    Case("misaligned block", "run", edit(RUN, execution__block=[4, 24, 48]), ("axis y", "16")),
    Case("negative block", "run", edit(RUN, execution__block=[4, -32, 48]), ("execution.block",)),
    Case("shard not a chunk multiple", "run", edit(RUN, output__shard=[4, 24, 48]), ("shard",)),
    Case("threads zero", "run", edit(RUN, execution__threads=0), ("execution.threads",)),
    # --- run: the outputs ---------------------------------------------------------------------------------
    Case("output is the input", "run", edit(RUN, output__probabilities="./data.zarr/raw"), ("output.probabilities",),
         args=("--overwrite",)),
    Case("output inside the input's dataset", "run", edit(RUN, output__probabilities="data.zarr/prob"),
         ("output.probabilities", "data.zarr"), args=("--overwrite",)),
    Case("output holds the input", "run", edit(RUN, output__probabilities="data.zarr"), ("output.probabilities",)),
    Case("density is the probabilities", "run", edit(RUN, output__density="out.zarr/prob"), ("output.density",)),
    Case("foreign array with --overwrite", "run", edit(RUN, output__probabilities="results.zarr"),
         ("results.zarr", "did not write"), args=("--overwrite",)),
    Case("output under a file", "run", edit(RUN, output__probabilities="afile/out.zarr"), ("afile",)),
    Case("second output under a file", "run", edit(RUN, output__density="afile/d.zarr"), ("output.density", "afile")),
    Case("output is a file", "run", edit(RUN, output__probabilities="notes.txt"), ("notes.txt",)),
    Case("output over HTTP", "run", edit(RUN, output__probabilities="http://127.0.0.1:9/out.zarr"), ("http",)),
    Case("memory output on Ray", "run",
         edit(RUN, output__probabilities="memory://x/out.zarr", execution__executor="ray"), ("memory",)),
    Case("bad output dtype", "run", edit(RUN, output__dtype="int7"), ("output.dtype",)),
    Case("output with other geometry", "run", edit(RUN, output__dtype="uint8", output__probabilities="results.zarr"),
         ("results.zarr", "dtype"), args=("--overwrite",)),
    # --- run: prompts and instances ---------------------------------------------------------------------------
    Case("points outside the volume", "run", edit(RUN, model=MODEL_PROMPTDAS, prompts={"points": "outside.csv"}),
         ("outside.csv",)),
    Case("binary points file", "run", edit(RUN, model=MODEL_PROMPTDAS, prompts={"points": "binary.csv"}),
         ("binary.csv",)),
    Case("binary points JSON", "run", edit(RUN, model=MODEL_PROMPTDAS, prompts={"points": "clicks.json"}),
         ("clicks.json",), setup=_points("binary")),
    Case("points JSON without layers", "run", edit(RUN, model=MODEL_PROMPTDAS, prompts={"points": "clicks.json"}),
         ("clicks.json",), setup=_points("empty")),
    Case("missing points file", "run", RUN, ("absent.csv",), args=("--points", "absent.csv")),
    Case("points for a model without prompts", "run", edit(RUN, prompts={"points": "points.csv"}), ("prompts",)),
    Case("points and auto", "run", edit(RUN, prompts={"points": "points.csv", "auto": True}), ("prompts",)),
    Case("auto prompts without density", "run", edit(RUN, model=MODEL_PROMPTDAS, prompts={"auto": True}),
         ("output.density",)),
    Case("watershed without density", "run", edit(RUN, instances={"url": "inst.zarr"}), ("output.density",)),
    Case("instances over the probabilities", "run",
         edit(RUN, instances={"url": "out.zarr/prob", "method": "connected_components"}), ("instances.url",)),
    Case("instances in the input's dataset", "run",
         edit(RUN, instances={"url": "data.zarr/inst", "method": "connected_components"}), ("instances.url",)),
    Case("bad connectivity", "run", edit(RUN, instances={"url": "i.zarr", "connectivity": 7}), ("connectivity",)),
    # --- validate -----------------------------------------------------------------------------------------
    Case("validate: output is the input", "validate", edit(RUN, output__probabilities="data.zarr/raw"),
         ("output.probabilities",)),
    Case("validate: train volume missing", "validate", edit(TRAIN, train__raw__url="absent.zarr"), ("absent.zarr",)),
    Case("validate: adapt init missing", "validate", edit(ADAPT, adapt__init="absent.safetensors"),
         ("absent.safetensors",)),
    Case("validate: eval labels missing", "validate", edit(EVAL, eval__labels__url="absent.zarr"), ("absent.zarr",)),
    Case("validate: sam weights missing", "validate", edit(SAM, sam_adapt__sam_checkpoint="sam_vit_b.pth"),
         ("sam_vit_b.pth",)),
    Case("validate: checkpoint exists", "validate", edit(TRAIN, train__checkpoint="unet.safetensors"),
         ("train.checkpoint", "--overwrite")),
    Case("validate: target points outside", "validate",
         edit(ADAPT, adapt__mode="wda", adapt__target__points="outside.csv"), ("outside.csv",)),
    # --- train ----------------------------------------------------------------------------------------------
    Case("train: no section", "train", RUN, ("train",)),
    Case("train: raw missing", "train", edit(TRAIN, train__raw__url="absent.zarr"), ("absent.zarr",)),
    Case("train: labels of another shape", "train", edit(TRAIN, train__labels__url="small.zarr"), ("small.zarr",)),
    Case("train: checkpoint exists", "train", edit(TRAIN, train__checkpoint="unet.safetensors"),
         ("train.checkpoint", "--overwrite")),
    Case("train: foreign file with --overwrite", "train", edit(TRAIN, train__checkpoint="garbage.safetensors"),
         ("garbage.safetensors", "not written by volseg"), args=("--overwrite",)),
    Case("train: checkpoint under a file", "train", edit(TRAIN, train__checkpoint="afile/m.safetensors"), ("afile",)),
    Case("train: checkpoint not safetensors", "train", edit(TRAIN, train__checkpoint="model.pt"), ("model.pt",)),
    Case("train: checkpoint in the data", "train", edit(TRAIN, train__checkpoint="data.zarr/m.safetensors"),
         ("train.checkpoint", "data.zarr")),
    Case("train: card is the user's notes", "train", edit(TRAIN, train__checkpoint="report.safetensors"),
         ("report.json",), args=("--overwrite",)),
    Case("train: label volume as raw", "train", edit(TRAIN, train__raw__url="labels64.zarr"), ("train.raw.url",)),
    Case("train: zero steps", "train", edit(TRAIN, train__steps=0), ("train.steps",)),
    # --- adapt -----------------------------------------------------------------------------------------------
    Case("adapt: not Prompt-DAS", "adapt", edit(ADAPT, model=TRAIN["model"]), ("model.name",)),
    Case("adapt: wda without points", "adapt", edit(ADAPT, adapt__mode="wda"), ("points",)),
    Case("adapt: init missing", "adapt", edit(ADAPT, adapt__init="absent.safetensors"), ("absent.safetensors",)),
    Case("adapt: output is the init", "adapt", edit(ADAPT, adapt__checkpoint="promptdas.safetensors"),
         ("adapt.checkpoint", "adapt.init"), args=("--overwrite",)),
    Case("adapt: binary points", "adapt", edit(ADAPT, adapt__mode="wda", adapt__target__points="binary.csv"),
         ("binary.csv",)),
    Case("adapt: target missing", "adapt", edit(ADAPT, adapt__target__raw__url="absent.zarr"), ("absent.zarr",)),
    Case("adapt: delta_b above delta_f", "adapt", edit(ADAPT, adapt__delta_b=0.9), ("delta_b",)),
    Case("adapt: point confirmation without points", "adapt", edit(ADAPT, adapt__confirm_points_nm=100),
         ("confirm_points_nm", "wda")),
    # --- sam-adapt -------------------------------------------------------------------------------------------
    Case("sam-adapt: no section", "sam-adapt", RUN, ("sam_adapt",)),
    Case("sam-adapt: dfg without init", "sam-adapt", edit(SAM, sam_adapt__method="dfg",
                                                           sam_adapt__target={"raw": {"url": "data.zarr/raw"}}),
         ("init",)),
    Case("sam-adapt: checkpoint exists", "sam-adapt", edit(SAM, sam_adapt__checkpoint="unet.safetensors"),
         ("sam_adapt.checkpoint",)),
    # --- peaks -----------------------------------------------------------------------------------------------
    Case("peaks: out exists", "peaks", PEAKS, ("notes.txt", "exists"), args=("--out", "notes.txt")),
    Case("peaks: no density", "peaks", edit(PEAKS, output__density=None), ("output.density",), args=("--out", "p.csv")),
    Case("peaks: out inside the density", "peaks", PEAKS, ("--out", "output.density"),
         args=("--out", "results.zarr/p.csv")),
    Case("peaks: density missing", "peaks", edit(PEAKS, output__density="absent.zarr"), ("absent.zarr",),
         args=("--out", "p.csv")),
    # --- eval ------------------------------------------------------------------------------------------------
    Case("eval: no section", "eval", RUN, ("eval",)),
    Case("eval: labels missing", "eval", edit(EVAL, eval__labels__url="absent.zarr"), ("absent.zarr",)),
    Case("eval: shapes differ", "eval", edit(EVAL, eval__labels__url="small.zarr"), ("small.zarr", "shape")),
    Case("eval: report under a file", "eval", edit(EVAL, eval__report="afile/r.json"), ("eval.report", "afile")),
    Case("eval: report is the user's", "eval", edit(EVAL, eval__report="report.json"), ("report.json",)),
    Case("eval: report inside the labels", "eval", edit(EVAL, eval__report="data.zarr/mito/r.json"),
         ("eval.report",)),
    Case("eval: report is a folder", "eval", edit(EVAL, eval__report="data.zarr"), ("eval.report",)),
    # --- view and demo ---------------------------------------------------------------------------------------
    Case("view: port out of range", "view", RUN, ("--port", "99999"), args=("--port", "99999")),
    Case("view: port not a number", "view", RUN, ("--port",), args=("--port", "http")),
    Case("view: nothing to show", "view", edit(RUN, input__url="absent.zarr"), ("config.yaml",)),
    Case("demo: sections missing", "demo", RUN, ("synthetic",)),
    Case("demo: synthetic over the user's data", "demo", DEMO, ("data.zarr", "did not generate")),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, template: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    work = tmp_path / "work"
    shutil.copytree(template, work, symlinks=True)
    monkeypatch.chdir(work)
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    if case.setup is not None:
        case.setup(work)
    if isinstance(case.config, dict):
        (work / "config.yaml").write_text(yaml.safe_dump(case.config, sort_keys=False))
    elif isinstance(case.config, str):
        (work / "config.yaml").write_text(case.config)
    before = digest(work)
    argv = list(case.argv or (case.verb, "config.yaml", *case.args))
    if case.verb in ("run", "train", "adapt", "sam-adapt", "eval", "demo") and case.argv is None:
        argv.append("--no-progress")
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse
        code = exit.code
    captured = capsys.readouterr()
    err = captured.err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit {code}: {err}{captured.out}"
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert len(lines[0]) <= MAX_MESSAGE + sum(len(p) for p in argv) + len(str(work)) * 2, lines[0]
    for needle in case.needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert digest(work) == before


def test_the_corpus_covers_every_verb() -> None:
    verbs = {case.verb for case in CASES}
    assert verbs == {"run", "validate", "train", "adapt", "sam-adapt", "peaks", "eval", "view", "demo"}
    assert len(CASES) >= 60
