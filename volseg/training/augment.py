"""Augmentations: the weak (teacher) and strong (student) views of a crop, kept aligned with targets.

Images are ``B×1×Y×X`` in [0, 1] (Prompt-DAS input) or standardised (U-Net). A geometric transform is
one object that is applied to the image, to every label map, and to point coordinates, so a point on
an object stays on that object in the transformed view::

    crop ──elastic warp──▶ ──rot90 ×k──▶ ──flip x?──▶ student view
    label maps, density, valid mask: the same chain (nearest / bilinear resampling)
    points (y, x): the inverse warp, then the exact rot90 / flip index maps
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from volseg.models.views import PlaneView


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of the weak and strong views (intensities on the [0, 1] scale).

    The defaults are the student's view of target crops: strong, yet the organelles stay recognisable.
    :data:`WIDE` is for labelled source crops, to widen what the source model sees.

    weak_intensity: the teacher's view gets contrast ``1 ± w`` and brightness ``± w``.
    brightness, contrast, gamma: the student's view gets brightness ``± brightness``, contrast
        ``1 ± contrast`` around the mean and ``v ** g`` with ``log g`` uniform in ``± log gamma``.
    noise_sigma: Gaussian noise with a standard deviation uniform in ``[0, noise_sigma]``.
    blur_sigma_vx, blur_probability: a Gaussian blur of sigma uniform in ``[0, blur_sigma_vx]``.
    elastic_alpha_vx, elastic_grid: a smooth random displacement, Gaussian with standard deviation
        ``elastic_alpha_vx`` pixels at ``elastic_grid × elastic_grid`` control points, bicubically
        interpolated; 0 turns it off.
    zoom: a random magnification, log-uniform in ``[1/zoom, zoom]`` about the crop's centre, so that a
        model meets organelles of other sizes (1: off).
    """

    weak_intensity: float = 0.05
    brightness: float = 0.15
    contrast: float = 0.2
    gamma: float = 1.2
    noise_sigma: float = 0.03
    blur_sigma_vx: float = 1.0
    blur_probability: float = 0.5
    elastic_alpha_vx: float = 2.0
    elastic_grid: int = 4
    zoom: float = 1.0

    @property
    def labelled_padding(self) -> Literal["border", "reflection"]:
        """What the warp of a labelled crop (image, labels, density alike) reads outside the crop: the
        mirrored crop when it zooms (a zoom out reads well past the edge), else the edge pixels."""
        return "reflection" if self.zoom > 1 else "border"


#: Source-crop augmentation: wider contrast, noise and blur ranges than the target student's view.
WIDE = AugmentSettings(contrast=0.6, gamma=1.4, noise_sigma=0.1, blur_sigma_vx=2.0)


def _uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


