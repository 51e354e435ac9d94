"""Settings of Prompt-DAS training and adaptation (one immutable object per run)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from volseg.config import AdaptConfig
from volseg.errors import ConfigError
from volseg.geometry import slices_apart, slices_within
from volseg.training.augment import WIDE, AugmentSettings
from volseg.training.promptdas.guard import GuardSettings

Mode = Literal["source", "supervised-target", "uda", "wda"]
MODES: tuple[str, ...] = ("source", "supervised-target", "uda", "wda")


@dataclass(frozen=True)
class AdaptSettings:
    """How to train Prompt-DAS; the first block mirrors :class:`volseg.config.AdaptConfig`.

    mode: ``source`` (labelled source crops), ``supervised-target`` (labelled target crops, the oracle),
        ``uda`` (source crops + pseudo-labelled target crops, mean teacher), ``wda`` (as uda, plus the
        target's sparse point annotations).
    steps, batch_size (crops per domain per step), crop (z, y, x; each z slice is one 2D sample),
        learning_rate (AdamW, poly decay), seed (crops, prompts, augmentation; not the model's init).
    ema_alpha: the teacher's maximal EMA decay. delta_f / delta_b: teacher probability at or above which a
        pixel is pseudo-foreground / at or below which it is pseudo-background (between: ignored).
    pcl_weight (λ), pcl_temperature (τ): the prompt-guided contrastive loss.
    peak_threshold: the least teacher density that counts as a detected centre.
    unprompted_share: the share of labelled crops (source, or the target's in ``supervised-target``) trained
        without prompts; the others get a uniformly random subset (size 0 … all) of their centres. The
        paper draws every crop's subset uniformly (0); an unprompted run then meets a model that has
        rarely been asked to segment without help.
    density_sigma: σ in voxels of the Gaussians of the target domain's density targets.
    calibrate_crops, calibrate_every: uda / wda: the teacher's BatchNorm statistics are its own, re-estimated
        on ``calibrate_crops`` fixed target crops before the first step, every ``calibrate_every`` steps
        and at the end (see :mod:`volseg.training.promptdas.teacher`); 0 crops: the teacher averages the
        student's statistics of mixed source and target batches instead. No effect on models without
        BatchNorm.

    Beyond the config:
    source_density_sigma: σ in voxels on the source domain (differs when the voxel sizes do; None: same).
    contrastive_points: K, contrastive tokens per target crop (half on pseudo-foreground, half on
        pseudo-background).
    student_prompts: ``all``: the student gets every prompt the teacher got; ``subset``: a uniformly random
        subset (size 0 … all) of the detected peaks, plus every sparse point, as on the source. The teacher
        always uses all: prompted, it labels the target far better than unprompted, and ``subset``
        distils that into the unprompted student (UDA is evaluated without prompts).
    density_pseudo_target: the student's target density: ``peaks``, a Gaussian at every prompt (sharp,
        like the source targets), or ``teacher``, the teacher's density map itself (keeps sub-threshold
        evidence alive).
    require_centre: keep a pseudo-foreground component only if it contains a detected centre (else ignored).
    point_disk_radius: WDA: pixels within this radius (voxels) of a sparse point are foreground
        (None: ``density_sigma``).
    point_crop_share: WDA: the share of target crops placed to hold a sparse point (the others anywhere).
    confirm_slices: WDA: a pseudo-foreground 2D component (teacher p > 0.5) stays foreground only if a
        sparse point of a slice within ± this many slices lies in it (projected); the others become
        background (:func:`~volseg.training.promptdas.pseudo_labels.confirm_by_points`). For points dense
        enough that nearly every object holds one within that reach (−1: off).
    persistence_slices, persistence_share: uda / wda (0 slices: off): a pseudo-foreground 2D component (teacher
        p > 0.5) stays foreground only if at least ``persistence_share`` of its pixels are foreground for the
        teacher (unprompted, p > 0.5) in the slice ``persistence_slices`` above and in the one below (in
        those inside the volume; a component with neither is kept); the others are ignored, as uncertain
        pixels are (:func:`~volseg.training.promptdas.pseudo_labels.keep_persistent`). Label-free: organelles
        span many slices, while the blobs of cytoplasm texture that a source model mistakes for them
        mostly do not. Costs the teacher one unprompted pass per neighbour slice.
    target_weight: weight of the target terms against the source terms.
    source_paste: uda / wda with source crops: the share of pseudo-labelled target samples onto which the
        step's source sample pastes its labelled organelles (image, label and density; cross-domain mixing
        as in ClassMix / DACS; :func:`~volseg.training.promptdas.batches.paste_source_objects`). 0: off.
    balance_pseudo_labels: the pseudo-label BCE weighs foreground and background equally (see
        :func:`volseg.training.losses.segmentation_loss`); keeps self-training from drifting to background.
    pseudo_foreground_share: with ``balance_pseudo_labels``, the foreground's weight in the pseudo-label
        BCE (0.5: equal to the background's). On VNC → Lucchi, 0.5 over-segments (precision 0.51, recall
        0.76) and the unbalanced BCE collapses to background.
    density_weight: weight of L_det. The MSE of sparse peak-1 Gaussians is ~100× smaller than L_seg; at
        weight 1 the density head stays flat (no peak above 0.1 after 200 steps), at 30 it learns peaks.
    augment: the weak and strong views of target crops (and of source crops unless source_augment).
    source_augment: augmentation of labelled crops (None: ``augment``); by default the wider
        :data:`volseg.training.augment.WIDE`, to widen what the source model has seen, while the student's
        target view must stay recognisable.
    guard: the label-free checks of uda / wda that stop a run drifting into collapse
        (:mod:`volseg.training.promptdas.guard`).
    """

    mode: Mode = "uda"
    steps: int = 300
    batch_size: int = 4
    crop: tuple[int, int, int] = (1, 128, 128)
    learning_rate: float = 5e-4
    ema_alpha: float = 0.99
    delta_f: float = 0.8
    delta_b: float = 0.2
    pcl_weight: float = 0.1
    pcl_temperature: float = 0.5
    peak_threshold: float = 0.3
    unprompted_share: float = 0.5
    density_sigma: float = 5.0
    calibrate_crops: int = 64
    calibrate_every: int = 25
    seed: int = 0
    source_density_sigma: float | None = None
    contrastive_points: int = 16
    require_centre: bool = False
    student_prompts: Literal["all", "subset"] = "subset"
    density_pseudo_target: Literal["peaks", "teacher"] = "peaks"
    point_disk_radius: float | None = None
    point_crop_share: float = 0.0
    confirm_slices: int = -1
    persistence_slices: int = 0
    persistence_share: float = 0.6
    target_weight: float = 1.0
    source_paste: float = 0.0
    balance_pseudo_labels: bool = True
    pseudo_foreground_share: float = 0.5
    density_weight: float = 30.0
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    augment: AugmentSettings = dataclasses.field(default_factory=AugmentSettings)
    source_augment: AugmentSettings | None = WIDE
    guard: GuardSettings = dataclasses.field(default_factory=GuardSettings)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"adapt mode {self.mode!r} is not a training mode.", f"use one of: {', '.join(MODES)}.")
        if not 0 < self.delta_b < self.delta_f < 1:
            raise ConfigError(f"delta_b {self.delta_b} and delta_f {self.delta_f} must satisfy 0 < delta_b < "
                              "delta_f < 1.", "e.g. delta_b 0.2, delta_f 0.8.")
        if not 0 < self.pseudo_foreground_share < 1:
            raise ConfigError(f"pseudo_foreground_share {self.pseudo_foreground_share} must be in (0, 1).",
                              "e.g. 0.5 (foreground and background weigh the same).")
        if not 0 <= self.point_crop_share <= 1:
            raise ConfigError(f"point_crop_share {self.point_crop_share} must be in [0, 1].",
                              "e.g. 0.5 (half the target crops hold a sparse point).")
        if self.confirm_slices >= 0 and self.mode != "wda":
            raise ConfigError(f"point confirmation (confirm_slices {self.confirm_slices}) needs the sparse points "
                              f"of adapt mode 'wda', not {self.mode!r}.",
                              "set adapt.mode: wda with adapt.target.points, or remove adapt.confirm_points_nm.")
        if self.persistence_slices < 0 or not 0 < self.persistence_share <= 1:
            raise ConfigError(f"persistence_slices {self.persistence_slices} must be ≥ 0 and persistence_share "
                              f"{self.persistence_share} in (0, 1].", "e.g. 5 slices and a share of 0.6.")
        if self.persistence_slices > 0 and self.mode not in ("uda", "wda"):
            raise ConfigError(f"persistence of pseudo-labels (persistence_slices {self.persistence_slices}) needs "
                              f"the teacher of adapt mode 'uda' or 'wda', not {self.mode!r}.",
                              "set adapt.mode: uda or wda, or remove adapt.persistence_nm.")
        if not 0 <= self.source_paste <= 1:
            raise ConfigError(f"source_paste {self.source_paste} must be in [0, 1].",
                              "e.g. 1 (every pseudo-labelled sample gets the source sample's organelles).")
        if self.source_paste > 0 and self.mode not in ("uda", "wda"):
            raise ConfigError(f"source_paste {self.source_paste} pastes source organelles onto the pseudo-labelled "
                              f"crops of adapt mode 'uda' or 'wda', not {self.mode!r}.",
                              "set adapt.mode: uda or wda, or set adapt.source_paste to 0.")
        if not 0 <= self.unprompted_share <= 1:
            raise ConfigError(f"unprompted_share {self.unprompted_share} must be in [0, 1].",
                              "e.g. 0.5 (half the labelled crops without prompts).")
        if self.calibrate_crops < 0 or self.calibrate_every < 1:
            raise ConfigError(f"calibrate_crops {self.calibrate_crops} must be ≥ 0 and calibrate_every "
                              f"{self.calibrate_every} ≥ 1.", "e.g. calibrate_crops 64, calibrate_every 25.")
        if self.steps < 1 or self.batch_size < 1 or self.density_sigma <= 0:
            raise ConfigError(f"steps {self.steps}, batch_size {self.batch_size} and density_sigma "
                              f"{self.density_sigma} must be positive.", "give positive values.")

    @property
    def sigma_source(self) -> float:
        return self.density_sigma if self.source_density_sigma is None else self.source_density_sigma

    @property
    def labelled_augment(self) -> AugmentSettings:
        return self.augment if self.source_augment is None else self.source_augment

    @property
    def disk_radius(self) -> float:
        return self.density_sigma if self.point_disk_radius is None else self.point_disk_radius

    @classmethod
    def from_config(cls, config: AdaptConfig, target_voxel_nm: float, source_voxel_nm: float | None = None,
                    target_depth_nm: float | None = None, **overrides: object) -> AdaptSettings:
        """Settings of an ``adapt:`` config section; σ converted from nm with the in-plane voxel sizes,
        ``confirm_points_nm`` and ``persistence_nm`` with the target's slice thickness ``target_depth_nm``
        (None: in-plane; the persistence is at least one slice)."""
        fields = {f.name for f in dataclasses.fields(cls)} & set(type(config).model_fields)
        values = {name: getattr(config, name) for name in fields}
        values["guard"] = GuardSettings(**config.guard.model_dump())
        values["source_augment"] = dataclasses.replace(WIDE, zoom=config.zoom)
        values["density_sigma"] = config.density_sigma_nm / target_voxel_nm
        if config.confirm_points_nm > 0:
            values["confirm_slices"] = slices_within(config.confirm_points_nm, target_depth_nm or target_voxel_nm)
        if config.persistence_nm > 0:
            values["persistence_slices"] = slices_apart(config.persistence_nm, target_depth_nm or target_voxel_nm)
        if source_voxel_nm is not None:
            values["source_density_sigma"] = config.density_sigma_nm / source_voxel_nm
        return cls(**{**values, **overrides})
