"""Ortho-plane inference: a 2D model run on the xy, xz and yz planes of an isotropic volume.

A 2D model sees one slice at a time. On a volume whose voxels are (nearly) cubes, e.g. FIB-SEM, an
organelle looks the same cut along any axis, so the model can also read the volume's xz and yz planes;
the mean of the three predictions at a voxel draws on what its neighbours above and below show, and
averages out the errors one plane makes (MitoNet's "ortho-plane" inference does the same).

Each plane has its own global window grid: the configured window ``(1, W, W)`` and stride ``(1, S, S)``
lie in that plane, i.e. ``(W, 1, W)`` / ``(S, 1, S)`` for xz and ``(W, W, 1)`` / ``(S, S, 1)`` for yz. A
window is turned into the model's ``(1, W, W)`` slice by :class:`PlanePredictor` (its point prompts
likewise) and its prediction turned back. Every plane blends its own windows as a single-plane run
does, and the block's output is the mean of the planes' blended maps: blockwise output still equals
the whole-volume pass, plane by plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from volseg.errors import ConfigError
from volseg.geometry import Box, Coord
from volseg.inference.windows import WindowGrid

#: For each plane: the volume axes (z, y, x) that become the model's slice axes (1, rows, columns).
PLANE_AXES: dict[str, tuple[int, int, int]] = {"xy": (0, 1, 2), "xz": (1, 0, 2), "yz": (2, 0, 1)}
#: ``inference.planes`` → the planes a run reads.
PLANE_SETS: dict[str, tuple[str, ...]] = {"xy": ("xy",), "ortho": ("xy", "xz", "yz")}
#: The most a volume's largest voxel side may exceed its smallest for ortho-plane inference.
MAX_ANISOTROPY = 1.5


def plane_grid(windows: WindowGrid, plane: str) -> WindowGrid:
    """The global window grid of ``plane``: the xy grid's window and stride laid in that plane."""
    if plane == "xy":
        return windows
    axes = PLANE_AXES[plane]
    window, stride = [0, 0, 0], [0, 0, 0]
    for model_axis, volume_axis in enumerate(axes):
        window[volume_axis] = windows.window[model_axis]
        stride[volume_axis] = windows.stride[model_axis]
    return WindowGrid(windows.volume_shape, tuple(window), tuple(stride))


def planes_read_box(windows: WindowGrid, core: Box, planes: Sequence[str]) -> Box:
    """The voxels a block reads to evaluate every window of every plane that overlaps ``core``."""
    boxes = [plane_grid(windows, plane).read_box(core) for plane in planes]
    return Box(tuple(min(b.start[a] for b in boxes) for a in range(3)),
               tuple(max(b.stop[a] for b in boxes) for a in range(3)))


class PlanePredictor:
    """A 2D predictor run on windows that lie in ``plane``: each window (and its prompts, volume-ordered
    z, y, x within the window) is turned into the model's slice, predicted, and turned back."""

    def __init__(self, inner: Any, plane: str) -> None:
        self.inner = inner
        self.axes = PLANE_AXES[plane]
        self.back = tuple(int(a) for a in np.argsort(self.axes))

    @property
    def num_classes(self) -> int:
        return self.inner.num_classes

    @property
    def window(self) -> Coord:
        return tuple(self.inner.window[m] for m in self.back)

    def predict(self, windows: np.ndarray, prompts: Sequence[np.ndarray] | None = None) -> np.ndarray:
        turned = np.ascontiguousarray(windows.transpose(0, *(1 + a for a in self.axes)))
        turned_prompts = None if prompts is None else [np.asarray(p).reshape(-1, 3)[:, list(self.axes)]
                                                       for p in prompts]
        out = self.inner.predict(turned, turned_prompts)
        return np.ascontiguousarray(out.transpose(0, 1, *(2 + b for b in self.back)))


def resolve_planes(planes: str, window: Coord, voxel_size_nm: Sequence[float], dims: int, url: str
                   ) -> tuple[str, ...]:
    """The planes a run reads for ``inference.planes``: ``auto`` is ortho where :func:`check_planes`
    allows it (a 2D model, a square slice window, near-cubic voxels), else xy; ``ortho`` where it cannot
    mean what it says is refused."""
    if planes == "auto":
        try:
            check_planes("ortho", window, voxel_size_nm, dims, url)
        except ConfigError:
            return PLANE_SETS["xy"]
        return PLANE_SETS["ortho"]
    check_planes(planes, window, voxel_size_nm, dims, url)
    return PLANE_SETS[planes]


def check_planes(planes: str, window: Coord, voxel_size_nm: Sequence[float], dims: int, url: str) -> None:
    """Refuse ortho-plane inference where it cannot mean what it says: a 3D model, a window that is not
    one square slice, or voxels far from cubes (the model would see stretched planes)."""
    if planes == "xy":
        return
    if dims != 2:
        raise ConfigError("inference.planes is 'ortho', but the model is 3D: it already reads every axis.",
                          "set inference.planes: xy.")
    if window[0] != 1 or window[1] != window[2]:
        raise ConfigError(f"inference.planes 'ortho' lays the window in the xz and yz planes too, so it must "
                          f"be one square slice (1, W, W); it is {list(window)}.",
                          f"set inference.window to [1, {window[1]}, {window[1]}].")
    voxel = [float(v) for v in voxel_size_nm]
    if max(voxel) > MAX_ANISOTROPY * min(voxel):
        raise ConfigError(f"inference.planes is 'ortho', but {url} has voxels of {voxel} nm (z, y, x): its xz "
                          f"and yz planes are stretched {max(voxel) / min(voxel):.1f}× against the xy slices "
                          "the model learned.", "set inference.planes: xy (ortho needs voxels within "
                          f"{MAX_ANISOTROPY}× of cubes, e.g. FIB-SEM).")
