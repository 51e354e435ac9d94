"""Every registered model builds and maps windows to the right shapes; checkpoints round-trip."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from volseg.errors import CheckpointError, ConfigError
from volseg.models import MODELS, ModelSpec, build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, read_card, save_checkpoint
from volseg.models.registry import _load_builtin_models

_load_builtin_models()


#: Small options per model, and the dimensionalities each supports.
TEST_OPTIONS = {
    "convnet": ({}, (2, 3)),
    "unet": ({"width": 4}, (2, 3)),
    "promptdas": ({"decoder_dim": 64, "decoder_heads": 4, "decoder_mlp": 64, "projection_dim": 8}, (2,)),
    "sam": ({"variant": "tiny"}, (2,)),
}
#: Models of one foreground class only (SAM); the others are tested with two.
SINGLE_CLASS = {"sam"}


def test_every_registered_model_has_test_options():
    assert set(TEST_OPTIONS) == set(MODELS)


@pytest.mark.parametrize(("name", "dims"), [(n, d) for n, (_, ds) in sorted(TEST_OPTIONS.items()) for d in ds])
def test_every_registered_model_maps_windows_to_logits_and_density(name, dims):
    classes = 1 if name in SINGLE_CLASS else 2
    spec = ModelSpec(name, num_classes=classes, options={**TEST_OPTIONS[name][0], "dims": dims})
    model = build_model(spec).eval()
    contract = input_contract(spec)
    m = contract.size_multiple
    shape = (3, 1, 2 * m, 3 * m) if dims == 2 else (3, 1, 2 * m, 2 * m, 3 * m)
    with torch.no_grad():
        out = model(torch.randn(shape))
    logits, density = out[0], out[1]
    assert logits.shape == (shape[0], classes, *shape[2:])
    assert density.shape == (shape[0], 1, *shape[2:])


def test_unknown_model_and_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="registered"):
        build_model(ModelSpec("resnet9000"))
    with pytest.raises(ConfigError, match="options"):
        build_model(ModelSpec("unet", options={"depth_of_field": 3}))


def test_input_contract_scales_integers_and_standardises_without_touching_the_input():
    contract = input_contract(ModelSpec("unet"))
    raw = torch.tensor([0, 51, 255], dtype=torch.uint8)
    expected = (np.array([0, 51, 255]) / 255.0 - contract.mean) / contract.std
    np.testing.assert_allclose(contract.normalize(raw).numpy(), expected, rtol=1e-6, atol=1e-6)
    floats = torch.tensor([0.0, 0.2, 1.0])
    np.testing.assert_allclose(contract.normalize(floats).numpy(), (floats.numpy() - contract.mean) / contract.std,
                               rtol=1e-6, atol=1e-6)
    assert floats.tolist() == pytest.approx([0.0, 0.2, 1.0])  # normalised a copy, not the caller's tensor


def test_a_unet_run_does_not_import_the_encoders_libraries():
    # timm (Prompt-DAS encoders) and segment-anything take seconds to import; a U-Net run needs neither.
    code = ("import sys; from volseg.models import ModelSpec, build_model; build_model(ModelSpec('unet')); "
            "print(sorted(m for m in ('timm', 'segment_anything', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_window_contract():
    contract = input_contract(ModelSpec("unet", options={"levels": 3}))
    contract.check_window((1, 64, 96))
    with pytest.raises(ConfigError, match=r"\[1, 64, 64\]"):
        contract.check_window((4, 64, 64))
    with pytest.raises(ConfigError, match="multiples of 4"):
        contract.check_window((1, 62, 64))


def test_checkpoint_round_trip_is_exact(tmp_path):
    spec = ModelSpec("unet", options={"width": 4, "levels": 2})
    torch.manual_seed(3)
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, spec, {"steps": 7, "data": {"raw": "x.zarr"}})
    loaded = load_checkpoint(path, spec).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        for a, b in zip(model(x), loaded(x), strict=True):
            assert torch.equal(a, b)
    card = read_card(path)
    assert card["steps"] == 7 and card["model"] == spec.to_json() and len(card["weights_sha256"]) == 64


def test_checkpoint_refuses_another_spec_and_garbage(tmp_path):
    spec = ModelSpec("unet", options={"width": 4, "levels": 2})
    path = save_checkpoint(tmp_path / "m.safetensors", build_model(spec), spec, {})
    with pytest.raises(CheckpointError, match=r"other model\.options: width: checkpoint 4, config 8"):
        load_checkpoint(path, ModelSpec("unet", options={"width": 8, "levels": 2}))
    with pytest.raises(CheckpointError, match="trained as model"):
        load_checkpoint(path, ModelSpec("convnet"))
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(garbage, spec)
    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_checkpoint(tmp_path / "m.pt", build_model(spec), spec, {})


def test_a_checkpoint_from_before_the_fine_head_names_the_head(tmp_path):
    """A Prompt-DAS checkpoint whose card names no head (written before heads were selectable) was built
    with the paper's head on dtype-scaled input: it loads as such when the config says so, and a config
    that leaves the head to the (new) default is refused with a message naming the head."""
    import json

    old = ModelSpec("promptdas", options={"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2,
                                          "decoder_mlp": 32, "projection_dim": 8})
    torch.manual_seed(0)
    paper = build_model(ModelSpec(old.name, options={**old.options, "head": "paper", "intensity": None}))
    path = save_checkpoint(tmp_path / "old.safetensors", paper, ModelSpec(old.name, options={**old.options,
                                                                                            "head": "paper"}), {})
    card = json.loads((tmp_path / "old.json").read_text())
    card["model"]["options"] = dict(old.options)  # as the cards of earlier versions: no head, no intensity
    (tmp_path / "old.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="head: checkpoint 'paper', config 'fine'"):
        load_checkpoint(path, old)
    loaded = load_checkpoint(path, ModelSpec(old.name, options={**old.options, "head": "paper", "intensity": None}))
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(image).logits, paper.eval()(image).logits)
    assert input_contract(ModelSpec(old.name, options={**old.options, "head": "paper", "intensity": None})
                          ).percentiles is None


def test_the_cnn_encoder_takes_groupnorm_and_old_cnn_checkpoints_keep_batchnorm(tmp_path):
    """``encoder_norm: group`` has no running statistics, so an image's output does not depend on its
    batch; ``batch`` (the default) is the ResNet's own, and a card without the option loads as it."""
    import json

    options = {"encoder": "cnn", "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 32, "projection_dim": 8}
    torch.manual_seed(0)
    grouped = build_model(ModelSpec("promptdas", options={**options, "encoder_norm": "group"})).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in grouped.modules())
    image, other = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32) * 3
    with torch.no_grad():  # in training mode too, one image's output is independent of its batch
        alone, batched = grouped(image).logits, grouped(torch.cat([image, other])).logits[:1]
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="encoder_norm 'layer'"):
        build_model(ModelSpec("promptdas", options={**options, "encoder_norm": "layer"}))

    was = {**options, "head": "paper", "intensity": None, "encoder_stride": 8}  # what old cnn models were
    old = build_model(ModelSpec("promptdas", options=was))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in old.modules())
    path = save_checkpoint(tmp_path / "old.safetensors", old, ModelSpec("promptdas", options=was), {})
    card = json.loads((tmp_path / "old.json").read_text())
    card["model"]["options"] = dict(options)  # a card from before encoder_norm, head, intensity and stride
    (tmp_path / "old.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="encoder_norm: checkpoint 'batch', config 'group'"):
        load_checkpoint(path, ModelSpec("promptdas", options={**was, "encoder_norm": "group"}))
    loaded = load_checkpoint(path, ModelSpec("promptdas", options=was))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(image).logits, old.eval()(image).logits)


