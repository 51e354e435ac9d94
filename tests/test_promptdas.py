"""Prompt-DAS: shapes with 0, 1 and many prompts; hidden tokens never change the outputs."""

from __future__ import annotations

import pytest
import torch

from volseg.errors import CheckpointError, ConfigError
from volseg.models import ModelSpec, build_model
from volseg.models.promptdas.encoders import ViTEncoder

TINY = {"encoder": "vit_tiny8", "decoder_dim": 64, "decoder_heads": 4, "decoder_mlp": 128, "projection_dim": 16}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelSpec("promptdas", options=TINY)).eval()


def points(b, n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, size, (b, n, 2), generator=g)


@pytest.mark.parametrize("n_points", [0, 1, 37])
def test_output_shapes_with_any_number_of_prompts(model, n_points):
    image = torch.rand(2, 1, 48, 64)
    with torch.no_grad():
        out = model(image, points(2, n_points, 48) if n_points else None)
    assert out.logits.shape == (2, 1, 48, 64)
    assert out.density.shape == (2, 1, 48, 64)
    if n_points:
        assert out.prompt_embeddings.shape == (2, n_points, 16)
    else:
        assert out.prompt_embeddings is None


def test_prompts_change_the_mask(model):
    image = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        a = model(image).logits
        b = model(image, points(1, 3, 32)).logits
    assert (a - b).abs().max() > 1e-4


def test_contrastive_tokens_never_change_the_outputs(model):
    image = torch.rand(2, 1, 40, 32)
    prompts = points(2, 4, 32, seed=1)
    with torch.no_grad():
        plain = model(image, prompts)
        probed = model(image, prompts, contrastive_points=points(2, 9, 32, seed=2))
    torch.testing.assert_close(probed.logits, plain.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(probed.density, plain.density, rtol=0, atol=1e-5)
    torch.testing.assert_close(probed.prompt_embeddings, plain.prompt_embeddings, rtol=0, atol=1e-5)
    assert probed.contrastive_embeddings.shape == (2, 9, 16)


def test_padded_prompts_are_ignored(model):
    image = torch.rand(2, 1, 32, 32)
    real = points(2, 2, 32, seed=3)
    padded = torch.cat([real, points(2, 5, 32, seed=4)], 1)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[:, :2] = True
    with torch.no_grad():
        a = model(image, real)
        b = model(image, padded, mask)
        none = model(image)
        all_invalid = model(image, padded, torch.zeros(2, 7, dtype=torch.bool))
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(all_invalid.logits, none.logits, rtol=0, atol=1e-5)


def test_gradients_reach_every_part():
    torch.manual_seed(0)
    model = build_model(ModelSpec("promptdas", options=TINY))
    out = model(torch.rand(1, 1, 32, 32), points(1, 2, 32), contrastive_points=points(1, 3, 32))
    loss = out.logits.mean() + out.density.mean() + out.contrastive_embeddings.mean() + out.prompt_embeddings.mean()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not dead, dead


@pytest.mark.parametrize("encoder", ["vit_s8", "cnn"])
def test_other_encoders(encoder):
    torch.manual_seed(0)
    options = dict(TINY, encoder=encoder)
    model = build_model(ModelSpec("promptdas", options=options)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 32, 48), points(1, 2, 32))
    assert out.logits.shape == (1, 1, 32, 48)


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="encoder"):
        build_model(ModelSpec("promptdas", options={"encoder": "vit_h99"}))


def test_pretrained_vit_weights_load_from_a_local_file(tmp_path):
    # A DINO-style state dict: class token, a 1 + 28×28 position embedding, a head to drop.
    torch.manual_seed(1)
    source = ViTEncoder(embed_dim=192, depth=4, num_heads=3)
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    state["cls_token"] = torch.zeros(1, 1, 192)
    state["pos_embed"] = torch.cat([torch.zeros(1, 1, 192), state["pos_embed"]], 1)
    state["head.weight"] = torch.zeros(10, 192)
    torch.save(state, tmp_path / "dino.pth")
    target = ViTEncoder(embed_dim=192, depth=4, num_heads=3)
    missing = target.load_pretrained(tmp_path / "dino.pth")
    assert missing == []
    torch.testing.assert_close(target.vit.blocks[2].attn.qkv.weight, source.vit.blocks[2].attn.qkv.weight)
    torch.testing.assert_close(target.vit.pos_embed, source.vit.pos_embed)
    with pytest.raises(CheckpointError, match="do not fit"):
        ViTEncoder(embed_dim=384, depth=4, num_heads=6).load_pretrained(tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="do not exist"):
        target.load_pretrained(tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"Pretrained encoder weights .*garbage\.pth.* not a readable"):
        target.load_pretrained(tmp_path / "garbage.pth")


def test_prompt_das_is_2d_only():
    with pytest.raises(ConfigError, match="2D model"):
        build_model(ModelSpec("promptdas", options={**TINY, "dims": 3}))
