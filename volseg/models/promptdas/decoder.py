"""Decoder f_D of Prompt-DAS: a SAM-style two-way transformer between tokens and image features.

Tokens are ``[mask token, prompt tokens…, contrastive tokens…]``. A token is *visible* when it may
influence anything else: the mask token and the valid prompts. Contrastive tokens (and padded,
invalid prompts) read the image and the visible tokens but no other token or the image ever reads
them, so the mask and density outputs are exactly what they would be without them::

    query \\ key      visible tokens   itself   other hidden tokens   image
    visible token         yes           yes           no               yes
    hidden token          yes           yes           no               yes
    image                 yes            —            no                —
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention whose inner width is ``dim / downsample``; ``mask`` is ``B×Lq×Lk`` bool
    (True: may attend)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        if inner % heads:
            raise ValueError(f"attention width {inner} is not divisible by {heads} heads")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, inner), nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        attn_mask = None if mask is None else mask.unsqueeze(1)
        out = F.scaled_dot_product_attention(self._split(self.q(q)), self._split(self.k(k)),
                                             self._split(self.v(v)), attn_mask=attn_mask)
        b, _, n, _ = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, -1))


class TwoWayBlock(nn.Module):
    """Token self-attention → tokens read the image → token MLP → the image reads the tokens."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, downsample: int) -> None:
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.token_to_image = Attention(dim, heads, downsample)
        self.image_to_token = Attention(dim, heads, downsample)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor,
                image_pe: torch.Tensor, self_mask: torch.Tensor, image_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        q = tokens + token_pe
        tokens = self.norms[0](tokens + self.self_attn(q, q, tokens, self_mask))
        tokens = self.norms[1](tokens + self.token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norms[2](tokens + self.mlp(tokens))
        image = self.norms[3](image + self.image_to_token(image + image_pe, tokens + token_pe, tokens, image_mask))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token→image attention.

    ``image``: ``B×D×h×w``; ``image_pe``: ``1×D×h×w``; ``tokens``: ``B×T×D``; ``visible``: ``B×T`` bool.
    Returns the tokens ``B×T×D`` and the image ``B×(h·w)×D`` after the exchange.
    """

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 8, mlp_dim: int = 2048,
                 downsample: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, downsample) for _ in range(depth))
        self.final = Attention(dim, heads, downsample)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor,
                visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, h, w = image.shape
        image = image.flatten(2).transpose(1, 2)
        image_pe = image_pe.flatten(2).transpose(1, 2).expand(b, -1, -1)
        t = tokens.shape[1]
        eye = torch.eye(t, dtype=torch.bool, device=tokens.device).unsqueeze(0)
        self_mask = visible.unsqueeze(1) | eye  # B×T×T: visible keys, and each token itself
        image_mask = visible.unsqueeze(1).expand(b, h * w, t)
        token_pe = tokens
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe, self_mask, image_mask)
        tokens = self.final_norm(tokens + self.final(tokens + token_pe, image + image_pe, image))
        return tokens, image
