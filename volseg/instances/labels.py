"""Per-block labelling of the semantic outputs: foreground = probability > threshold, then connected
components, or a watershed of the inverted density from seeds at density peaks (:func:`label_box`);
a block's core renumbered as pieces 1..N and their voxel counts (:func:`core_pieces`, :func:`piece_sizes`).

:class:`InstanceParams` says how every block labels (voxel units); :func:`instance_params` makes them
from the ``instances`` config and the voxel size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cc3d
import fastremap
import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from volseg.config import InstancesConfig
from volseg.geometry import Box, Coord

Method = Literal["watershed", "connected_components"]
#: The default watershed halo, in seed radii: one radius makes the core's seeds exact, the rest is
#: context for the flooding near the core's faces and for the overlap that pass 2 compares.
HALO_SEED_RADII = 4
#: cc3d connectivity → skimage watershed connectivity (how many axes a step may change at once).
WATERSHED_CONNECTIVITY = {6: 1, 18: 2, 26: 3}



@dataclass(frozen=True)
class InstanceParams:
    """How every block turns the semantic maps into instances (all voxel units, axes z, y, x).

    ``threshold``/``seed_threshold`` are probabilities in [0, 1] whatever the storage dtype.
    ``halo_vx`` is how far past its core a block reads (0 for connected components, which need none).
    ``connectivity`` (6, 18 or 26) says which voxels touch. ``channel`` picks the probabilities'
    channel when that output has several."""

    method: Method
    threshold: float
    seed_threshold: float = 0.3
    seed_radius_vx: Coord = (1, 1, 1)
    halo_vx: Coord = (0, 0, 0)
    connectivity: int = 6
    channel: int = 0

    def __post_init__(self) -> None:
        if self.connectivity not in WATERSHED_CONNECTIVITY:
            raise ValueError(f"connectivity {self.connectivity} is not one of {sorted(WATERSHED_CONNECTIVITY)}")

    @property
    def needs_density(self) -> bool:
        return self.method == "watershed"


def seed_radius(min_distance_nm: float, voxel_size_nm: Sequence[float]) -> Coord:
    """Half-width in voxels, per axis, of the box a seed must be the density maximum of (at least 1)."""
    return tuple(max(1, round(min_distance_nm / v)) for v in voxel_size_nm)


def instance_params(settings: InstancesConfig, voxel_size_nm: Sequence[float], default_threshold: float = 0.5,
                    halo_vx: Sequence[int] | None = None, connectivity: int = 6, channel: int = 0) -> InstanceParams:
    """The block parameters of ``settings`` on a volume of ``voxel_size_nm``; the foreground threshold
    defaults to ``default_threshold`` (``inference.threshold``), the watershed halo to
    :data:`HALO_SEED_RADII` seed radii."""
    radius = seed_radius(settings.min_distance_nm, voxel_size_nm)
    if halo_vx is None:
        halo_vx = (0, 0, 0) if settings.method == "connected_components" else tuple(HALO_SEED_RADII * r for r in radius)
    threshold = default_threshold if settings.threshold is None else settings.threshold
    return InstanceParams(settings.method, threshold, settings.seed_threshold, radius, tuple(halo_vx),
                          connectivity, channel)


def unit_range(values: np.ndarray) -> np.ndarray:
    """Stored probabilities or densities as float32 in their [0, 1] meaning: floats as they are, integers
    divided by their dtype's maximum (the inverse of :func:`volseg.inference.job.to_storage`)."""
    if values.dtype.kind == "f":
        return values.astype(np.float32, copy=False)
    return values.astype(np.float32) / np.float32(np.iinfo(values.dtype).max)


def watershed_seeds(density: np.ndarray, mask: np.ndarray, params: InstanceParams) -> np.ndarray:
    """Markers (int32, 0 = none) for the watershed of a box: foreground voxels whose density exceeds
    ``seed_threshold`` and is the maximum of the box of ``seed_radius_vx`` around them (as far as the
    box reaches). Touching seeds (a plateau) form one marker.

    Farther than the radius from the box's sides these are exactly the whole roi's seeds. Nearer,
    they also include voxels whose density rises out of the box: stand-ins for seeds outside it, so
    an object reaching in from a seed outside floods as its own piece (which the stitch joins to
    the rest of it) instead of being flooded from a touching object's seed inside the box."""
    footprint = np.ones(tuple(2 * r + 1 for r in params.seed_radius_vx), bool)
    peaks = peak_local_max(density, footprint=footprint, threshold_abs=params.seed_threshold, exclude_border=False)
    seeds = np.zeros(density.shape, bool)
    seeds[tuple(peaks.T)] = True
    markers, _ = ndimage.label(seeds & mask, structure=np.ones((3, 3, 3), bool))
    return markers


def label_box(params: InstanceParams, probabilities: np.ndarray, density: np.ndarray | None) -> np.ndarray:
    """Instance labels (uint32, 0 = background) of the voxels of a box from its semantic maps.

    Connected components of the foreground; or a watershed of the inverted density from
    :func:`watershed_seeds` inside the foreground, where foreground not reached from any seed (no
    peak in its component) becomes one instance per connected component."""
    mask = unit_range(probabilities) > params.threshold
    if params.method == "connected_components":
        return cc3d.connected_components(mask, connectivity=params.connectivity).astype(np.uint32, copy=False)
    if density is None:
        raise ValueError("the watershed needs the density map")
    height = unit_range(density)
    markers = watershed_seeds(height, mask, params)
    labels = watershed(-height, markers, mask=mask, connectivity=WATERSHED_CONNECTIVITY[params.connectivity])
    labels = labels.astype(np.uint32, copy=False)
    unseeded = mask & (labels == 0)
    if unseeded.any():
        rest = cc3d.connected_components(unseeded, connectivity=params.connectivity).astype(np.uint32)
        labels = np.where(unseeded, rest + labels.max(), labels)
    return labels


def core_pieces(labels: np.ndarray, box: Box, core: Box) -> tuple[np.ndarray, dict[int, int]]:
    """The core's labels renumbered 1..N (uint32), and the map box label → local id (labels seen only
    outside the core are absent)."""
    local, mapping = fastremap.renumber(labels[core.relative_to(box)], preserve_zero=True, in_place=False)
    return local.astype(np.uint32, copy=False), {int(k): int(v) for k, v in mapping.items() if k != 0}


def piece_sizes(local: np.ndarray) -> list[int]:
    """Voxel counts of local labels 1..N (all present, as :func:`core_pieces` makes them)."""
    labels, counts = fastremap.unique(local, return_counts=True)
    return [int(c) for label, c in zip(labels.tolist(), counts.tolist(), strict=True) if label != 0]
