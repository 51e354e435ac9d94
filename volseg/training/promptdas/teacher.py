"""The mean teacher: an exponential moving average (EMA) of the student's weights, with BatchNorm statistics
of the target domain.

The student trains on source and target crops in one batch, so its BatchNorm running statistics mix
both domains; a teacher that averaged them would normalise target images with statistics that fit
neither. With ``calibrated_norms`` the teacher keeps statistics of its own, re-estimated on target
crops by :func:`volseg.models.norms.calibrate_norms` (AdaBN, Li et al. 2016). On VNC → Lucchi that
alone moved a source model's held-out Dice from 0.34 to 0.48 (seed 0) and 0.54 to 0.52 (seed 1), every
4th held-out slice, before any adaptation step.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from volseg.models.norms import norm_layers


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper, else ``model``."""
    return getattr(model, "module", model)


def ema_decay(step: int, alpha: float) -> float:
    """``min(1 - 1/(step + 1), alpha)``: 0 at step 0 (the teacher copies the student), then rising to
    ``alpha``, so early teachers are not stuck near the initial weights."""
    return min(1.0 - 1.0 / (step + 1), alpha)


class EMATeacher:
    """A frozen copy of the student updated as ``teacher ← d·teacher + (1 − d)·student``, ``d = ema_decay``.

    Parameters and floating-point buffers (e.g. BatchNorm running statistics) are averaged; other
    buffers (counters) are copied. With ``calibrated_norms`` the BatchNorm statistics are left alone
    (:func:`volseg.models.norms.calibrate_norms` sets them). The teacher never requires gradients and
    stays in eval mode.
    ``updates`` counts the calls to :meth:`update`; the ``k``-th call (from 0) uses ``ema_decay(k)``.
    """

    def __init__(self, student: nn.Module, alpha: float, calibrated_norms: bool = False) -> None:
        self.model = copy.deepcopy(unwrap(student))
        self.model.requires_grad_(False)
        self.model.eval()
        self.alpha = alpha
        self.updates = 0
        norms = norm_layers(self.model) if calibrated_norms else []
        self._own = {id(b) for m in norms for b in m.buffers(recurse=False)}

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """Move the teacher towards ``student``'s current weights; returns the decay used."""
        decay = ema_decay(self.updates, self.alpha)
        source = unwrap(student)
        for mine, theirs in zip(self.model.parameters(), source.parameters(), strict=True):
            mine.mul_(decay).add_(theirs.detach(), alpha=1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), source.buffers(), strict=True):
            if id(mine) in self._own:
                continue
            if mine.is_floating_point():
                mine.mul_(decay).add_(theirs, alpha=1.0 - decay)
            else:
                mine.copy_(theirs)
        self.updates += 1
        return decay