def test_the_cnn_encoder_runs_to_stride_32_and_old_cnn_checkpoints_stop_at_stride_8(tmp_path):
    """``encoder_stride`` 16 or 32 adds the ResNet's later stages to the stride-8 features (any multiple of 8
    as input, not only of 32); 32 is the cnn encoder's default, 8 the ViTs' (which ignore it), and a card
    without the option was written by a model that stopped at stride 8."""
    import json

    from volseg.models.registry import resolve, saved

    options = {"encoder": "cnn", "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 32, "projection_dim": 8}
    assert resolve(ModelSpec("promptdas", options=options)).options["encoder_stride"] == 32
    assert resolve(ModelSpec("promptdas", options={"encoder": "vit_s8"})).options["encoder_stride"] == 8
    assert resolve(ModelSpec("promptdas")).options["encoder_stride"] == 8  # the default encoder, vit_tiny8
    assert saved(ModelSpec("promptdas", options=options)).options["encoder_stride"] == 8  # a card without it
    torch.manual_seed(0)
    deep = build_model(ModelSpec("promptdas", options=options)).eval()
    options = {**options, "encoder_stride": 8}
    shallow = build_model(ModelSpec("promptdas", options=options)).eval()
    added = [name for name in deep.state_dict() if name not in shallow.state_dict()]
    assert added[0] == "encoder.trunk.layer3.0.conv1.weight" and "encoder.lateral.1.weight" in added
    assert all(name in deep.state_dict() for name in shallow.state_dict())
    image = torch.rand(2, 1, 40, 56)  # stride-32 grids of 2 × 2, rounded up from 1.25 × 1.75
    with torch.no_grad():
        features = deep.encoder.pyramid(image)[0]
        assert features.shape == (2, 128, 5, 7) and deep(image).logits.shape == (2, 1, 40, 56)
        stages = deep.encoder.trunk(deep.encoder.rgb(image))  # stride 2, 4, 8, 16, 32
        assert [tuple(s.shape[-2:]) for s in stages[2:]] == [(5, 7), (3, 4), (2, 2)]
        coarse = features - deep.encoder.proj(stages[2])  # what the stride-16 and -32 stages add
        assert coarse.abs().amin(dim=(0, 1)).gt(0).all()  # at every token
    with pytest.raises(ConfigError, match="encoder_stride 64"):
        build_model(ModelSpec("promptdas", options={**options, "encoder_stride": 64}))

    path = save_checkpoint(tmp_path / "old.safetensors", shallow, ModelSpec("promptdas", options=options), {})
    card = json.loads((tmp_path / "old.json").read_text())
    del card["model"]["options"]["encoder_stride"]  # a card from before the option
    (tmp_path / "old.json").write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match="encoder_stride: checkpoint 8, config 32"):
        load_checkpoint(path, ModelSpec("promptdas", options={**options, "encoder_stride": 32}))
    loaded = load_checkpoint(path, ModelSpec("promptdas", options=options))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(image).logits, shallow(image).logits)


