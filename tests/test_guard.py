"""The adaptation guard: label-free signals of the teacher, and a run pushed to collapse stopped with its
last healthy teacher kept."""

from __future__ import annotations

import torch
from torch import nn

from tests.test_adapt import SMALL
from volseg.data.synthetic import generate_volume
from volseg.models import build_model
from volseg.models.promptdas.model import PromptDASOutput
from volseg.training.promptdas.guard import AdaptationGuard, GuardSettings
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, train_promptdas


class Disk(nn.Module):
    """A stand-in teacher: foreground inside a disk of ``radius`` (a parameter), density peaked at its centre."""

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)))

    def forward(self, image: torch.Tensor, *args: object) -> PromptDASOutput:
        b, _, h, w = image.shape
        y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                              indexing="ij")
        distance = torch.hypot(y - h / 2, x - w / 2)
        logits = (self.radius - distance).expand(b, 1, h, w) * 4
        density = torch.exp(-(distance**2) / 8).expand(b, 1, h, w)
        return PromptDASOutput(logits, density)


def test_signals_name_a_collapse_and_the_last_healthy_teacher_is_kept():
    probes = torch.rand(2, 1, 32, 32)
    guard = AdaptationGuard(probes, GuardSettings(patience=2), peak_threshold=0.5, sigma_vx=2.0)
    teacher, student = Disk(8.0), Disk(8.0)
    assert not guard.update(0, teacher, student)
    first = guard.report.checks[0]
    assert first.healthy and first.ratio == 1.0 and first.centred == 1.0 and first.agreement == 1.0
    teacher.radius.data.fill_(7.0)
    student.radius.data.fill_(7.0)
    assert not guard.update(25, teacher, student) and guard.report.kept_step == 25
    teacher.radius.data.fill_(2.0)  # the teacher's foreground shrinks to a dot: collapsing to background
    assert not guard.update(50, teacher, student)  # one unhealthy check is tolerated (patience 2)
    assert guard.report.checks[-1].problems and "collapsing to background" in guard.report.checks[-1].problems[0]
    assert guard.update(75, teacher, student)
    assert teacher.radius.item() == 7.0  # given back the weights of step 25
    assert guard.report.stopped_at == 75 and guard.report.kept_step == 25
    assert "adaptation stopped at step 75 of 300" in guard.report.line(300)


def test_flooding_and_disagreement_are_named():
    guard = AdaptationGuard(torch.rand(1, 1, 32, 32), GuardSettings(), peak_threshold=0.5, sigma_vx=2.0)
    guard.update(0, Disk(4.0), Disk(4.0))
    signals = guard.check(10, Disk(14.0), Disk(2.0))
    assert any("flooding" in p for p in signals.problems) and any("agree" in p for p in signals.problems)


def test_a_uda_run_pushed_to_collapse_is_stopped(one_thread):
    """Pseudo-foreground needs p ≥ 0.999 and counts 1% in the BCE: self-training drifts to background. The guard
    stops the run and returns its last healthy teacher; with the guard off the same run goes on to the end."""
    data = generate_volume((4, 96, 96), "tem", seed=0)
    torch.manual_seed(0)
    source = build_model(SMALL)
    common = {"batch_size": 2, "crop": (1, 64, 64), "density_sigma": 5.0, "seed": 0}
    train_promptdas(source, AdaptSettings(mode="source", steps=60, learning_rate=2e-3, **common),
                    source=DomainData(data.raw, data.labels))
    state = {k: v.clone() for k, v in source.state_dict().items()}
    pushed = {"steps": 120, "learning_rate": 3e-3, "delta_f": 0.999, "pseudo_foreground_share": 0.01,
              "ema_alpha": 0.9, **common}
    runs = {}
    for enabled in (True, False):
        source.load_state_dict(state)
        settings = AdaptSettings(mode="uda", guard=GuardSettings(enabled=enabled, every=10), **pushed)
        runs[enabled] = train_promptdas(source, settings, None, DomainData(data.raw)).history
    guarded, unguarded = runs[True].guard, runs[False].guard
    assert unguarded["stopped_at"] is None and len(runs[False].losses) == 120
    assert min(c["ratio"] for c in unguarded["checks"]) < 0.3, unguarded["checks"]  # it did collapse
    assert guarded["stopped_at"] is not None and len(runs[True].losses) == guarded["stopped_at"] < 120
    assert "collapsing to background" in guarded["reason"]
    kept = next(c for c in guarded["checks"] if c["step"] == guarded["kept_step"])
    assert kept["ratio"] >= 0.3
