"""The state a training run resumes from: student, optimizer, EMA teacher, step count and history.

Saved beside a volseg checkpoint as ``trainer.safetensors`` (every tensor: ``student/…``, ``teacher/…``,
``optimizer/<param>/<name>``) and ``trainer.json`` (step, teacher updates, optimizer parameter groups,
the loss history); no pickle. Random state needs no saving: every crop's streams are keyed by step
(:mod:`volseg.training.replicas`), so a resumed run draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from volseg.training.loop import TrainHistory

STATE_TENSORS, STATE_CARD = "trainer.safetensors", "trainer.json"


@dataclass
class TrainerState:
    """A trainer after ``step`` steps: ``student`` weights (unwrapped), the ``optimizer``'s state dict, the
    ``teacher``'s weights (None without a teacher) and its EMA update count, and the run's ``history``."""

    step: int
    student: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    teacher: dict[str, torch.Tensor] | None
    teacher_updates: int
    history: TrainHistory


def save_state(state: TrainerState, directory: str | Path) -> None:
    """Write ``state`` into ``directory`` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"student/{k}": v for k, v in state.student.items()}
    tensors |= {f"teacher/{k}": v for k, v in (state.teacher or {}).items()}
    scalars: dict[str, dict[str, Any]] = {}
    for param, values in state.optimizer["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{param}/{name}"] = value
            else:
                scalars.setdefault(str(param), {})[name] = value
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / STATE_TENSORS))
    card = {"step": state.step, "teacher_updates": state.teacher_updates, "has_teacher": state.teacher is not None,
            "optimizer_groups": state.optimizer["param_groups"], "optimizer_scalars": scalars,
            "history": state.history.to_json()}
    (directory / STATE_CARD).write_text(json.dumps(card))


def load_state(directory: str | Path) -> TrainerState:
    """The state :func:`save_state` wrote into ``directory``."""
    directory = Path(directory)
    card = json.loads((directory / STATE_CARD).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    parts: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
    optimizer_state: dict[int, dict[str, Any]] = {int(p): dict(v) for p, v in card["optimizer_scalars"].items()}
    for key, value in tensors.items():
        kind, rest = key.split("/", 1)
        if kind == "optimizer":
            param, name = rest.split("/", 1)
            optimizer_state.setdefault(int(param), {})[name] = value
        else:
            parts[kind][rest] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in card["optimizer_groups"]]  # JSON turned tuples (betas) into lists
    optimizer = {"state": optimizer_state, "param_groups": groups}
    return TrainerState(card["step"], parts["student"], optimizer, parts["teacher"] if card["has_teacher"] else None,
                        card["teacher_updates"], TrainHistory.from_json(card["history"]))


def read_history(directory: str | Path) -> TrainHistory:
    """Only the history of the state in ``directory`` (no tensors are read)."""
    return TrainHistory.from_json(json.loads((Path(directory) / STATE_CARD).read_text())["history"])
