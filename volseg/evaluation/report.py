"""The evaluation's report: per-slice scores, means, volume Dice/IoU and AP-75, as a table and as JSON."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import volseg
from volseg.evaluation.metrics import AveragePrecision, Confusion, PanopticQuality
from volseg.io.urls import parse_url

MAX_TABLE_ROWS = 20
"""Volumes with more slices get a min / median / max summary instead of one row per slice."""

#: What a report says wrote it (an existing report is replaced only if it says so too).
REPORT_WRITER = f"volseg eval {volseg.__version__}"


@dataclass(frozen=True)
class SliceScores:
    """The scores of z-slice ``z``: voxel counts (Dice, IoU), AJI and panoptic quality."""

    z: int
    confusion: Confusion
    aji: float
    panoptic: PanopticQuality

    @property
    def empty(self) -> bool:
        """Neither prediction nor truth has foreground here (every score is 1.0)."""
        return self.confusion.empty

    @property
    def values(self) -> dict[str, float]:
        c, p = self.confusion, self.panoptic
        return {"dice": c.dice, "iou": c.iou, "aji": self.aji, "pq": p.pq, "sq": p.sq, "rq": p.rq}

    def as_json(self) -> dict[str, Any]:
        c, p = self.confusion, self.panoptic
        return {"z": self.z, **self.values, "empty": self.empty,
                "voxels": {"tp": c.tp, "fp": c.fp, "fn": c.fn, "tn": c.tn},
                "instances": {"tp": p.tp, "fp": p.fp, "fn": p.fn}}


METRIC_NAMES = ("dice", "iou", "aji", "pq")
"""The metrics of the table (the JSON report also has PQ's factors sq and rq)."""

METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "aji": "AJI", "pq": "PQ"}


@dataclass(frozen=True)
class EvalReport:
    """What `volseg eval` found. ``prediction_url`` is the volume whose foreground was counted (the
    instance output itself when no probabilities were given); ``foreground_above`` the stored value
    foreground must exceed; ``instances_url`` the instance output whose AP-75 was streamed, if any."""

    prediction_url: str
    labels_url: str
    shape_zyx: tuple[int, int, int]
    threshold: float
    foreground_above: float
    min_size_vx: int
    scheduler: str
    slices: tuple[SliceScores, ...]
    ap75: AveragePrecision | None
    ap75_note: str
    report_path: str
    seconds: float
    instances_url: str | None = None

    @property
    def volume(self) -> Confusion:
        """Voxel counts of the whole volume (volume-level Dice and IoU)."""
        total = Confusion()
        for s in self.slices:
            total = total + s.confusion
        return total

    @property
    def scored(self) -> tuple[SliceScores, ...]:
        """The slices the means are taken over: those with foreground in prediction or truth."""
        return tuple(s for s in self.slices if not s.empty)

    @property
    def mean(self) -> dict[str, float]:
        """Unweighted means over :attr:`scored` slices (1.0 everywhere if no slice has foreground)."""
        names = (*METRIC_NAMES, "sq", "rq")
        if not self.scored:
            return dict.fromkeys(names, 1.0)
        return {name: statistics.fmean(s.values[name] for s in self.scored) for name in names}

    def as_json(self) -> dict[str, Any]:
        v = self.volume
        return {
            "written_by": REPORT_WRITER,
            "prediction": self.prediction_url, "instances": self.instances_url, "labels": self.labels_url,
            "shape_zyx": list(self.shape_zyx),
            "threshold": self.threshold, "foreground_above": self.foreground_above,
            "min_size_vx": self.min_size_vx, "scheduler": self.scheduler,
            "mean": {**self.mean, "slices": len(self.scored),
                     "note": "over slices with foreground in prediction or labels"},
            "volume": {"dice": v.dice, "iou": v.iou, "tp": v.tp, "fp": v.fp, "fn": v.fn, "tn": v.tn},
            "ap75": None if self.ap75 is None else {
                "ap": self.ap75.ap, "precision": self.ap75.precision, "recall": self.ap75.recall,
                "tp": self.ap75.tp, "fp": self.ap75.fp, "fn": self.ap75.fn},
            "ap75_note": self.ap75_note,
            "slices": [s.as_json() for s in self.slices],
            "seconds": self.seconds,
        }

    def write(self, path: str | Path) -> Path:
        """Write :meth:`as_json` to ``path`` (parent folders created; replaced atomically)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=1) + "\n")
        os.replace(tmp, path)
        return path

    def table_lines(self) -> list[str]:
        """A readable table: one row per slice (or min/median/max when there are many), the means,
        the volume-level Dice/IoU, AP-75, the scheduler and where the JSON report went."""
        lines = [f"prediction {self.prediction_url} (foreground > {self.foreground_above:g}) vs labels "
                 f"{self.labels_url}, {self.shape_zyx[0]} slices"
                 + ("" if self.instances_url is None else f"; instances {self.instances_url}"),
                 f"{'z':>8}" + "".join(f"{METRIC_TITLES[name]:>9}" for name in METRIC_NAMES)]

        def row(label: str, values: dict[str, float]) -> str:
            return f"{label:>8}" + "".join(f"{values[name]:9.4f}" for name in METRIC_NAMES)

        if len(self.slices) <= MAX_TABLE_ROWS:
            lines += [row(str(s.z), s.values) + ("   (empty in both)" if s.empty else "")
                      for s in self.slices]
        elif self.scored:
            for label, reduce in (("min", min), ("median", statistics.median), ("max", max)):
                lines.append(row(label, {n: reduce(s.values[n] for s in self.scored) for n in METRIC_NAMES}))
            worst = sorted(self.scored, key=lambda s: s.values["dice"])[:3]
            lines.append("  lowest Dice at z = " + ", ".join(str(s.z) for s in worst))
        lines.append(row("mean", self.mean) + f"   over {len(self.scored)} of {len(self.slices)} slices "
                     "(slices empty in both left out)")
        v = self.volume
        lines.append(f"  volume: Dice {v.dice:.4f}  IoU {v.iou:.4f}  (voxels TP {v.tp}, FP {v.fp}, FN {v.fn})")
        if self.ap75 is None:
            lines.append(f"  AP-75 (3D instances): not computed: {self.ap75_note}")
        else:
            a = self.ap75
            lines.append(f"  AP-75 (3D instances): {a.ap:.4f}  (precision {a.precision:.4f}, recall "
                         f"{a.recall:.4f}; instances TP {a.tp}, FP {a.fp}, FN {a.fn})")
        lines.append(f"  scheduler: {self.scheduler}; {self.seconds:.1f} s; report: {self.report_path}")
        return lines


def default_report_path(prediction_url: str) -> Path:
    """Where the JSON report goes by default: beside the prediction's container.

    ``/data/out.zarr/prob`` → ``/data/out_prob_eval.json`` (never inside a zarr/N5 container);
    ``/data/prob`` → ``/data/prob_eval.json``; a remote prediction → ``<name>_eval.json`` in the
    current directory.
    """
    parsed = parse_url(prediction_url)
    path = PurePosixPath(parsed.path.rstrip("/"))
    if parsed.scheme != "file":
        return Path.cwd() / f"{path.name or 'prediction'}_eval.json"
    for i, part in enumerate(path.parts):
        if part.lower().endswith((".zarr", ".n5")):
            container = PurePosixPath(*path.parts[: i + 1])
            name = "_".join((container.stem, *path.parts[i + 1:]))
            return Path(container.parent) / f"{name}_eval.json"
    return Path(path.parent) / f"{path.name}_eval.json"


def is_report(path: Path) -> bool:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and str(value.get("written_by", "")).startswith("volseg eval")


