"""The mean teacher: an exponential moving average (EMA) of the student's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


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
    buffers (counters) are copied. The teacher never requires gradients and stays in eval mode.
    ``updates`` counts the calls to :meth:`update`; the ``k``-th call (from 0) uses ``ema_decay(k)``.
    """

    def __init__(self, student: nn.Module, alpha: float) -> None:
        self.model = copy.deepcopy(unwrap(student))
        self.model.requires_grad_(False)
        self.model.eval()
        self.alpha = alpha
        self.updates = 0

    @torch.no_grad()
    def update(self, student: nn.Module) -> float:
        """Move the teacher towards ``student``'s current weights; returns the decay used."""
        decay = ema_decay(self.updates, self.alpha)
        source = unwrap(student)
        for mine, theirs in zip(self.model.parameters(), source.parameters(), strict=True):
            mine.mul_(decay).add_(theirs.detach(), alpha=1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), source.buffers(), strict=True):
            if mine.is_floating_point():
                mine.mul_(decay).add_(theirs, alpha=1.0 - decay)
            else:
                mine.copy_(theirs)
        self.updates += 1
        return decay
