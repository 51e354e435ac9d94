"""Grey EM windows ↔ SAM's input frame, and prompts into that frame.

SAM was trained on RGB photographs resized so their longest side is the encoder's input size (1024),
standardised with its pixel mean/std (0–255 units) and zero-padded at the bottom and right::

    grey B×1×H×W in [0, 1] ─ ×3 channels ─ ×255 ─ resize longest side to S ─ (x − mean)/std ─ pad → B×3×S×S
    low-res mask logits B×k×S/4×S/4 ─ upsample to S×S ─ crop the unpadded part ─ resize → B×k×H×W

Resizing uses ``F.interpolate`` (bilinear, antialiased), as segment-anything's own torch path does;
normalising, padding and mask post-processing are ``Sam.preprocess`` and ``Sam.postprocess_masks``.
Points arrive as volseg's pixel (y, x), boxes as (y0, x0, y1, x1) with inclusive corners (pixel
indices); SAM wants (x, y) and (x0, y0, x1, y1) in the resized frame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


def input_size(hw: tuple[int, int], image_size: int) -> tuple[int, int]:
    """The (h, w) an ``hw`` image has inside SAM's ``image_size``² input (longest side = ``image_size``)."""
    return ResizeLongestSide.get_preprocess_shape(int(hw[0]), int(hw[1]), image_size)


def encode_image(sam: Sam, rgb: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` in [0, 1] → SAM's ``B×3×S×S`` encoder input (see the module docstring)."""
    size = input_size(tuple(rgb.shape[-2:]), sam.image_encoder.img_size)
    x = rgb * 255.0
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=True)
    return sam.preprocess(x)


def decode_image(sam: Sam, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`encode_image`: ``B×3×S×S`` → ``B×3×H×W`` in [0, 1] (exact up to resampling)."""
    size = input_size(hw, sam.image_encoder.img_size)
    x = x[..., : size[0], : size[1]] * sam.pixel_std + sam.pixel_mean
    if size != tuple(hw):
        x = F.interpolate(x, tuple(hw), mode="bilinear", align_corners=False, antialias=True)
    return x / 255.0


def masks_to_image(sam: Sam, low_res: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """SAM's low-resolution mask logits ``B×k×s×s`` → ``B×k×H×W`` logits over the original image."""
    return sam.postprocess_masks(low_res, input_size(hw, sam.image_encoder.img_size), tuple(hw))


def points_to_sam(points_yx: torch.Tensor, hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """``…×2`` pixel (y, x) → ``…×2`` (x, y) in SAM's resized frame."""
    return ResizeLongestSide(image_size).apply_coords_torch(points_yx.flip(-1), tuple(hw))


def boxes_to_sam(boxes_yxyx: torch.Tensor, hw: tuple[int, int], image_size: int) -> torch.Tensor:
    """``…×4`` (y0, x0, y1, x1) → ``…×4`` (x0, y0, x1, y1) in SAM's resized frame."""
    xyxy = boxes_yxyx[..., [1, 0, 3, 2]]
    return ResizeLongestSide(image_size).apply_coords_torch(xyxy.reshape(*xyxy.shape[:-1], 2, 2),
                                                            tuple(hw)).reshape(xyxy.shape)
