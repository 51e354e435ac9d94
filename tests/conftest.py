"""Shared fixtures: a small synthetic EM volume on disk and a small checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

# The tests' Ray cluster is local: its workers run in this interpreter's environment. Ray would otherwise
# start each worker through `uv run` when pytest runs under it (its uv hook), re-checking and
# byte-compiling the whole environment per worker (about 1 s each, and 25 s for the first).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import pytest
import torch
import yaml

from volseg.data.synthetic import generate_volume
from volseg.engine.lease import STATE_DIRECTORY
from volseg.engine.ledger import decode_group
from volseg.io import create_volume, open_volume
from volseg.models import ModelSpec, build_model
from volseg.models.checkpoint import save_checkpoint

SMALL_UNET = ModelSpec("unet", options={"dims": 2, "width": 4, "levels": 2})
TINY_PROMPTDAS = ModelSpec("promptdas", options={"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2,
                                                  "decoder_mlp": 32, "projection_dim": 8})
#: A small Prompt-DAS with the CNN encoder (BatchNorm), stopped at stride 8: the default stride 32 adds the
#: ResNet's last two stages, 10 M parameters that tests of calibration, TTA and adaptation do not need.
CNN_PROMPTDAS = ModelSpec("promptdas", options={"encoder": "cnn", "encoder_stride": 8, "decoder_dim": 32,
                                                "decoder_heads": 2, "decoder_mlp": 32, "projection_dim": 8})


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A 10×72×80 synthetic volume (odd, non-chunk-multiple sizes) with raw and mito arrays."""
    root = tmp_path_factory.mktemp("data") / "small.zarr"
    data = generate_volume((10, 72, 80), "tem", seed=3)
    for name, array in (("raw", data.raw), ("mito", data.mito)):
        vol = create_volume(f"{root}/{name}", shape=array.shape, dtype=array.dtype,
                            voxel_size_nm=data.voxel_size_nm, chunk_shape=(4, 32, 32))
        vol.write(vol.bounds, array)
    return root


@pytest.fixture(scope="session")
def promptdas_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) tiny Prompt-DAS checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "promptdas.safetensors"
    return save_checkpoint(path, build_model(TINY_PROMPTDAS), TINY_PROMPTDAS, {"mode": "test"})


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) small U-Net checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "unet.safetensors"
    return save_checkpoint(path, build_model(SMALL_UNET), SMALL_UNET, {"mode": "test"})


def pytest_collection_modifyitems(config, items):
    """A file's `ray` tests run after its other tests, so its Ray cluster (:func:`ray_cluster`) exists only
    while they run: code that picks Ray when a cluster is connected sees none in the other tests. The test
    command runs two pytest-xdist workers (``-n 2 --dist loadfile``), each taking whole files."""
    items.sort(key=lambda item: (item.path, item.get_closest_marker("ray") is not None))


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the `ray`-marked tests of a file, shut down after them (4 logical CPUs on
    2 cores, so two actors or two training workers fit beside the driver). Tests that need their own
    cluster (`ray start --head`, `ray job submit`) start it as a separate process instead."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One CPU torch thread, like each Ray worker of one CPU: the same float arithmetic as they do, and no
    oversubscription of a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def marked_blocks(output: Path | str, stage: str = "segment") -> int:
    """How many blocks of ``stage`` the done-marks inside the output at ``output`` hold (any signature)."""
    groups = (Path(output) / STATE_DIRECTORY).glob(f"*/{stage}/groups/*")
    return sum(int(decode_group(json.loads(path.read_bytes()))[0].sum()) for path in groups if path.name.isdigit())


def stored(url: str):
    """The whole of the volume at ``url``, as an array."""
    volume = open_volume(url)
    return volume.read(volume.bounds)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def run_config(tmp_path, small_dataset, small_checkpoint):
    """A factory for a valid run config (dict) writing into tmp_path/out.zarr; override by sections."""

    def make(**overrides) -> dict:
        config = {
            "input": {"url": f"{small_dataset}/raw"},
            "model": {"name": SMALL_UNET.name, "options": dict(SMALL_UNET.options),
                      "checkpoint": str(small_checkpoint)},
            "inference": {"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu"},
            "output": {"probabilities": str(tmp_path / "out.zarr/prob"),
                       "density": str(tmp_path / "out.zarr/density"), "chunk": [2, 16, 16]},
            "execution": {"block": [4, 32, 48], "executor": "serial"},
        }
        for key, value in overrides.items():
            config[key] = value
        return config

    return make