def test_the_unet_encoder_decodes_as_a_unet_and_its_windows_stand_alone(tmp_path):
    """``encoder: unet`` (MONAI BasicUNet's encoder half) gets the ``unet`` head by default, which decodes the
    stride-8 embedding with the encoder's stride-4, -2 and full-resolution levels; InstanceNorm makes an image's
    output independent of its batch, and a checkpoint records the head. The ``unet`` head on another encoder
    is refused, naming the head and the fix."""
    from volseg.models.promptdas.heads import UNetUpscaler
    from volseg.models.registry import resolve

    options = {"encoder": "unet", "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 32, "projection_dim": 8}
    spec = ModelSpec("promptdas", options=options)
    assert resolve(spec).options["head"] == "unet"
    assert resolve(ModelSpec("promptdas", options={**options, "encoder": "cnn"})).options["head"] == "fine"
    torch.manual_seed(0)
    model = build_model(spec).train()
    assert isinstance(model.upscaler, UNetUpscaler)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    image, other = torch.rand(1, 1, 40, 56), torch.rand(1, 1, 40, 56) * 0.3
    with torch.no_grad():
        levels = model.encoder.pyramid(image)
        assert [tuple(level.shape[1:]) for level in levels] == [(128, 5, 7), (64, 10, 14), (32, 20, 28), (32, 40, 56)]
        alone, batched = model(image).logits, model(torch.cat([image, other])).logits[:1]
    assert alone.shape == (1, 1, 40, 56)
    torch.testing.assert_close(alone, batched, rtol=1e-4, atol=1e-5)

    path = save_checkpoint(tmp_path / "unet.safetensors", model, spec, {})
    assert json.loads((tmp_path / "unet.json").read_text())["model"]["options"]["head"] == "unet"
    with pytest.raises(CheckpointError, match="head: checkpoint 'unet', config 'fine'"):
        load_checkpoint(path, ModelSpec("promptdas", options={**options, "head": "fine"}))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path, spec).eval()(image).logits, model.eval()(image).logits)
    with pytest.raises(ConfigError, match=r"head 'unet' needs the encoder's full-resolution levels.*encoder: unet"):
        build_model(ModelSpec("promptdas", options={**options, "encoder": "cnn", "head": "unet"}))
