"""`volseg train` and `volseg adapt` for Prompt-DAS, wired end to end (a few steps; values checked on the
checkpoint and its card, not the quality of so short a run)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_PROMPTDAS, write_config
from volseg.cli import main
from volseg.data.synthetic import generate_volume
from volseg.io import create_volume
from volseg.models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    urls = {}
    for name, domain, seed in (("source", "tem", 1), ("target", "fibsem", 2)):
        data = generate_volume((3, 64, 64), domain, seed)
        for array_name, array in (("raw", data.raw), ("mito", data.mito)):
            vol = create_volume(f"{root}/{name}.zarr/{array_name}", shape=array.shape, dtype=array.dtype,
                                voxel_size_nm=data.voxel_size_nm)
            vol.write(vol.bounds, array)
        urls[name] = f"{root}/{name}.zarr"
        if name == "target":
            centres = np.rint(data.centers_zyx[:3]).astype(int)
            (root / "points.csv").write_text("z,y,x\n" + "\n".join(",".join(map(str, c)) for c in centres))
    return urls, root / "points.csv", len(centres)


MODEL = {"name": TINY_PROMPTDAS.name, "options": dict(TINY_PROMPTDAS.options)}


def test_train_then_adapt(tmp_path, two_domains, capsys):
    urls, points, n_points = two_domains
    assert n_points >= 1
    train = {"raw": {"url": f"{urls['source']}/raw"}, "labels": {"url": f"{urls['source']}/mito"}, "steps": 3,
             "batch_size": 2, "crop": [1, 32, 32], "checkpoint": str(tmp_path / "source.safetensors")}
    config = write_config(tmp_path / "train.yaml", {"model": MODEL, "train": train})
    assert main(["train", str(config), "--no-progress"]) == 0
    card = json.loads((tmp_path / "source.json").read_text())
    assert card["mode"] == "source" and card["steps"] == 3 and (tmp_path / "source_loss.png").is_file()

    for mode in ("uda", "wda"):
        adapt = {"mode": mode, "source": {"raw": {"url": f"{urls['source']}/raw"},
                                          "labels": {"url": f"{urls['source']}/mito"}},
                 "target": {"raw": {"url": f"{urls['target']}/raw"}, "points": str(points)},
                 "init": str(tmp_path / "source.safetensors"), "steps": 2, "batch_size": 2, "crop": [1, 32, 32],
                 "checkpoint": str(tmp_path / f"{mode}.safetensors")}
        config = write_config(tmp_path / f"{mode}.yaml", {"model": MODEL, "adapt": adapt})
        assert main(["adapt", str(config), "--no-progress"]) == 0, capsys.readouterr().err
        card = json.loads((tmp_path / f"{mode}.json").read_text())
        assert card["mode"] == mode and card["steps"] == 2
        assert card["data"]["target"].endswith("target.zarr/raw") and card["data"]["target_points_count"] == n_points
        assert card["init"]["card"]["mode"] == "source"
    from volseg.models import ModelSpec

    load_checkpoint(tmp_path / "wda.safetensors", ModelSpec.from_json(card["model"]))

    # the adapted checkpoint feeds `volseg run` directly; the summary names it and its data
    run = {"model": MODEL | {"checkpoint": str(tmp_path / "wda.safetensors")},
           "input": {"url": f"{urls['target']}/raw"},
           "inference": {"window": [1, 32, 32], "stride": [1, 24, 24], "device": "cpu"},
           "output": {"probabilities": str(tmp_path / "run.zarr/prob")}, "execution": {"executor": "serial"}}
    assert main(["run", str(write_config(tmp_path / "run.yaml", run)), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert f"from {tmp_path / 'wda.safetensors'} (wda, on {urls['target']}/raw (source {urls['source']}/raw), " \
           "2 steps)" in summary


def test_adapt_refuses_a_non_promptable_model_and_wda_without_points(tmp_path, two_domains, capsys):
    urls = two_domains[0]
    adapt = {"mode": "uda", "target": {"raw": {"url": f"{urls['target']}/raw"}},
             "checkpoint": str(tmp_path / "x.safetensors")}
    config = write_config(tmp_path / "a.yaml", {"model": {"name": "unet"}, "adapt": adapt})
    assert main(["adapt", str(config)]) == 2
    assert "promptdas" in capsys.readouterr().err
    config = write_config(tmp_path / "b.yaml", {"model": MODEL, "adapt": {**adapt, "mode": "wda"}})
    assert main(["adapt", str(config)]) == 2
    assert "target.points" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_train_and_adapt_compute_with_their_sections_threads_whoever_calls_them(tmp_path, two_domains):
    """`train.threads` / `adapt.threads` hold for every caller of the commands (the demo calls them directly,
    not through the CLI verbs), the card records the threads used, and the caller's setting is restored."""
    import torch

    from volseg.commands.adapt import adapt
    from volseg.commands.train import train
    from volseg.config import load_config

    urls = two_domains[0]
    source = {"raw": {"url": f"{urls['source']}/raw"}, "labels": {"url": f"{urls['source']}/mito"}}
    common = {"steps": 1, "batch_size": 2, "crop": [1, 32, 32], "threads": 1}
    config = load_config(write_config(tmp_path / "c.yaml", {
        "model": MODEL,
        "train": {**source, **common, "checkpoint": str(tmp_path / "source.safetensors")},
        "adapt": {"mode": "uda", "source": source, "target": {"raw": {"url": f"{urls['target']}/raw"}},
                  "init": str(tmp_path / "source.safetensors"), **common,
                  "checkpoint": str(tmp_path / "uda.safetensors")}}))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train(config, progress=False)
        assert torch.get_num_threads() == 2
        adapt(config, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for name in ("source", "uda"):
        card = json.loads((tmp_path / f"{name}.json").read_text())
        assert card["threads"] == 1 and card["workers"] == 1
