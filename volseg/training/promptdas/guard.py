"""A guard against adaptation that silently makes things worse.

A user adapting to their own volume has no labels to check the result with. Self-training can drift
into predicting nothing (every pseudo-label background) or everything (pseudo-foreground spreading
over membranes and cytoplasm), and a run that did looks like any other. The guard watches label-free
signals of the teacher (the model adaptation returns) on a fixed set of target crops, ``probes`` of
them, every ``every`` steps, step 0 (the source model) included:

* ``foreground``: the fraction of pixels the teacher calls foreground, and ``ratio``, that fraction
  over the source model's: near 0 the run collapses to background, far above 1 it floods;
* ``confidence``: the mean of ``|2p − 1|``: how sure the teacher is (it rises as self-training
  sharpens, and a collapsed run is very sure);
* ``agreement``: Dice between the teacher's and the student's foreground (they drift apart when the
  student chases its own mistakes faster than the EMA can follow);
* ``centred``: the fraction of the teacher's foreground components that hold a density peak (blobs
  without a centre are mostly false positives), and its ratio to the source model's.

The first check (the source model) is the reference and healthy by definition. A later check is
healthy when ``ratio`` is at least ``min_ratio``; when the foreground is at most ``max_ratio`` times
the source model's or ``floor_foreground``, whichever is larger (a source model that finds almost
nothing on the target is what adaptation is for: its growth up to that floor is not flooding); when
``agreement`` is at least ``min_agreement``; and when ``centred`` has not fallen below
``min_centred_ratio`` of the source model's (checked only where the source model centres at least
``floor_centred`` of its objects).
The guard keeps a copy of the teacher at its last healthy check; after ``patience`` unhealthy checks
in a row the run stops, the teacher goes back to that copy, and the reason is recorded (card, curve,
command output).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from volseg.training.promptdas.pseudo_labels import density_peaks, nms_radius


@dataclass(frozen=True)
class GuardSettings:
    """When the guard checks and what it calls healthy (see the module docstring); ``enabled=False``
    only records the signals."""

    enabled: bool = True
    every: int = 25
    probes: int = 8
    min_ratio: float = 0.3
    max_ratio: float = 3.0
    min_agreement: float = 0.5
    min_centred_ratio: float = 0.5
    patience: int = 2
    floor_foreground: float = 0.1
    floor_centred: float = 0.1


@dataclass(frozen=True)
class Signals:
    """One check of the teacher on the probes (see the module docstring)."""

    step: int
    foreground: float
    ratio: float
    confidence: float
    agreement: float
    centred: float
    centred_ratio: float
    problems: tuple[str, ...] = ()

    @property
    def healthy(self) -> bool:
        return not self.problems


@dataclass
class GuardReport:
    """What the guard saw: every check, whether it stopped the run, why, and the step it kept."""

    checks: list[Signals] = field(default_factory=list)
    stopped_at: int | None = None
    kept_step: int | None = None
    reason: str | None = None

    def line(self, total_steps: int) -> str | None:
        """One line for the command's output when the guard stopped the run (else None)."""
        if self.stopped_at is None:
            return None
        return (f"adaptation stopped at step {self.stopped_at} of {total_steps}: {self.reason}; kept the teacher of "
                f"step {self.kept_step} (the last healthy check)")

    def to_json(self) -> dict[str, Any]:
        return {"stopped_at": self.stopped_at, "kept_step": self.kept_step, "reason": self.reason,
                "checks": [{**asdict(c), "problems": list(c.problems)} for c in self.checks]}


class AdaptationGuard:
    """Checks a teacher (and its student) on fixed ``probes`` (``B×1×Y×X`` model input) and keeps its
    last healthy weights (see the module docstring)."""

    def __init__(self, probes: torch.Tensor, settings: GuardSettings, threshold: float = 0.5,
                 peak_threshold: float = 0.3, sigma_vx: float = 5.0) -> None:
        self.probes = probes
        self.settings = settings
        self.threshold = threshold
        self.peak_threshold = peak_threshold
        self.radius = nms_radius(sigma_vx)
        self.report = GuardReport()
        self.reference: tuple[float, float] | None = None  # the source model's foreground and centred share
        self.kept: dict[str, torch.Tensor] | None = None
        self._unhealthy = 0

    @torch.no_grad()
    def _predict(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = model(self.probes.to(device))
        model.train(was_training)
        return torch.sigmoid(out.logits[:, :1].float()).cpu(), out.density.float().cpu()

    def check(self, step: int, teacher: nn.Module, student: nn.Module) -> Signals:
        """Record the signals of this step; returns them (with any problems named)."""
        probability, density = self._predict(teacher)
        student_probability, _ = self._predict(student)
        foreground = probability > self.threshold
        fraction = float(foreground.float().mean())
        centred = self._centred(foreground, density)
        first = self.reference is None
        if first:
            self.reference = (fraction, centred)
        reference_fraction, reference_centred = self.reference
        ratio = fraction / max(reference_fraction, 1e-4)
        centred_ratio = centred / max(reference_centred, 1e-3)
        agreement = _dice(foreground, student_probability > self.threshold)
        confidence = float((2 * probability - 1).abs().mean())
        s = self.settings
        problems = []
        if not first:  # the first check is the source model itself: the reference
            if ratio < s.min_ratio:
                problems.append(f"the teacher's foreground fell to {ratio:.2f}× the source model's (collapsing to "
                                "background)")
            if fraction > s.max_ratio * max(reference_fraction, s.floor_foreground):
                problems.append(f"the teacher's foreground grew to {fraction:.0%} of the image, {ratio:.1f}× the "
                                "source model's (flooding)")
            if agreement < s.min_agreement:
                problems.append(f"teacher and student agree on only {agreement:.2f} Dice of their foreground")
            if reference_centred >= s.floor_centred and centred_ratio < s.min_centred_ratio:
                problems.append(f"only {centred:.0%} of the teacher's objects hold a detected centre "
                                f"({centred_ratio:.2f}× the source model's share)")
        signals = Signals(step, fraction, ratio, confidence, agreement, centred, centred_ratio, tuple(problems))
        self.report.checks.append(signals)
        return signals

    def _centred(self, foreground: torch.Tensor, density: torch.Tensor) -> float:
        peaks = density_peaks(density, self.peak_threshold, self.radius)
        objects = hit = 0
        for mask, points in zip(foreground[:, 0].numpy(), peaks, strict=True):
            labels, n = ndimage.label(mask)
            objects += n
            if n and len(points):
                yx = np.rint(points).astype(int)
                hit += int(np.count_nonzero(np.unique(labels[yx[:, 0], yx[:, 1]])))
        return hit / objects if objects else 1.0

    def update(self, step: int, teacher: nn.Module, student: nn.Module) -> bool:
        """Check, keep the teacher when healthy; True when the run must stop (the teacher has then been
        given back its last healthy weights)."""
        signals = self.check(step, teacher, student)
        if signals.healthy or not self.settings.enabled:
            self.kept = copy.deepcopy(teacher.state_dict())
            self.report.kept_step = step
            self._unhealthy = 0
            return False
        self._unhealthy += 1
        if self._unhealthy < self.settings.patience or self.kept is None:
            return False
        teacher.load_state_dict(self.kept)
        self.report.stopped_at = step
        self.report.reason = "; ".join(signals.problems)
        return True


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2 * int((a & b).sum()) / total