@dataclass(frozen=True)
class GeometricTransform:
    """A zoom and an elastic warp, then ``rotations`` × 90° (``torch.rot90`` on y, x), then a flip of x
    if ``flip``.

    ``displacement`` (``2×Y×X`` pixels (dy, dx), or None) and ``scale``: output pixel ``p`` of the warp
    reads the input at ``c + (p + d(p) − c) / scale``, ``c`` the crop's centre (``scale`` > 1 magnifies).
    Point coordinates are pixel (y, x) with pixel centres at integers.
    """

    rotations: int
    flip: bool
    displacement: torch.Tensor | None = None
    scale: float = 1.0

    @classmethod
    def random(cls, generator: torch.Generator, shape_yx: tuple[int, int], elastic_alpha_vx: float = 0.0,
               elastic_grid: int = 4, zoom: float = 1.0) -> GeometricTransform:
        """A uniformly random rotation and flip, an elastic warp when ``elastic_alpha_vx > 0`` and a
        log-uniform zoom in ``[1/zoom, zoom]`` when ``zoom > 1``."""
        rotations = int(torch.randint(0, 4, (1,), generator=generator))
        flip = bool(torch.randint(0, 2, (1,), generator=generator))
        displacement = None
        if elastic_alpha_vx > 0:
            coarse = elastic_alpha_vx * torch.randn((1, 2, elastic_grid, elastic_grid), generator=generator)
            displacement = F.interpolate(coarse, size=shape_yx, mode="bicubic", align_corners=True)[0]
        scale = 1.0
        if zoom > 1:
            scale = float(torch.exp(_uniform(generator, (1,), -float(np.log(zoom)), float(np.log(zoom)))))
        return cls(rotations, flip, displacement, scale)

    def apply(self, maps: torch.Tensor, mode: Literal["bilinear", "nearest"] = "bilinear",
              padding: Literal["border", "zeros", "reflection"] = "border") -> torch.Tensor:
        """Transform ``C×Y×X`` maps. ``mode``: bilinear for images and densities, nearest for labels;
        ``padding``: what the warp reads outside the crop (``zeros`` marks it invalid in a valid mask,
        ``reflection`` mirrors the crop)."""
        if self.displacement is not None or self.scale != 1:
            maps = self._warp(maps, mode, padding)
        return self.view.apply(maps)

    @property
    def view(self) -> PlaneView:
        """The rotation and flip, without the warp."""
        return PlaneView(self.rotations, self.flip)

    def points(self, points_yx: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
        """Where ``M×2`` points (y, x) of a ``Y×X`` crop land in the transformed view.

        The warp is inverted by fixed-point iteration (exact for displacements smooth on the scale of
        a pixel); warped points are kept inside the crop, and points a zoom moves out of it are dropped.
        """
        p = np.asarray(points_yx, dtype=np.float64).reshape(-1, 2).copy()
        if self.scale != 1:  # input q = c + (p + d(p) − c) / s  ⇔  p + d(p) = c + s (q − c)
            size = np.asarray(shape_yx, dtype=np.float64)
            p = (size - 1) / 2 + self.scale * (p - (size - 1) / 2)
            p = p[np.all((p >= -0.5) & (p <= size - 0.5), axis=1)]
        if self.displacement is not None and len(p):
            p = self._unwarp(p, shape_yx)
        return self.view.points(np.clip(p, 0, np.asarray(shape_yx) - 1), shape_yx)

    def _warp(self, maps: torch.Tensor, mode: str, padding: str) -> torch.Tensor:
        h, w = maps.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        if self.displacement is not None:
            ys, xs = ys + self.displacement[0], xs + self.displacement[1]
        y, x = ys, xs
        if self.scale != 1:  # (zoom 1 is exactly the warp it was: no rounding from a division by 1)
            cy, cx = (h - 1) / 2, (w - 1) / 2
            y, x = cy + (ys - cy) / self.scale, cx + (xs - cx) / self.scale
        grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1).unsqueeze(0)
        out = F.grid_sample(maps.unsqueeze(0).float(), grid, mode=mode, padding_mode=padding, align_corners=True)
        return out[0].to(maps.dtype)

    def _unwarp(self, q: np.ndarray, shape_yx: tuple[int, int]) -> np.ndarray:
        h, w = shape_yx
        d = self.displacement.numpy()
        p = q.copy()
        for _ in range(8):  # solve p + d(p) = q, with d bilinearly interpolated
            y, x = np.clip(p[:, 0], 0, h - 1), np.clip(p[:, 1], 0, w - 1)
            y0 = np.clip(np.floor(y).astype(int), 0, max(h - 2, 0))
            x0 = np.clip(np.floor(x).astype(int), 0, max(w - 2, 0))
            y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
            fy, fx = (y - y0)[:, None], (x - x0)[:, None]
            top = d[:, y0, x0].T * (1 - fx) + d[:, y0, x1].T * fx
            bottom = d[:, y1, x0].T * (1 - fx) + d[:, y1, x1].T * fx
            p = q - (top * (1 - fy) + bottom * fy)
        return np.stack([np.clip(p[:, 0], 0, h - 1), np.clip(p[:, 1], 0, w - 1)], axis=1)


def weak_view(generator: torch.Generator, image: torch.Tensor, strength: float = 0.05) -> torch.Tensor:
    """The teacher's view of a ``B×1×Y×X`` [0, 1] batch: a mild per-sample contrast and brightness change."""
    shape = (image.shape[0], 1, 1, 1)
    contrast = _uniform(generator, shape, 1 - strength, 1 + strength)
    brightness = _uniform(generator, shape, -strength, strength)
    return ((image - 0.5) * contrast + 0.5 + brightness).clamp(0, 1)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))


def strong_intensity(generator: torch.Generator, image: torch.Tensor, settings: AugmentSettings) -> torch.Tensor:
    """The student's intensity changes on a ``B×1×Y×X`` [0, 1] batch, per sample: gamma, contrast around
    the mean, brightness, blur (with probability ``blur_probability``), Gaussian noise; clamped to [0, 1]."""
    b = image.shape[0]
    shape = (b, 1, 1, 1)
    log_gamma = np.log(settings.gamma)
    gamma = torch.exp(_uniform(generator, shape, -log_gamma, log_gamma))
    out = image.clamp(0, 1) ** gamma
    mean = out.mean(dim=(-2, -1), keepdim=True)
    contrast = _uniform(generator, shape, 1 - settings.contrast, 1 + settings.contrast)
    out = (out - mean) * contrast + mean + _uniform(generator, shape, -settings.brightness, settings.brightness)
    blur = torch.rand(b, generator=generator) < settings.blur_probability
    sigmas = _uniform(generator, (b,), 0.0, settings.blur_sigma_vx)
    if settings.blur_sigma_vx > 0:
        out = torch.stack([_gaussian_blur(o[None], float(s))[0] if bl and s > 0.2 else o
                           for o, bl, s in zip(out, blur, sigmas, strict=True)])
    noise = _uniform(generator, shape, 0.0, settings.noise_sigma) * torch.randn(out.shape, generator=generator)
    return (out + noise).clamp(0, 1)


def flip_rotate(generator: torch.Generator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same random flip and 90° rotation (in the y, x plane) applied to every tensor."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return tuple(out)


def intensity_jitter(generator: torch.Generator, image: torch.Tensor, strength: float = 0.1) -> torch.Tensor:
    """Random per-sample brightness/contrast change and Gaussian noise on a standardised image."""
    b = image.shape[0]
    shape = (b,) + (1,) * (image.dim() - 1)
    contrast = 1 + strength * (2 * torch.rand(shape, generator=generator) - 1)
    brightness = strength * (2 * torch.rand(shape, generator=generator) - 1)
    noise = strength * torch.randn(image.shape, generator=generator)
    return image * contrast + brightness + noise
