"""Seeded synthetic EM volumes with mitochondria labels, rendered in the style of a chosen microscope.

A volume is made in two steps. First a **scene** is built in physical units (nm), independent of how
it will look: cells from a warped Voronoi tessellation whose walls are thin membrane sheets,
mitochondria as non-overlapping swept-sphere tubes (straight, curved, spindle-shaped or branching)
that each lie inside one cell, vesicles as small spheres, and band-limited cytoplasm texture. Then a
:class:`DomainStyle` renders the scene: grey levels of cytoplasm, mitochondrial matrix, cristae and
membranes, blur, gamma, contrast, noise and slice-to-slice jitter, quantised to ``uint8``.

Geometry depends only on ``(shape_zyx, voxel_size_nm, object_scale, density, seed)``; everything
else in the style changes the look, never the labels. So two styles with the same voxel size and
object scale render the *same* objects, which is how tests and adaptation experiments get paired
volumes::

    tem = DOMAINS["tem"]
    fib_look = dataclasses.replace(
        DOMAINS["fibsem"], voxel_size_nm=tem.voxel_size_nm, object_scale=tem.object_scale
    )
    a = generate_volume((32, 256, 256), tem, seed=3)
    b = generate_volume((32, 256, 256), fib_look, seed=3)   # b.labels == a.labels, b.raw != a.raw

Because sizes are physical, the same objects cover more voxels at a smaller voxel size: a
mitochondrion 250 nm across spans about 60 voxels at 4 nm and about 30 at 8 nm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from volseg.errors import ConfigError

# Streams of the seeded generator; geometry and texture streams never see style parameters.
_GEOMETRY, _TEXTURE, _NOISE = 0, 1, 2

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class DomainStyle:
    """How a microscope renders a scene; intensities are on a 0 (black) … 1 (white) scale.

    Geometry fields (change the labels):
        voxel_size_nm: voxel size (z, y, x) in nm.
        object_scale: multiplies the physical size of mitochondria and cells (tissue differences).

    Look fields (change only ``raw``):
        cytoplasm_level: mean grey of cytoplasm before contrast and gamma.
        mito_matrix_rel: grey of the mitochondrial matrix relative to cytoplasm (< 1: darker).
        cristae_darkness: how much cristae darken the matrix.
        membrane_darkness: how much cell membranes darken; mitochondrial and vesicle membranes scale
            with it.
        texture_strength: amplitude of cytoplasm texture.
        blur_sigma_vx: Gaussian point-spread sigma (z, y, x) in voxels, applied before noise.
        invert: flip grey levels (1 - v) after blur, as for back-scattered electron images.
        gamma: ``v ** gamma`` after inversion (> 1 darkens mid-greys).
        contrast: scale around mid-grey 0.5; brightness: offset added after.
        noise_sigma: standard deviation of additive Gaussian noise.
        shot_noise: Poisson-like noise, standard deviation ``shot_noise * sqrt(v)``.
        slice_jitter: standard deviation of a per-z-slice gain and offset (serial-section TEM).
    """

    name: str
    voxel_size_nm: tuple[float, float, float]
    object_scale: float = 1.0
    cytoplasm_level: float = 0.65
    mito_matrix_rel: float = 0.7
    cristae_darkness: float = 0.2
    membrane_darkness: float = 0.5
    texture_strength: float = 0.07
    blur_sigma_vx: tuple[float, float, float] = (0.5, 0.8, 0.8)
    invert: bool = False
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise_sigma: float = 0.03
    shot_noise: float = 0.0
    slice_jitter: float = 0.0

    def __post_init__(self) -> None:
        for name in ("voxel_size_nm", "blur_sigma_vx"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 0 or (name == "voxel_size_nm" and min(value) <= 0):
                raise ConfigError(
                    f"DomainStyle {self.name!r}: {name}={getattr(self, name)} is not three sizes (z, y, x).",
                    f"Give three {'positive' if name == 'voxel_size_nm' else 'non-negative'} numbers.",
                )
            object.__setattr__(self, name, value)
        if self.object_scale <= 0 or self.gamma <= 0:
            raise ConfigError(
                f"DomainStyle {self.name!r}: object_scale and gamma must be positive.",
                "Use e.g. object_scale=1.0, gamma=1.0.",
            )


DOMAINS: dict[str, DomainStyle] = {
    # Serial-section TEM (like the Drosophila VNC set): thick sections, sharp and contrasty in-plane,
    # dark mitochondria, little noise, but every section is stained and imaged a little differently.
    "tem": DomainStyle(
        name="tem",
        voxel_size_nm=(40.0, 4.0, 4.0),
        cytoplasm_level=0.6,
        mito_matrix_rel=0.68,
        cristae_darkness=0.26,
        membrane_darkness=0.55,
        texture_strength=0.07,
        blur_sigma_vx=(0.3, 0.7, 0.7),
        gamma=1.0,
        contrast=1.35,
        brightness=0.0,
        noise_sigma=0.025,
        shot_noise=0.02,
        slice_jitter=0.04,
    ),
    # FIB-SEM (like the Lucchi hippocampus set): isotropic, flat and grey, blurrier and noisier,
    # mitochondria only a little darker than cytoplasm but with well-marked cristae.
    "fibsem": DomainStyle(
        name="fibsem",
        voxel_size_nm=(8.0, 8.0, 8.0),
        object_scale=1.3,
        cytoplasm_level=0.64,
        mito_matrix_rel=0.8,
        cristae_darkness=0.32,
        membrane_darkness=0.5,
        texture_strength=0.09,
        blur_sigma_vx=(1.0, 1.0, 1.0),
        gamma=1.3,
        contrast=0.75,
        brightness=0.06,
        noise_sigma=0.05,
        shot_noise=0.06,
        slice_jitter=0.0,
    ),
}


@dataclass(frozen=True)
class SyntheticVolume:
    """A generated volume and its ground truth, all arrays (z, y, x) of the same shape.

    raw: ``uint8`` image. labels: ``uint32`` instance ids, 0 background, 1..N mitochondria, each
    instance one 26-connected component. centers_zyx: ``(N, 3)`` float voxel coordinates of each
    instance's innermost voxel (the peak of its distance to the surface, so always inside the
    instance), row ``i`` for label ``i + 1``. voxel_size_nm: (z, y, x). domain: the style's name.
    """

    raw: np.ndarray
    labels: np.ndarray
    centers_zyx: np.ndarray
    voxel_size_nm: tuple[float, float, float]
    domain: str

    @property
    def mito(self) -> np.ndarray:
        """Semantic mask, ``uint8``: 1 inside any mitochondrion, 0 elsewhere."""
        return (self.labels > 0).astype(np.uint8)

    @property
    def num_instances(self) -> int:
        return int(self.centers_zyx.shape[0])


def generate_volume(
    shape_zyx: tuple[int, int, int],
    domain: str | DomainStyle = "tem",
    seed: int = 0,
    density: float = 0.12,
) -> SyntheticVolume:
    """Generate a synthetic EM volume of ``shape_zyx`` voxels in the style ``domain``.

    ``domain`` is a key of :data:`DOMAINS` or a :class:`DomainStyle`. ``density`` is the target
    fraction of voxels inside mitochondria; objects are added until it is reached or no more fit
    (small volumes, or volumes cut thin across z, may stay below it). The result is a pure function of
    the arguments: the same call returns the same bytes.
    """
    style = _resolve_style(domain)
    shape = _validate_shape(shape_zyx)
    if not 0.0 < density <= 0.4:
        raise ConfigError(f"density {density} is out of range.", "Pass a fraction in (0, 0.4].")
    scene = _build_scene(shape, style.voxel_size_nm, style.object_scale, density, seed)
    raw = _render(scene, style, np.random.default_rng([seed, _NOISE]))
    return SyntheticVolume(
        raw=raw,
        labels=scene.labels,
        centers_zyx=scene.centers_zyx,
        voxel_size_nm=tuple(float(v) for v in style.voxel_size_nm),
        domain=style.name,
    )


def _resolve_style(domain: str | DomainStyle) -> DomainStyle:
    if isinstance(domain, DomainStyle):
        return domain
    if domain not in DOMAINS:
        raise ConfigError(
            f"Unknown synthetic domain {domain!r}.",
            f"Use one of {sorted(DOMAINS)} or pass a DomainStyle.",
        )
    return DOMAINS[domain]


def _validate_shape(shape_zyx: tuple[int, int, int]) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(
            f"Volume shape {tuple(shape_zyx)} is not a 3D shape.",
            "Pass three positive sizes (z, y, x), e.g. (32, 256, 256).",
        )
    return shape  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Scene: geometry and texture in physical units, independent of the look.


@dataclass
class _Scene:
    """Component maps of a scene, each float32 (z, y, x) unless stated."""

    labels: np.ndarray  # uint32 instances
    centers_zyx: np.ndarray  # (N, 3) float64
    cell_membrane: np.ndarray  # 0..1 membrane sheet weight
    cell_tone: np.ndarray  # per-cell cytoplasm offset, ~N(0, 1)
    mito_membrane: np.ndarray  # 0..~1.8 double-membrane weight, inside mitochondria only
    cristae: np.ndarray  # 0..1 inside mitochondria only
    vesicles: np.ndarray  # rim weight (> 0) and lighter lumen (< 0)
    texture: np.ndarray  # zero-mean, unit-variance cytoplasm texture
    fine_texture: np.ndarray  # zero-mean, unit-variance granularity


def _build_scene(
    shape: tuple[int, int, int], voxel_nm: tuple[float, float, float], scale: float, density: float, seed: int
) -> _Scene:
    vs = np.asarray(voxel_nm, dtype=np.float64)
    geo = np.random.default_rng([seed, _GEOMETRY])
    membrane_dist, cell_tone = _cell_field(shape, vs, scale, geo)
    mitos = _place_mitochondria(shape, vs, scale, density, membrane_dist, geo)
    vesicles = _vesicle_map(shape, vs, mitos.labels, geo)
    width = max(5.0, 0.45 * float(vs[1:].min()))
    membrane = np.exp(-0.5 * (membrane_dist / width) ** 2).astype(np.float32)
    texture, fine = _textures(shape, vs, np.random.default_rng([seed, _TEXTURE]))
    return _Scene(
        labels=mitos.labels,
        centers_zyx=mitos.centers,
        cell_membrane=membrane,
        cell_tone=cell_tone,
        mito_membrane=mitos.membrane,
        cristae=mitos.cristae,
        vesicles=vesicles,
        texture=texture,
        fine_texture=fine,
    )


def _coarse_grid(
    shape: tuple[int, int, int], vs: np.ndarray, spacing_nm: float
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Integer subsampling factors giving about ``spacing_nm`` per coarse step, and the coarse shape
    whose grid point ``i`` sits on voxel ``i * factor`` and which covers the last voxel."""
    factors = tuple(max(1, round(spacing_nm / v)) for v in vs)
    coarse = tuple((n - 1) // f + 2 for n, f in zip(shape, factors, strict=True))
    return factors, coarse


def _linear_weights(n: int, factor: int, coarse_n: int) -> tuple[np.ndarray, np.ndarray]:
    """For voxels ``0..n-1`` on a :func:`_coarse_grid` axis: the lower grid index and the weight of
    the upper one."""
    pos = np.arange(n, dtype=np.float64) / factor
    lower = np.minimum(np.floor(pos).astype(np.intp), coarse_n - 2)
    return lower, (pos - lower).astype(np.float32)


def _upsample_linear(coarse: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation from a :func:`_coarse_grid` array to the full voxel grid
    (any number of leading axes, as many as ``factors``)."""
    out = coarse.astype(np.float32, copy=False)
    for axis, (n, f) in enumerate(zip(shape, factors, strict=True)):
        lower, w = _linear_weights(n, f, out.shape[axis])
        w = w.reshape([n if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lower, axis=axis) * (1 - w) + np.take(out, lower + 1, axis=axis) * w
    return out


def _upsample_nearest(coarse: np.ndarray, factors: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-grid-point upsampling from a :func:`_coarse_grid` array to the full voxel grid."""
    out = coarse
    for axis, (n, f) in enumerate(zip(shape, factors, strict=True)):
        index = np.minimum(np.rint(np.arange(n) / f).astype(np.intp), out.shape[axis] - 1)
        out = np.take(out, index, axis=axis)
    return out


def _cell_field(
    shape: tuple[int, int, int], vs: np.ndarray, scale: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Distance (nm) of every voxel to the nearest cell wall, and a per-cell cytoplasm tone.

    Cells are a Voronoi tessellation of random seeds, stretched 2x along z (neurites run through the
    sections) and bent by a smooth warp. The three nearest seeds are found on a ~24 nm grid; each voxel
    then takes the nearest of its grid point's three as its own cell and measures its exact distance
    to the bisectors with the other two, so walls and 3-cell junctions are sharp (no interpolation).
    Done slice by slice to keep memory at a few full-size arrays.
    """
    spacing = 850.0 * scale
    stretch = np.array([0.5, 1.0, 1.0])
    extent = np.asarray(shape) * vs * stretch
    lo, hi = -0.5 * spacing, extent + 0.5 * spacing
    n_seeds = max(4, int(rng.poisson(np.prod(hi - lo) / spacing**3)))
    seeds = rng.uniform(lo, hi, size=(n_seeds, 3))
    tone = rng.normal(0.0, 1.0, n_seeds).astype(np.float32)
    waves_k = rng.normal(size=(3, 3, 3))
    waves_k *= (2 * np.pi / rng.uniform(1200.0, 3000.0, (3, 3, 1)) / scale) / np.linalg.norm(
        waves_k, axis=-1, keepdims=True
    )
    waves_phase = rng.uniform(0, 2 * np.pi, (3, 3))

    factors, coarse_shape = _coarse_grid(shape, vs, 24.0)
    axes = [np.arange(c) * f * v * s for c, f, v, s in zip(coarse_shape, factors, vs, stretch, strict=True)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    warp = np.stack([np.sin(grid @ waves_k[c].T + waves_phase[c]).sum(1) for c in range(3)], axis=1)
    warped = (grid + 50.0 * scale * warp).reshape(*coarse_shape, 3)
    _, nearest = cKDTree(seeds).query(warped.reshape(-1, 3), k=3)
    bisectors = _bisectors(seeds[nearest]).reshape(-1, coarse_shape[1] * coarse_shape[2], 3, 4)
    tones = tone[nearest].reshape(-1, coarse_shape[1] * coarse_shape[2], 3)

    walls = np.empty(shape, dtype=np.float32)
    cell_tone = np.empty(shape, dtype=np.float32)
    lower, weight = _linear_weights(shape[0], factors[0], coarse_shape[0])
    closest_z = np.minimum(np.rint(np.arange(shape[0]) / factors[0]).astype(np.intp), coarse_shape[0] - 1)
    closest_yx = _upsample_nearest(
        np.arange(coarse_shape[1] * coarse_shape[2]).reshape(coarse_shape[1:]), factors[1:], shape[1:]
    )
    for z in range(shape[0]):
        plane = warped[lower[z]] * (1 - weight[z]) + warped[lower[z] + 1] * weight[z]
        coords = [_upsample_linear(plane[..., k], factors[1:], shape[1:]) for k in range(3)]
        walls[z], cell_tone[z] = _voronoi_walls(
            coords, bisectors[closest_z[z]][closest_yx], tones[closest_z[z]][closest_yx]
        )
    return walls, cell_tone


def _bisectors(candidates: np.ndarray) -> np.ndarray:
    """Bisector planes of the candidate seed pairs (0, 1), (0, 2), (1, 2).

    ``candidates`` is (..., 3 seeds, 3 coords); returns float32 (..., 3 pairs, 4) with ``[n, c]`` such
    that ``n . x + c`` is the signed distance of x to the bisector of pair (a, b), positive on a's side.
    """
    a = candidates[..., [0, 0, 1], :]
    b = candidates[..., [1, 2, 2], :]
    separation = np.linalg.norm(a - b, axis=-1, keepdims=True)
    normal = (a - b) / separation
    offset = (np.sum(b**2, axis=-1, keepdims=True) - np.sum(a**2, axis=-1, keepdims=True)) / (2 * separation)
    return np.concatenate([normal, offset], axis=-1).astype(np.float32)


def _voronoi_walls(
    coords: list[np.ndarray], bisectors: np.ndarray, tones: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to the nearest wall of the own cell among three candidate seeds per voxel, and the own
    cell's tone. ``coords``: the voxels' warped positions, one array per axis; ``bisectors`` and
    ``tones``: per voxel, from :func:`_bisectors` and the candidates' tones."""
    h01, h02, h12 = (
        bisectors[..., p, 0] * coords[0]
        + bisectors[..., p, 1] * coords[1]
        + bisectors[..., p, 2] * coords[2]
        + bisectors[..., p, 3]
        for p in range(3)
    )
    own0 = (h01 >= 0) & (h02 >= 0)
    own1 = ~own0 & (h01 < 0) & (h12 >= 0)
    walls = np.where(
        own0, np.minimum(h01, h02), np.where(own1, np.minimum(-h01, h12), np.minimum(-h02, -h12))
    )
    tone = np.where(own0, tones[..., 0], np.where(own1, tones[..., 1], tones[..., 2]))
    return walls, tone


def _textures(
    shape: tuple[int, int, int], vs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Blotchy cytoplasm texture (~60 nm features) and fine granularity (~8 nm), both unit variance."""
    factors, coarse_shape = _coarse_grid(shape, vs, 30.0)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32), 1.2)
    blotch = _upsample_linear(coarse / max(float(coarse.std()), 1e-6), factors, shape)
    fine = rng.standard_normal(shape, dtype=np.float32)
    fine = ndimage.gaussian_filter(fine, tuple(min(8.0 / v, 3.0) for v in vs))
    fine /= max(float(fine.std()), 1e-6)
    return blotch, fine


# --------------------------------------------------------------------------------------------------
# Mitochondria


@dataclass
class _Mitochondria:
    labels: np.ndarray
    centers: np.ndarray
    membrane: np.ndarray
    cristae: np.ndarray


@dataclass(frozen=True)
class _Tube:
    """A swept sphere: centreline points (P, 3) in nm, radius (P,) in nm, arc length of point 0."""

    points: np.ndarray
    radii: np.ndarray
    s0: float = 0.0


class _Fields:
    """Per-voxel distance fields of one object inside its bounding box (all float32, box shape)."""

    def __init__(self, box_shape: tuple[int, ...]) -> None:
        self.sd = np.full(box_shape, np.inf, dtype=np.float32)  # signed distance to surface, nm
        self.s = np.zeros(box_shape, dtype=np.float32)  # arc length of nearest centreline point
        self.radius = np.ones(box_shape, dtype=np.float32)  # local tube radius
        self.offset = np.zeros((3, *box_shape), dtype=np.float32)  # voxel minus nearest centre point


def _place_mitochondria(
    shape: tuple[int, int, int],
    vs: np.ndarray,
    scale: float,
    density: float,
    membrane_dist: np.ndarray,
    rng: np.random.Generator,
) -> _Mitochondria:
    """Add mitochondria one by one until ``density`` of the voxels is covered or no more fit.

    A candidate is trimmed so it stays clear of cell walls and earlier mitochondria, then rejected if
    it comes within 24 nm of another mitochondrion, is cut into pieces by the volume edge, is tiny, or
    would push the covered fraction past 1.4 x ``density``. Gives up after 600 rejections.
    """
    labels = np.zeros(shape, dtype=np.uint32)
    membrane = np.zeros(shape, dtype=np.float32)
    cristae = np.zeros(shape, dtype=np.float32)
    centers: list[np.ndarray] = []
    target = density * labels.size
    covered, failures = 0, 0
    min_voxels = max(64, int(2e5 * scale**3 / float(np.prod(vs))))
    while covered < target and failures < 600:
        tubes = _sample_mitochondrion(shape, vs, scale, membrane_dist, labels, rng)
        placed = None if tubes is None else _rasterise(tubes, shape, vs, labels, min_voxels)
        if placed is None or (covered and covered + int(placed[2].sum()) > 1.4 * target):
            failures += 1
            continue
        box, fields, inside = placed
        label = len(centers) + 1
        labels[box][inside] = label
        membrane[box][inside] = _double_membrane(fields.sd[inside], vs)
        cristae[box][inside] = _cristae(fields, inside, vs, rng)
        peak = np.unravel_index(np.argmin(np.where(inside, fields.sd, np.inf)), inside.shape)
        centers.append(np.array([sl.start + p for sl, p in zip(box, peak, strict=True)], dtype=np.float64))
        covered += int(inside.sum())
    center_array = np.array(centers, dtype=np.float64).reshape(-1, 3)
    return _Mitochondria(labels, center_array, membrane, cristae)


def _sample_mitochondrion(
    shape: tuple[int, int, int],
    vs: np.ndarray,
    scale: float,
    membrane_dist: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
) -> list[_Tube] | None:
    """One candidate mitochondrion as one or two tubes, or None if its centre has no room."""
    radius = rng.uniform(80.0, 160.0) * scale
    kind = rng.choice(["tube", "curved", "spindle", "branched"], p=[0.3, 0.3, 0.25, 0.15])
    length = (rng.uniform(1.5, 4.0) * radius) if kind == "spindle" else rng.uniform(350.0, 1400.0) * scale
    centre = rng.uniform(0.0, 1.0, 3) * np.asarray(shape) * vs
    curvature = 0.0
    if kind == "curved":  # bend by at most ~100 degrees over the whole length: no rings
        curvature = min(rng.uniform(1 / 900, 1 / 400) / scale, 1.8 / length) * rng.choice([-1, 1])
    heading, slope = _random_direction(rng)
    s = np.arange(-length / 2, length / 2 + 1e-6, 20.0)
    if s.size < 2:
        s = np.array([-length / 2, length / 2])
    points = _centreline(centre, heading, slope, curvature, s, rng)
    keep = _room(points, radius, anchor=s.size // 2, shape=shape, vs=vs, walls=membrane_dist, labels=labels)
    if keep is None:
        return None
    points, s = points[keep], s[keep]
    if kind == "spindle":
        half = max((s[-1] - s[0]) / 2, 1e-6)
        radii = radius * np.sqrt(np.clip(1 - ((s - s.mean()) / half) ** 2, 0.3, 1))
    else:
        radii = radius * (1 + 0.12 * np.sin(2 * np.pi * s / rng.uniform(300, 700) + rng.uniform(0, 6.3)))
    tubes = [_Tube(*_coarsen(points, radii, radius), s0=float(s[0]))]
    if kind == "branched" and points.shape[0] >= 4:
        branch = _sample_branch(points, s, radius, heading, slope, shape, vs, membrane_dist, labels, rng)
        if branch is not None:
            tubes.append(branch)
    return tubes


def _random_direction(rng: np.random.Generator) -> tuple[float, float]:
    """Heading angle in the yx plane and dz/ds slope; most objects lie nearly in-plane."""
    heading = rng.uniform(0, 2 * np.pi)
    slope = (
        rng.normal(0.0, 0.15) if rng.uniform() < 0.8 else np.tan(rng.uniform(0.5, 1.5)) * rng.choice([-1, 1])
    )
    return float(heading), float(slope)


def _centreline(
    start: np.ndarray, heading: float, slope: float, curvature: float, s: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Points (len(s), 3) along a gently wobbling arc; the point at s == 0 (or s[0] >= 0) is ``start``."""
    theta = (
        heading + curvature * s + 0.15 * np.sin(2 * np.pi * s / rng.uniform(400, 900) + rng.uniform(0, 6.3))
    )
    direction = np.stack([np.full_like(s, slope), np.sin(theta), np.cos(theta)], axis=-1)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    step = np.diff(s, prepend=s[0])[:, None]
    points = np.cumsum(direction * step, axis=0)
    origin = int(np.argmin(np.abs(s)))
    return points - points[origin] + start


def _room(
    points: np.ndarray,
    radius: float,
    anchor: int,
    shape: tuple[int, int, int],
    vs: np.ndarray,
    walls: np.ndarray,
    labels: np.ndarray,
) -> slice | None:
    """The run of centreline points around ``anchor`` that keeps ``radius`` clear of cell walls and
    other mitochondria, or None when the anchor itself has no room. Points outside the volume are free."""
    index = np.rint(points / vs).astype(np.intp)
    inside = np.all((index >= 0) & (index < np.asarray(shape)), axis=1)
    blocked = np.zeros(points.shape[0], dtype=bool)
    iz, iy, ix = index[inside].T
    blocked[inside] = (walls[iz, iy, ix] < radius + 20.0) | (labels[iz, iy, ix] != 0)
    if blocked[anchor]:
        return None
    before = np.flatnonzero(blocked[:anchor])
    after = np.flatnonzero(blocked[anchor:])
    start = before[-1] + 1 if before.size else 0
    stop = anchor + after[0] if after.size else points.shape[0]
    return slice(start, stop)


def _coarsen(points: np.ndarray, radii: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Keep every k-th centreline point so segments are about one radius long (fewer, larger boxes)."""
    if points.shape[0] == 1:
        points = np.concatenate([points - 0.5, points + 0.5])
        radii = np.repeat(radii, 2)
    step = max(1, int(radius // 20.0))
    keep = np.unique(np.r_[np.arange(0, points.shape[0], step), points.shape[0] - 1])
    return points[keep], radii[keep]


def _sample_branch(
    points: np.ndarray,
    s: np.ndarray,
    radius: float,
    heading: float,
    slope: float,
    shape: tuple[int, int, int],
    vs: np.ndarray,
    walls: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
) -> _Tube | None:
    """A thinner side tube leaving the main centreline at 35–75 degrees."""
    at = int(rng.integers(points.shape[0] // 4, 3 * points.shape[0] // 4 + 1))
    branch_heading = heading + rng.uniform(0.6, 1.3) * rng.choice([-1, 1])
    length = rng.uniform(0.3, 0.7) * (s[-1] - s[0])
    s_branch = np.arange(0.0, length + 1e-6, 20.0)
    if s_branch.size < 3:
        return None
    branch = _centreline(points[at], branch_heading, slope, 0.0, s_branch, rng)
    keep = _room(branch, 0.75 * radius, 0, shape, vs, walls, labels)
    if keep is None or keep.stop - keep.start < 3:
        return None
    radii = np.full(keep.stop - keep.start, 0.75 * radius)
    branch_points, branch_radii = _coarsen(branch[keep], radii, 0.75 * radius)
    return _Tube(branch_points, branch_radii, s0=float(s[at]))


def _rasterise(
    tubes: list[_Tube], shape: tuple[int, int, int], vs: np.ndarray, labels: np.ndarray, min_voxels: int
) -> tuple[tuple[slice, ...], _Fields, np.ndarray] | None:
    """Distance fields and mask of an object in its bounding box, or None if it must be rejected."""
    gap = 24.0
    lo = np.min([(t.points - t.radii.max()).min(0) for t in tubes], axis=0) - gap
    hi = np.max([(t.points + t.radii.max()).max(0) for t in tubes], axis=0) + gap
    start = np.maximum(np.floor(lo / vs).astype(int), 0)
    stop = np.minimum(np.ceil(hi / vs).astype(int) + 1, shape)
    if np.any(stop <= start):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    fields = _Fields(tuple(int(b - a) for a, b in zip(start, stop, strict=True)))
    for tube in tubes:
        _sweep(tube, start, stop, vs, fields)
    inside = fields.sd < 0
    count = int(inside.sum())
    if count < min_voxels or np.any(labels[box][fields.sd < gap]):
        return None
    _, n_components = ndimage.label(inside, structure=_CONNECTIVITY_26)
    if n_components != 1:
        return None
    return box, fields, inside


def _sweep(tube: _Tube, box_start: np.ndarray, box_stop: np.ndarray, vs: np.ndarray, fields: _Fields) -> None:
    """Lower ``fields`` to this tube's signed distance, segment by segment, each in its own sub-box."""
    arc = tube.s0 + np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(tube.points, axis=0), axis=1))]
    for j in range(tube.points.shape[0] - 1):
        a, b = tube.points[j], tube.points[j + 1]
        ra, rb = float(tube.radii[j]), float(tube.radii[j + 1])
        reach = max(ra, rb) + 30.0
        lo = np.maximum(np.floor((np.minimum(a, b) - reach) / vs).astype(int), box_start)
        hi = np.minimum(np.ceil((np.maximum(a, b) + reach) / vs).astype(int) + 1, box_stop)
        if np.any(hi <= lo):
            continue
        grids = np.ix_(*(np.arange(l0, h0) * v for l0, h0, v in zip(lo, hi, vs, strict=True)))
        rel = [(g - a[k]).astype(np.float32) for k, g in enumerate(grids)]
        d = (b - a).astype(np.float32)
        t = (rel[0] * d[0] + rel[1] * d[1] + rel[2] * d[2]) / max(float(d @ d), 1e-6)
        np.clip(t, 0.0, 1.0, out=t)
        off = [rel[k] - t * d[k] for k in range(3)]
        radius = ra + t * (rb - ra)
        sd = np.sqrt(off[0] ** 2 + off[1] ** 2 + off[2] ** 2) - radius
        sub = tuple(slice(int(l0 - s0), int(h0 - s0)) for l0, h0, s0 in zip(lo, hi, box_start, strict=True))
        better = sd < fields.sd[sub]
        np.copyto(fields.sd[sub], sd, where=better)
        np.copyto(fields.s[sub], arc[j] + t * (arc[j + 1] - arc[j]), where=better)
        np.copyto(fields.radius[sub], radius, where=better)
        for k in range(3):
            np.copyto(fields.offset[k][sub], off[k], where=better)


def _double_membrane(sd: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Outer and inner membrane as two dark lines 6 and 18 nm inside the surface."""
    width = max(3.5, 0.45 * float(vs[1:].min()))
    return np.exp(-0.5 * ((sd + 6.0) / width) ** 2) + 0.8 * np.exp(-0.5 * ((sd + 18.0) / width) ** 2)


def _cristae(fields: _Fields, inside: np.ndarray, vs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lamellar cristae across the tube: tilted, wavy sheets every 45–85 nm that grow from the inner
    membrane inward to a random depth, some only on one side, some missing."""
    period = rng.uniform(45.0, 85.0)
    width = max(5.0, 0.4 * float(vs[1:].min()))
    n = 64
    present = rng.uniform(size=n) < 0.9
    depth = rng.uniform(0.55, 1.0, n)
    one_sided = rng.uniform(size=n) < 0.25
    side = rng.normal(size=(n, 3))
    tilt = rng.normal(0.0, 0.35, 3)
    strength = rng.uniform(0.6, 1.0)

    off = fields.offset[:, inside]
    dist = fields.sd[inside] + fields.radius[inside]
    rel = dist / np.maximum(fields.radius[inside], 1e-3)
    u = (
        fields.s[inside]
        + tilt @ off
        + 8.0 * np.sin(dist / 25.0 + rng.uniform(0, 6.3))
        + rng.uniform(0, period)
    )
    k = np.floor(u / period)
    line = np.exp(-0.5 * (((u / period - k - 0.5) * period) / width) ** 2)
    k = k.astype(np.int64) % n
    radial = np.clip((rel - (1.0 - depth[k])) / 0.15, 0.0, 1.0)
    facing = np.einsum("ij,ji->i", side[k], off) > 0
    side_ok = np.where(one_sided[k], facing, True)
    return (strength * line * radial * (present[k] & side_ok)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Vesicles


def _vesicle_map(
    shape: tuple[int, int, int], vs: np.ndarray, labels: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Cytoplasm clutter: clustered synaptic vesicles (dark rim, r 15–24 nm), a few larger vesicles
    (r 35–75 nm) and dense granules (solid dark dots, r 8–14 nm).

    Returns float32 (z, y, x): ~1 on a rim or granule, -0.25 in a lighter lumen, 0 elsewhere (at most
    1.2 where two overlap). None of them touches a mitochondrion.
    """
    extent = np.asarray(shape) * vs
    volume_um3 = float(np.prod(extent)) / 1e9
    n_clusters = max(1, int(rng.poisson(3.0 * volume_um3)))
    cluster_centres = rng.uniform(0, 1, (n_clusters, 3)) * extent
    n_small = int(rng.poisson(350.0 * volume_um3))
    in_cluster = rng.uniform(size=n_small) < 0.7
    small = np.where(
        in_cluster[:, None],
        cluster_centres[rng.integers(0, n_clusters, n_small)] + rng.normal(0, 180.0, (n_small, 3)),
        rng.uniform(0, 1, (n_small, 3)) * extent,
    )
    n_large, n_dense = int(rng.poisson(8.0 * volume_um3)), int(rng.poisson(250.0 * volume_um3))
    groups = [
        (small, rng.uniform(15.0, 24.0, n_small), False),
        (rng.uniform(0, 1, (n_large, 3)) * extent, rng.uniform(35.0, 75.0, n_large), False),
        (rng.uniform(0, 1, (n_dense, 3)) * extent, rng.uniform(8.0, 14.0, n_dense), True),
    ]
    out = np.zeros(labels.size, dtype=np.float32)
    width = max(3.0, 0.45 * float(vs[1:].min()))
    for centres, radii, filled in groups:
        index = np.rint(centres / vs).astype(np.intp)
        ok = np.all((index >= 0) & (index < np.asarray(shape)), axis=1)
        ok[ok] = _clear_of(labels, index[ok], radii[ok], vs)
        radius_class = np.rint(radii[ok] / 3.0).astype(int)
        for cls in np.unique(radius_class):
            offsets, values = _sphere_kernel(3.0 * cls, width, vs, filled)
            _splat(out, shape, index[ok][radius_class == cls], offsets, values)
    return np.minimum(out, 1.2).reshape(shape)


def _clear_of(labels: np.ndarray, index: np.ndarray, radii: np.ndarray, vs: np.ndarray) -> np.ndarray:
    """Whether each sphere's centre and its six extreme points (radius + 10 nm) are outside labels."""
    free = np.ones(index.shape[0], dtype=bool)
    limit = np.asarray(labels.shape) - 1
    for axis in range(3):
        for sign in (-1, 0, 1):
            probe = index.copy()
            probe[:, axis] += sign * np.rint((radii + 10.0) / vs[axis]).astype(np.intp)
            np.clip(probe, 0, limit, out=probe)
            free &= labels[probe[:, 0], probe[:, 1], probe[:, 2]] == 0
    return free


def _sphere_kernel(
    radius: float, width: float, vs: np.ndarray, filled: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel offsets (K, 3) and values (K,) of a sphere centred on a voxel: a dark rim around a lighter
    lumen, or (``filled``) a solid dark ball."""
    reach = np.ceil((radius + 3 * width) / vs).astype(int)
    grids = np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    d = np.linalg.norm(offsets * vs, axis=1)
    if filled:
        values = 0.8 * np.clip((radius + width - d) / (2 * width), 0.0, 1.0)
    else:
        values = np.exp(-0.5 * ((d - radius) / width) ** 2) - 0.25 * (d < radius - width)
    keep = np.abs(values) > 0.02
    return offsets[keep], values[keep].astype(np.float32)


def _splat(
    out: np.ndarray, shape: tuple[int, int, int], centres: np.ndarray, offsets: np.ndarray, values: np.ndarray
) -> None:
    """Add the kernel at every centre into the flat array ``out``, dropping parts outside the volume."""
    coords = centres[:, None, :] + offsets[None, :, :]
    ok = np.all((coords >= 0) & (coords < np.asarray(shape)), axis=2)
    flat = np.ravel_multi_index(tuple(coords[ok].T), shape)
    np.add.at(out, flat, np.broadcast_to(values, ok.shape)[ok])


# --------------------------------------------------------------------------------------------------
# Rendering


def _render(scene: _Scene, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Grey levels of the scene in ``style``, blurred, contrast-mapped, noised and quantised to uint8."""
    mito = scene.labels > 0
    tex = style.texture_strength
    image = (
        style.cytoplasm_level
        + 0.04 * scene.cell_tone
        + tex * (0.6 * scene.texture + 0.5 * scene.fine_texture)
    )
    matrix = style.cytoplasm_level * style.mito_matrix_rel + 0.5 * tex * (scene.texture + scene.fine_texture)
    image = np.where(mito, matrix, image)
    image -= style.cristae_darkness * scene.cristae
    image -= 0.55 * style.membrane_darkness * scene.mito_membrane
    image -= style.membrane_darkness * scene.cell_membrane
    image -= 0.6 * style.membrane_darkness * scene.vesicles
    np.clip(image, 0.0, 1.0, out=image)
    if any(s > 0 for s in style.blur_sigma_vx):
        image = ndimage.gaussian_filter(image, style.blur_sigma_vx)
    if style.invert:
        image = 1.0 - image
    if style.gamma != 1.0:
        np.power(image, style.gamma, out=image)
    image = (image - 0.5) * style.contrast + 0.5 + style.brightness
    sigma = np.sqrt(style.noise_sigma**2 + style.shot_noise**2 * np.clip(image, 0.0, 1.0))
    image += sigma * rng.standard_normal(image.shape, dtype=np.float32)
    if style.slice_jitter > 0:
        gain = 1.0 + style.slice_jitter * rng.standard_normal(image.shape[0]).astype(np.float32)
        shift = 0.5 * style.slice_jitter * rng.standard_normal(image.shape[0]).astype(np.float32)
        image = image * gain[:, None, None] + shift[:, None, None]
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
