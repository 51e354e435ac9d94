"""SAM (Segment Anything) behind volseg's model interface: grey windows and volseg's prompts in, one
semantic probability map (and a density channel) out.

The network is segment-anything's own (``Sam``: ``ImageEncoderViT``, ``PromptEncoder``, ``MaskDecoder``,
``TwoWayTransformer``), in the variants ``b``, ``l``, ``h`` (official checkpoints, read from a local path)
and ``tiny`` (tests). :class:`SamSegmenter` adapts it to volseg's conventions::

    image B×1×H×W in [0, 1] ─ [head prompt] ─ SAM input (×3, ×255, resize, mean/std, pad) ─ encoder
        [+ prefix tokens, adapters] ─ embedding ─┬─ per point: one object prompt ─┐ mask decoder, per object
    points B×N×2 (y, x) + mask B×N ─────────────┤  per box: one object prompt ───┤ → logits at H×W
    boxes  B×M×4 (y0, x0, y1, x1) + mask B×M ───┘  none valid: SAM unprompted ──┘ → max over objects

Semantics, and why:
- Each valid point and each valid box prompts **one object** (SAM's unit), and the semantic logit is
  the maximum over the objects of a window. Prompt-DAS conditions one mask on all prompts; SAM cannot.
- A window's output depends only on its own valid prompts, never on how many padded rows its batch
  carries: SAM's decoder has no attention mask, so padding tokens would change the mask. Each sample is
  decoded with its valid prompts alone (the image encoder still runs batched). This keeps a blockwise
  run equal to a whole-volume pass.
- Zero valid prompts runs SAM's decoder with no sparse prompt at all (its "no prompt" embedding): the
  unprompted mode, which All-in-SAM and prompt learning train for prompt-free inference.
- Points use SAM's multimask output and keep the mask with the highest predicted IoU (SAM's advice for
  a single, ambiguous click); boxes and the unprompted mode use the single-mask output.
- **Density**: SAM has no centre-density head. The density channel is all zeros, so ``prompts.auto``
  cannot find prompts with SAM itself: take them from Prompt-DAS's density peaks (`volseg peaks` writes
  them as a points file for ``prompts.points``), and use ``instances.method: connected_components``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from volseg.errors import ConfigError
from volseg.models.registry import InputContract, ModelSpec, build_model, register
from volseg.models.sam.input import boxes_to_sam, encode_image, masks_to_image, points_to_sam
from volseg.models.sam.prompt_parts import Adapter, HeadPrompt, encode_with_prompts
from volseg.models.sam.variants import build_sam_module, sam_variant
from volseg.models.sam.weights import load_sam_weights, read_sam_state


class SamOutput(NamedTuple):
    """``logits`` ``B×1×H×W`` (semantic: max over the prompted objects, or SAM's unprompted mask);
    ``density`` ``B×1×H×W`` (zeros: SAM has no density head)."""

    logits: torch.Tensor
    density: torch.Tensor


class SamSegmenter(nn.Module):
    """SAM with volseg's forward ``(image, points, point_mask, boxes, box_mask) → SamOutput``.

    Options (``model.options``): ``variant`` b | l | h | tiny; the prompt-learning parts ``head_prompt``
    (bool) with ``head_prompt_width``, ``prefix_tokens`` (P per encoder block), ``adapter_dim``
    (bottleneck of one adapter per encoder block; 0: none); ``multimask`` (points: best of SAM's three
    masks by predicted IoU); ``objects_per_pass`` (objects decoded at once, bounds memory).
    SAM's own weights live under ``sam.`` with the official tensor names; the added parts beside it.
    """

    #: Takes point prompts (``forward(image, points, point_mask)``); predictors route prompts to it.
    promptable = True
    #: No centre-density head: the density channel is zeros (so `prompts.auto` has nothing to find).
    predicts_density = False

    def __init__(self, num_classes: int = 1, variant: str = "b", head_prompt: bool = False,
                 head_prompt_width: int = 16, prefix_tokens: int = 0, adapter_dim: int = 0,
                 multimask: bool = True, objects_per_pass: int = 16, dims: int = 2) -> None:
        super().__init__()
        if num_classes != 1 or dims != 2:
            raise ConfigError(f"model sam has num_classes {num_classes} and dims {dims}; SAM segments one "
                              "foreground class in 2D slices.", "set model.num_classes: 1 and leave dims at 2.")
        self.variant = sam_variant(variant)
        self.sam = build_sam_module(self.variant)
        width = self.variant.embed_dim
        depth = len(self.sam.image_encoder.blocks)
        self.head_prompt = HeadPrompt(head_prompt_width) if head_prompt else None
        self.prefix_tokens = nn.Parameter(torch.randn(depth, prefix_tokens, width) * 0.02) if prefix_tokens else None
        self.adapters = nn.ModuleList(Adapter(width, adapter_dim) for _ in range(depth)) if adapter_dim else None
        self.multimask = bool(multimask)
        self.objects_per_pass = max(1, int(objects_per_pass))
        self.num_classes = 1

    @property
    def image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters that are not SAM's own (head prompt, prefix tokens, adapters)."""
        own = {id(p) for p in self.sam.parameters()}
        return [p for p in self.parameters() if id(p) not in own]

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """``B×1×H×W`` grey in [0, 1] → SAM's image embedding ``B×C×h×w`` (through the added parts)."""
        rgb = self.head_prompt(image) if self.head_prompt is not None else image.expand(-1, 3, -1, -1)
        return encode_with_prompts(self.sam.image_encoder, encode_image(self.sam, rgb), self.prefix_tokens,
                                   self.adapters)

    def decode(self, embedding: torch.Tensor, hw: tuple[int, int], points_yx: torch.Tensor | None = None,
               boxes_yxyx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of one image (``embedding`` ``1×C×h×w``): one object per point (``n×2``) and per box
        (``m×4``), or SAM's unprompted mask when both are None/empty. Returns (logits ``K×1×H×W``,
        predicted IoU ``K``) with ``K = n + m`` (1 when unprompted)."""
        n = 0 if points_yx is None else len(points_yx)
        m = 0 if boxes_yxyx is None else len(boxes_yxyx)
        if n + m == 0:
            return self._decode(embedding, hw, None, None, multimask=False)
        parts = []
        for begin in range(0, n, self.objects_per_pass):
            chunk = points_yx[begin : begin + self.objects_per_pass]
            xy = points_to_sam(chunk, hw, self.image_size)[:, None, :]
            labels = torch.ones(xy.shape[:2], device=xy.device)
            parts.append(self._decode(embedding, hw, (xy, labels), None, multimask=self.multimask))
        for begin in range(0, m, self.objects_per_pass):
            boxes = boxes_to_sam(boxes_yxyx[begin : begin + self.objects_per_pass], hw, self.image_size)
            parts.append(self._decode(embedding, hw, None, boxes, multimask=False))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _decode(self, embedding: torch.Tensor, hw: tuple[int, int],
                points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, multimask: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=boxes, masks=None)
        low, iou = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=multimask)
        if multimask:
            best = iou.argmax(dim=1)
            rows = torch.arange(len(best), device=best.device)
            low, iou = low[rows, best][:, None], iou[rows, best][:, None]
        return masks_to_image(self.sam, low, hw), iou[:, 0]

    def forward(self, image: torch.Tensor, points: torch.Tensor | None = None, point_mask: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None, box_mask: torch.Tensor | None = None) -> SamOutput:
        """``image`` ``B×1×H×W`` in [0, 1]; ``points`` ``B×N×2`` pixel (y, x) with ``point_mask`` ``B×N``
        bool; ``boxes`` ``B×M×4`` (y0, x0, y1, x1, inclusive pixel corners) with ``box_mask`` ``B×M``
        (masks default to all valid). See the module docstring for what the prompts mean."""
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        embeddings = self.embed(image)
        logits = []
        for b in range(image.shape[0]):
            p = _valid(points, point_mask, b)
            q = _valid(boxes, box_mask, b)
            objects, _ = self.decode(embeddings[b : b + 1], hw, p, q)
            logits.append(objects.amax(dim=0, keepdim=True))
        out = torch.cat(logits)
        return SamOutput(out, torch.zeros_like(out))


def _valid(values: torch.Tensor | None, mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    if values is None or values.shape[1] == 0:
        return None
    rows = values[b]
    return rows if mask is None else rows[mask[b].bool()]


def load_sam(path: str | Path, spec: ModelSpec) -> SamSegmenter:
    """A :class:`SamSegmenter` of ``spec`` with SAM's official weights from ``path`` (``.pth``); the
    added parts keep their initialisation (identity for head prompt and adapters). Refuses a missing
    file or one of another variant before building the model."""
    variant = sam_variant(dict(spec.options).get("variant", "b"))
    state = read_sam_state(path, variant)
    model = build_model(spec)
    assert isinstance(model, SamSegmenter)
    load_sam_weights(model.sam, state, path)
    return model.eval()


def _contract(spec: ModelSpec) -> InputContract:
    # Grey in [0, 1]; SAM's resizing and pixel statistics are applied inside the model.
    return InputContract(dims=2, size_multiple=1, mean=0.0, std=1.0)


register("sam", SamSegmenter, _contract,
         "SAM (segment-anything ViT-B/L/H, tiny): point/box prompts per object; prompt learning, adapters",
         load=load_sam)
