"""The small trainable parts that prompt learning adds to a frozen SAM (cryo-EM prompt learning, All-in-SAM).

- :class:`HeadPrompt` — a 2-level U-Net in front of SAM: grey ``B×1×H×W`` → ``B×3×H×W``, the grey image
  plus a learned residual (zero at initialisation), turning low-contrast EM into SAM-friendly input.
- prefix tokens — ``P`` learned tokens per encoder block that every query of that block also attends to
  (keys and values only, as in prefix tuning / deep visual prompt tuning: their own outputs are discarded).
  SAM's blocks attend within 14×14 windows, so each window sees the block's prefix.
- :class:`Adapter` — a bottleneck MLP after each encoder block, added residually, zero at initialisation.

With the head prompt's and adapters' last layers at zero, an untrained prompted SAM computes exactly
what SAM computes (prefix tokens are the one part that changes outputs from the start). The encoder
forward below recomposes SAM's own ``Block`` pieces (``norm1``, ``attn.qkv``/``proj``/relative
positions, ``window_partition``, ``mlp``) only to let the prefix in; without prefix tokens each block
is called as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    Attention,
    Block,
    ImageEncoderViT,
    add_decomposed_rel_pos,
    window_partition,
    window_unpartition,
)
from torch import nn


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(1, c_out), nn.GELU())


class HeadPrompt(nn.Module):
    """A 2-level U-Net: grey ``B×1×H×W`` in [0, 1] → ``B×3×H×W`` (grey ×3 + a learned residual)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.down = nn.Sequential(_conv(1, width), _conv(width, width))
        self.bottom = nn.Sequential(_conv(width, 2 * width), _conv(2 * width, width))
        self.up = _conv(2 * width, width)
        self.out = nn.Conv2d(width, 3, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, grey: torch.Tensor) -> torch.Tensor:
        skip = self.down(grey)
        low = self.bottom(F.max_pool2d(skip, 2, ceil_mode=True))
        up = F.interpolate(low, size=tuple(skip.shape[-2:]), mode="bilinear", align_corners=False)
        return grey.expand(-1, 3, -1, -1) + self.out(self.up(torch.cat([skip, up], 1)))


class Adapter(nn.Module):
    """``x + up(gelu(down(x)))`` on ``B×H×W×C`` tokens; ``up`` starts at zero (the adapter starts as identity)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def attention_with_prefix(attn: Attention, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """SAM's attention over ``x`` (``B×H×W×C``) whose queries also attend to ``prefix`` (``P×C``) tokens.

    The prefix goes through the block's own ``qkv`` projection; relative positions apply between spatial
    tokens only. With ``P = 0`` this equals ``attn(x)``.
    """
    b, h, w, _ = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4).reshape(3, b * heads, h * w, -1)
    prefix_kv = attn.qkv(prefix).reshape(prefix.shape[0], 3, heads, q.shape[-1])[:, 1:].permute(1, 2, 0, 3)
    k_p, v_p = (t.repeat(b, 1, 1) for t in prefix_kv)  # (B·heads)×P×d, head index fastest like q
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if attn.use_rel_pos:
        logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w))
    weights = torch.cat([(q * attn.scale) @ k_p.transpose(-2, -1), logits], -1).softmax(dim=-1)
    out = weights @ torch.cat([v_p, v], 1)
    return attn.proj(out.view(b, heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def block_with_prefix(block: Block, x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """SAM's ``Block`` on ``B×H×W×C`` tokens, each (window's) attention also seeing ``prefix`` (``P×C``)."""
    if prefix is None:
        return block(x)
    shortcut, x = x, block.norm1(x)
    hw = tuple(x.shape[1:3])
    if block.window_size > 0:
        x, padded = window_partition(x, block.window_size)
    x = attention_with_prefix(block.attn, x, block.norm1(prefix))
    if block.window_size > 0:
        x = window_unpartition(x, block.window_size, padded, hw)
    x = shortcut + x
    return x + block.mlp(block.norm2(x))


def encode_with_prompts(encoder: ImageEncoderViT, x: torch.Tensor, prefix: torch.Tensor | None = None,
                        adapters: nn.ModuleList | None = None) -> torch.Tensor:
    """SAM's image encoder on ``B×3×S×S`` input, with ``prefix`` (``depth×P×C``) and/or one adapter per
    block; ``B×C_out×S/16×S/16`` (SAM's neck output). Without either, this is ``encoder(x)``."""
    if prefix is None and adapters is None:
        return encoder(x)
    x = encoder.patch_embed(x)
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for i, block in enumerate(encoder.blocks):
        x = block_with_prefix(block, x, None if prefix is None else prefix[i])
        if adapters is not None:
            x = adapters[i](x)
    return encoder.neck(x.permute(0, 3, 1, 2))
