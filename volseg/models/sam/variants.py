"""SAM's model variants (ViT-B/L/H as published, and a tiny one for tests), built from segment-anything.

The official variants come from ``segment_anything.sam_model_registry`` itself, so their module tree and
tensor names are exactly those of the published checkpoints. ``tiny`` is assembled from the same modules
(``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``, ``TwoWayTransformer``, ``Sam``) with small
dimensions, so that tests and CPU runs exercise the real code in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from volseg.errors import ConfigError


@dataclass(frozen=True)
class SamVariant:
    """What tells SAM variants apart, and what a checkpoint of each must hold.

    ``registry_key``: the key of ``segment_anything.sam_model_registry`` (None: built here from its modules).
    ``embed_dim``/``depth``: of the image encoder (a checkpoint's ``patch_embed`` width and block count).
    ``image_size``: the encoder's square input; ``prompt_dim``: the decoder's token width.
    ``checkpoint_name``: the file name the official release uses (for messages).
    """

    name: str
    registry_key: str | None
    embed_dim: int
    depth: int
    image_size: int
    prompt_dim: int
    checkpoint_name: str

    def describe(self) -> str:
        return f"SAM {self.name} (image encoder width {self.embed_dim}, {self.depth} blocks)"


SAM_VARIANTS: dict[str, SamVariant] = {
    "b": SamVariant("ViT-B", "vit_b", 768, 12, 1024, 256, "sam_vit_b_01ec64.pth"),
    "l": SamVariant("ViT-L", "vit_l", 1024, 24, 1024, 256, "sam_vit_l_0b3195.pth"),
    "h": SamVariant("ViT-H", "vit_h", 1280, 32, 1024, 256, "sam_vit_h_4b8939.pth"),
    "tiny": SamVariant("tiny", None, 32, 2, 64, 32, "(none: tests only)"),
}


def sam_variant(name: str) -> SamVariant:
    """The variant ``b``, ``l``, ``h`` or ``tiny`` (``vit_b`` etc. are accepted too)."""
    key = str(name).lower().removeprefix("vit_").removeprefix("vit-")
    if key not in SAM_VARIANTS:
        raise ConfigError(f"model.options.variant {name!r} is not a SAM variant.",
                          f"use one of: {', '.join(SAM_VARIANTS)}.")
    return SAM_VARIANTS[key]


def build_sam_module(variant: SamVariant) -> Sam:
    """A randomly initialised ``segment_anything.modeling.Sam`` of ``variant`` (seed torch first)."""
    if variant.registry_key is not None:
        return sam_model_registry[variant.registry_key](checkpoint=None)
    return _tiny_sam(variant)


def _tiny_sam(variant: SamVariant) -> Sam:
    """Two encoder blocks (one windowed, one global), patch 8 on a 64² input: an 8×8 embedding."""
    patch = 8
    grid = variant.image_size // patch
    encoder = ImageEncoderViT(
        img_size=variant.image_size, patch_size=patch, embed_dim=variant.embed_dim, depth=variant.depth,
        num_heads=2, mlp_ratio=2.0, out_chans=variant.prompt_dim, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
        global_attn_indexes=(variant.depth - 1,),
    )
    prompt_encoder = PromptEncoder(embed_dim=variant.prompt_dim, image_embedding_size=(grid, grid),
                                   input_image_size=(variant.image_size, variant.image_size), mask_in_chans=4)
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=variant.prompt_dim, mlp_dim=64, num_heads=2),
        transformer_dim=variant.prompt_dim, iou_head_depth=3, iou_head_hidden_dim=32,
    )
    return Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder)
