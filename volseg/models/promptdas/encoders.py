"""Image encoders f_E of Prompt-DAS: a grey slice → a ``B×D×(H/8)×(W/8)`` feature map, and for the
fine head also ``B×C2×(H/2)×(W/2)`` and ``B×C4×(H/4)×(W/4)`` features (:meth:`pyramid`).

``vit_s8`` is the paper's encoder (ViT-S/8: embed 384, depth 12, heads 6, patch 8, no class token, DINO
weights from a local file). ``vit_tiny8`` (embed 192, depth 4), ``cnn`` (a ResNet-style CNN of
stride 8 from timm) and ``unet`` (the encoder half of MONAI's BasicUNet) train in minutes on a CPU. All
take ``B×1×H×W`` grey input in [0, 1]; for the ViTs and the CNN the grey slice is replicated to 3
channels and standardised with ImageNet mean/std inside the encoder, so pretrained weights see what they
were trained on. Position embeddings are resampled to any token grid.

The fine features come from the CNN trunk's own stride-2 and stride-4 stages, and for a ViT (whose
patches start at stride 8) from a light convolutional stem beside it, as HQ-SAM and SAM 2 feed early
high-resolution features to their mask decoders.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from volseg.errors import CheckpointError, ConfigError
from volseg.models.checkpoint import read_state_dict

#: The CNN encoder's normalisations (``model.options.encoder_norm``) as timm norm layers.
NORMS = {"group": "groupnorm", "batch": "batchnorm2d"}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STRIDE = 8
#: The strides the cnn encoder's trunk may run to (``model.options.encoder_stride``).
CNN_STRIDES = (8, 16, 32)
#: The unet encoder's channels at strides 1, 2, 4, 8 and 16, its activation and normalisation (MONAI
#: ``BasicUNet``'s defaults).
UNET_FEATURES = (32, 32, 64, 128, 256)
UNET_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
UNET_NORM = ("instance", {"affine": True})


class Pyramid(NamedTuple):
    """An encoder's features at strides 8, 4 and 2, and at full resolution where it has them (``s1``)."""

    s8: torch.Tensor
    s4: torch.Tensor
    s2: torch.Tensor
    s1: torch.Tensor | None = None


class GreyToRGB(nn.Module):
    """``B×1×H×W`` in [0, 1] → ``B×3×H×W`` standardised with ImageNet statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image.expand(-1, 3, -1, -1) - self.mean) / self.std


class ConvStem(nn.Module):
    """The fine features beside a ViT: two strided 3×3 conv blocks on the grey image, giving
    ``B×C2×(H/2)×(W/2)`` and ``B×C4×(H/4)×(W/4)``."""

    def __init__(self, channels: tuple[int, int] = (32, 64)) -> None:
        super().__init__()
        c2, c4 = channels
        self.to_2 = nn.Sequential(nn.Conv2d(1, c2, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, c2), nn.GELU(),
                                  nn.Conv2d(c2, c2, 3, padding=1, bias=False), nn.GroupNorm(8, c2), nn.GELU())
        self.to_4 = nn.Sequential(nn.Conv2d(c2, c4, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, c4),
                                  nn.GELU())
        self.channels = channels

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s2 = self.to_2(image - 0.5)
        return s2, self.to_4(s2)


class ViTEncoder(nn.Module):
    """A plain ViT with patch 8 and no class token; output ``B×D×(H/8)×(W/8)``.

    ``H`` and ``W`` must be multiples of 8; the absolute position embedding (learned for
    ``pretrain_size``) is resampled bicubically to the input's token grid. ``fine``: a
    :class:`ConvStem` beside it supplies the stride-2 and stride-4 features of :meth:`pyramid`.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, pretrain_size: int = 224,
                 fine: bool = False) -> None:
        super().__init__()
        self.rgb = GreyToRGB()
        self.vit = VisionTransformer(
            img_size=pretrain_size, patch_size=STRIDE, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            num_classes=0, global_pool="", class_token=False, dynamic_img_size=True,
        )
        self.stem = ConvStem() if fine else None
        self.out_channels = embed_dim
        self.fine_channels = None if self.stem is None else self.stem.channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b, _, h, w = image.shape
        tokens = self.vit.forward_features(self.rgb(image))  # B×(h/8·w/8)×D, or B×h/8×w/8×D
        return tokens.reshape(b, h // STRIDE, w // STRIDE, -1).permute(0, 3, 1, 2).contiguous()

    def pyramid(self, image: torch.Tensor) -> Pyramid:
        """Stride 8, 4 and 2 features; needs ``fine``."""
        assert self.stem is not None, "built without fine features"
        s2, s4 = self.stem(image)
        return Pyramid(self(image), s4, s2)

    def load_pretrained(self, path: str | Path) -> list[str]:
        """Load DINO/timm ViT weights from a local ``.safetensors`` or ``.pth`` file.

        Class-token entries are dropped (this encoder has none), the position embedding loses its
        class slot and is resampled to this encoder's grid; heads are ignored. Returns the names of
        encoder parameters the file did not provide (empty when everything was loaded).
        """
        state = _read_state_dict(path)
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("head", "fc_norm", "cls_token"))}
        own = self.vit.state_dict()
        if "pos_embed" in state:
            pos = state["pos_embed"]
            prefix = pos.shape[1] - int(pos.shape[1] ** 0.5) ** 2  # a class-token slot, if any
            side = int(own["pos_embed"].shape[1] ** 0.5)
            state["pos_embed"] = resample_abs_pos_embed(pos[:, prefix:], [side, side], num_prefix_tokens=0)
        wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if wrong:
            raise CheckpointError(
                f"Pretrained encoder weights {str(path)!r} do not fit this encoder: "
                + "; ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:3]),
                "use weights of the same architecture (ViT-S/8 for vit_s8), or no pretrained weights.",
            )
        result = self.vit.load_state_dict(state, strict=False)
        return list(result.missing_keys)


