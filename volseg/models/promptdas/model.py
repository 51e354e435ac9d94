"""Prompt-DAS (Chen, Xiong, Peng, MICCAI 2025): a promptable, multitask 2D organelle segmenter.

One network serves the unprompted (UDA), sparsely prompted (WDA) and interactive settings: it takes an
image and any number of positive point prompts (zero included) and returns one semantic mask plus a
centre-density map::

    image B×1×H×W ─ f_E ─ neck ─┐
    points B×N×2 (+mask) ─ f_P ─┼─ f_D (two-way transformer) ─┬─ f_S: mask token · upscaled map → logits
    contrastive points B×K×2 ───┘   (contrastive tokens hidden) ├─ f_R: upscaled map → density
                                                                └─ φ: prompt / contrastive token embeddings

``H`` and ``W`` must be multiples of 8. Points are pixel (y, x) in the image. ``head`` selects the
upscaler and heads (:mod:`volseg.models.promptdas.heads`): ``fine`` (default) predicts both maps at
full resolution from the decoder's embedding fused with the encoder's stride-4 and stride-2 features;
``paper`` is the published head (stride 2, interpolated); ``unet`` decodes as a U-Net does, from the
``unet`` encoder's levels down to full resolution (the default head of that encoder). ``encoder_norm``
(``batch`` as published, or ``group``) is the CNN encoder's normalisation, ``encoder_stride`` (8 as
published, 16 or 32) the coarsest of its stages that feed the stride-8 features
(:class:`~volseg.models.promptdas.encoders.CNNEncoder`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from volseg.errors import ConfigError
from volseg.models.promptdas.decoder import TwoWayTransformer
from volseg.models.promptdas.encoders import ENCODERS, FULL_RESOLUTION
from volseg.models.promptdas.heads import (
    MLP,
    DensityHead,
    FineUpscaler,
    LayerNorm2d,
    SegmentationHead,
    UNetUpscaler,
    Upscaler,
)
from volseg.models.promptdas.prompt_encoder import PromptEncoder
from volseg.models.registry import InputContract, ModelSpec, register

#: The encoder a spec that names none gets.
DEFAULT_ENCODER = "vit_tiny8"


class PromptDASOutput(NamedTuple):
    """``logits`` B×C×H×W, ``density`` B×1×H×W; φ-embeddings of the prompt tokens (B×N×P) and of the
    contrastive tokens (B×K×P), or None where none were given."""

    logits: torch.Tensor
    density: torch.Tensor
    prompt_embeddings: torch.Tensor | None = None
    contrastive_embeddings: torch.Tensor | None = None


class PromptDAS(nn.Module):
    #: Takes point prompts (``forward(image, points, point_mask)``); predictors route prompts to it.
    promptable = True

    def __init__(self, num_classes: int = 1, encoder: str = DEFAULT_ENCODER, decoder_dim: int = 256,
                 decoder_depth: int = 2, decoder_heads: int = 8, decoder_mlp: int = 2048,
                 projection_dim: int = 128, encoder_weights: str | None = None, dims: int = 2,
                 head: str = "fine", encoder_norm: str = "batch", encoder_stride: int = 8) -> None:
        super().__init__()
        if dims != 2:
            raise ConfigError(f"model.options.dims is {dims}, but Prompt-DAS is a 2D model.",
                              "set dims: 2 (it segments 3D volumes slice by slice).")
        if encoder not in ENCODERS:
            raise ConfigError(f"model.options.encoder {encoder!r} is not an encoder of Prompt-DAS.",
                              f"use one of: {', '.join(sorted(ENCODERS))}.")
        if head not in HEADS:
            raise ConfigError(f"model.options.head {head!r} is not a head of Prompt-DAS.",
                              f"use one of: {', '.join(HEADS)}.")
        if head == "unet" and encoder not in FULL_RESOLUTION:
            raise ConfigError(f"model.options.head 'unet' needs the encoder's full-resolution levels, which "
                              f"encoder {encoder!r} does not have.", "use encoder: unet, or head: fine.")
        self.head = head
        self.encoder = ENCODERS[encoder](fine=head != "paper", norm=encoder_norm, stride=encoder_stride)
        if encoder_weights:
            self.encoder.load_pretrained(encoder_weights)
        d = decoder_dim
        self.neck = nn.Sequential(
            nn.Conv2d(self.encoder.out_channels, d, 1, bias=False), LayerNorm2d(d),
            nn.Conv2d(d, d, 3, padding=1, bias=False), LayerNorm2d(d),
        )
        self.prompt_encoder = PromptEncoder(d)
        self.mask_tokens = nn.Parameter(torch.randn(1, num_classes, d) * 0.02)
        self.contrastive_embedding = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.decoder = TwoWayTransformer(d, decoder_depth, decoder_heads, decoder_mlp, downsample=2)
        scale = 2 if head == "paper" else 1
        if head == "paper":
            self.upscaler = Upscaler(d)
        elif head == "fine":
            self.upscaler = FineUpscaler(d, self.encoder.fine_channels)
        else:
            self.upscaler = UNetUpscaler(d, self.encoder.fine_channels, self.encoder.full_channels)
        self.segmentation_head = SegmentationHead(d, scale)
        self.density_head = DensityHead(d, scale=scale)
        self.projector = MLP(d, d, projection_dim, 3)
        self.num_classes = num_classes

    def forward(self, image: torch.Tensor, points: torch.Tensor | None = None,
                point_mask: torch.Tensor | None = None, contrastive_points: torch.Tensor | None = None
                ) -> PromptDASOutput:
        """``image`` B×1×H×W in [0, 1]; ``points`` B×N×2 pixel (y, x) with ``point_mask`` B×N bool
        (all valid if omitted); ``contrastive_points`` B×K×2 (training only)."""
        b, _, h, w = image.shape
        fine = None if self.head == "paper" else self.encoder.pyramid(image)
        features = self.neck(self.encoder(image) if fine is None else fine.s8)
        image_pe = self.prompt_encoder.dense(tuple(features.shape[-2:]), image.device)
        tokens = [self.mask_tokens.expand(b, -1, -1)]
        visible = [torch.ones(b, self.num_classes, dtype=torch.bool, device=image.device)]
        n_points = 0 if points is None else points.shape[1]
        if n_points:
            tokens.append(self.prompt_encoder.encode_points(points, (h, w)))
            mask = torch.ones(points.shape[:2], dtype=torch.bool, device=image.device)
            visible.append(mask if point_mask is None else point_mask.bool())
        n_contrastive = 0 if contrastive_points is None else contrastive_points.shape[1]
        if n_contrastive:
            tokens.append(self.prompt_encoder.encode_points(contrastive_points, (h, w)) + self.contrastive_embedding)
            visible.append(torch.zeros(contrastive_points.shape[:2], dtype=torch.bool, device=image.device))
        tokens_out, image_out = self.decoder(features, image_pe, torch.cat(tokens, 1), torch.cat(visible, 1))
        image_out = image_out.transpose(1, 2).reshape(features.shape)
        if fine is None:
            upscaled = self.upscaler(image_out)
        else:
            upscaled = self.upscaler(image_out, fine.s4, fine.s2, image if self.head == "fine" else fine.s1)
        logits = torch.cat([self.segmentation_head(tokens_out[:, c], upscaled) for c in range(self.num_classes)], 1)
        density = self.density_head(upscaled)
        c = self.num_classes
        prompt_embeddings = self.projector(tokens_out[:, c : c + n_points]) if n_points else None
        contrastive_embeddings = self.projector(tokens_out[:, c + n_points :]) if n_contrastive else None
        return PromptDASOutput(logits, density, prompt_embeddings, contrastive_embeddings)


def _contract(spec: ModelSpec) -> InputContract:
    # Grey input in [0, 1]; the encoder replicates it to RGB and applies ImageNet statistics itself.
    return InputContract(dims=2, size_multiple=8, mean=0.0, std=1.0)


#: The upscalers and heads Prompt-DAS can be built with (see :mod:`volseg.models.promptdas.heads`).
HEADS = ("fine", "paper", "unet")


def _default_head(options: dict) -> str:
    """``head`` where a spec leaves it out: ``unet`` for the unet encoder (a U-Net's own decoder), else
    ``fine``."""
    return "unet" if options.get("encoder", DEFAULT_ENCODER) == "unet" else "fine"


def _default_stride(options: dict) -> int:
    """``encoder_stride`` where a spec leaves it out: 32 for the cnn encoder (its source-only and supervised
    Dice on VNC → Lucchi were higher than at the published 8: ``bench/adaptation.py``'s ``*_stride32`` rows);
    8 for the ViTs, which ignore it, so that their checkpoints from before the option still fit."""
    return 32 if options.get("encoder", DEFAULT_ENCODER) == "cnn" else 8


register("promptdas", PromptDAS, _contract,
         "Prompt-DAS: promptable segmentation + centre density (encoders vit_s8, vit_tiny8, cnn, unet)",
         # new models: the full-resolution head and each volume's robust grey-value range; checkpoints
         # whose cards name neither were built with the paper's head on dtype-scaled input
         defaults={"head": _default_head, "intensity": [1.0, 99.0], "encoder_norm": "batch",
                   "encoder_stride": _default_stride},
         legacy={"head": "paper", "intensity": None, "encoder_norm": "batch", "encoder_stride": 8})