class CNNEncoder(nn.Module):
    """A timm ResNet trunk whose stride-8 stage, projected to ``out_channels`` (1×1), is the output;
    ``fine``: its stride-2 and stride-4 stages are the fine features of :meth:`pyramid` (the same trunk
    either way).

    ``stride``: the coarsest stage the trunk runs to. 8 (as published) stops at the stride-8 stage; 16 or
    32 run on through the ResNet's later stages and add them, top-down as in a feature pyramid (each
    projected 1×1 and upsampled ×2 onto the stage before it), to the stride-8 output, so every token also
    carries context of 16 or 32 pixels' stride, as the encoder of a U-Net does. On VNC → Lucchi
    (bench/adaptation.py, seeds 0-2) 32 raised the supervised model's held-out Dice from 0.854 ± 0.015 to
    0.871 ± 0.003 and the source-only model's from 0.528 ± 0.026 to 0.546 ± 0.022.

    ``norm``: ``batch`` (BatchNorm, the ResNet's own, as published) or ``group`` (GroupNorm, 32 groups),
    which normalises each image by its own statistics rather than the source's running means. On VNC →
    Lucchi (bench/adaptation.py, 300 source steps, seeds 0 and 1) ``group`` made the source-only Dice
    steadier over seeds (0.40 / 0.39 against 0.40 / 0.53) but the supervised model worse (0.76 against
    0.82), so ``batch`` stays the default."""

    def __init__(self, backbone: str = "resnet18", out_channels: int = 128, fine: bool = False,
                 norm: str = "batch", stride: int = STRIDE) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"model.options.encoder_norm {norm!r} is not a normalisation of the cnn encoder.",
                              f"use one of: {', '.join(NORMS)}.")
        if stride not in CNN_STRIDES:
            raise ConfigError(f"model.options.encoder_stride {stride!r} is not a stride of the cnn encoder.",
                              f"use one of: {', '.join(map(str, CNN_STRIDES))}.")
        self.rgb = GreyToRGB()
        last = CNN_STRIDES.index(stride) + 2  # timm's feature indices: 0 at stride 2, 2 at stride 8
        first = 0 if fine else 2
        self.trunk = timm.create_model(backbone, pretrained=False, features_only=True,
                                       out_indices=tuple(range(first, last + 1)), norm_layer=NORMS[norm])
        channels = dict(zip(range(first, last + 1), self.trunk.feature_info.channels(), strict=True))
        self.proj = nn.Conv2d(channels[2], out_channels, 1)
        self.lateral = nn.ModuleList(nn.Conv2d(channels[i], out_channels, 1) for i in range(3, last + 1))
        self.out_channels = out_channels
        self.fine_channels = (channels[0], channels[1]) if fine else None

    def _stride_8(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The stride-8 output of the trunk's stages (the last ones, from stride 8 on), coarser ones added
        top-down."""
        features = features[-1 - len(self.lateral):]
        top = None
        for lateral, stage in zip(reversed(self.lateral), reversed(features[1:]), strict=True):
            top = lateral(stage) if top is None else lateral(stage) + _upsampled(top, stage)
        out = self.proj(features[0])
        return out if top is None else out + _upsampled(top, out)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._stride_8(self.trunk(self.rgb(image)))

    def pyramid(self, image: torch.Tensor) -> Pyramid:
        """Stride 8, 4 and 2 features; needs ``fine``."""
        assert self.fine_channels is not None, "built without fine features"
        features = self.trunk(self.rgb(image))
        return Pyramid(self._stride_8(features), features[1], features[0])

    def load_pretrained(self, path: str | Path) -> list[str]:
        result = self.trunk.load_state_dict(_read_state_dict(path), strict=False)
        return list(result.missing_keys)


class UNetEncoder(nn.Module):
    """The encoder half of MONAI's ``BasicUNet`` (two 3×3 convolutions per level, InstanceNorm, LeakyReLU,
    max-pooling between levels; channels 32, 32, 64, 128, 256 at strides 1 to 16). Output: the stride-8
    level projected 1×1 to ``out_channels``, with the stride-16 level added top-down; :meth:`pyramid` also
    gives the stride-4, stride-2 and full-resolution levels, which the ``unet`` head decodes as a U-Net's
    decoder does.

    InstanceNorm normalises every window by its own statistics, so the encoder has no running statistics
    to calibrate and a window's output depends on that window alone. On VNC → Lucchi (bench/adaptation.py,
    source-only, 300 steps) it kept the CNN's Dice with the fine head (0.553 against 0.553, seed 0) and
    raised it with the ``unet`` head: ``source_unet`` row."""

    def __init__(self, out_channels: int = 128, features: tuple[int, ...] = UNET_FEATURES) -> None:
        super().__init__()
        from monai.networks.nets.basic_unet import Down, TwoConv  # MONAI takes seconds to import

        f = features
        self.levels = nn.ModuleList([TwoConv(2, 1, f[0], UNET_ACT, UNET_NORM, True)]
                                    + [Down(2, a, b, UNET_ACT, UNET_NORM, True) for a, b in itertools.pairwise(f)])
        self.proj = nn.Conv2d(f[3], out_channels, 1)
        self.lateral = nn.Conv2d(f[4], out_channels, 1)
        self.out_channels = out_channels
        self.fine_channels = (f[1], f[2])
        self.full_channels = f[0]

    def pyramid(self, image: torch.Tensor) -> Pyramid:
        """Stride 8, 4, 2 and 1 features (the grey values centred and scaled to about unit spread first)."""
        x = (image - 0.5) / 0.25
        levels = []
        for level in self.levels:
            x = level(x)
            levels.append(x)
        s1, s2, s4, s8, s16 = levels
        return Pyramid(self.proj(s8) + _upsampled(self.lateral(s16), s8), s4, s2, s1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.pyramid(image).s8

    def load_pretrained(self, path: str | Path) -> list[str]:
        raise ConfigError("model.options.encoder_weights: the unet encoder has no pretrained weights.",
                          "train it from scratch (leave encoder_weights out), or use the cnn or vit encoders.")


def _upsampled(coarse: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``coarse`` (nearest-neighbour) on the grid of ``like``, one stage finer: ×2, or less by a pixel where
    the image's side was not a multiple of the coarser stride."""
    return F.interpolate(coarse, size=like.shape[-2:], mode="nearest")


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Pretrained encoder weights {str(path)!r} do not exist.",
                              "set model.options.encoder_weights to a local .safetensors or .pth file.")
    return read_state_dict(path, "Pretrained encoder weights", "give a .safetensors file or a plain state-dict .pth.",
                           wrappers=("model", "state_dict", "teacher", "student"))


#: name → builder of an encoder (all of stride 8; ``fine``: with stride-2 and stride-4 features too;
#: ``norm`` and ``stride``: the CNN's normalisation and coarsest stage, see :class:`CNNEncoder`; a ViT's
#: tokens already see the whole image, and it has LayerNorm: it ignores both, as the unet encoder does,
#: which always has its fine levels and InstanceNorm).
ENCODERS = {
    "vit_s8": lambda fine=False, norm="batch", stride=STRIDE: ViTEncoder(embed_dim=384, depth=12, num_heads=6,
                                                                         fine=fine),
    "vit_tiny8": lambda fine=False, norm="batch", stride=STRIDE: ViTEncoder(embed_dim=192, depth=4, num_heads=3,
                                                                            fine=fine),
    "cnn": lambda fine=False, norm="batch", stride=STRIDE: CNNEncoder("resnet18", out_channels=128, fine=fine,
                                                                      norm=norm, stride=stride),
    "unet": lambda fine=False, norm="batch", stride=STRIDE: UNetEncoder(out_channels=128),
}
#: The encoders with full-resolution features (:attr:`Pyramid.s1`), which the ``unet`` head needs.
FULL_RESOLUTION = frozenset({"unet"})
