"""Progress of long commands: tqdm bars on a terminal, else plain log lines.

With bars off (``--no-progress``) or stderr not a terminal (a log file, ``ray job submit``), each
progress object writes one ``logging`` line (logger ``volseg``, INFO) at most every
:data:`LOG_SECONDS` and one at the end, so a long run is never silent::

    12:04:31 segmenting: 120/400 blocks (30%), 3.21 Mvox/s, ETA 1 min 27 s
    12:04:31 training: step 100/300, loss 0.4321, 2.10 step/s, ETA 1 min 35 s
"""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

from volseg.geometry import Block

#: Seconds between two plain progress lines.
LOG_SECONDS = 30.0

log = logging.getLogger("volseg")


def bars_wanted(enabled: bool) -> bool:
    """Bars only when asked for and stderr is a terminal."""
    return enabled and sys.stderr.isatty()


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _Lines:
    """When to write the next plain line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.begin = self.last = time.perf_counter()

    def due(self, done: int, total: int) -> bool:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < LOG_SECONDS and done < total):
            return False
        self.last = now
        return True

    def eta(self, done: int, total: int) -> str:
        elapsed = time.perf_counter() - self.begin
        if done >= total:
            return f"took {duration(elapsed)}"
        return "ETA " + (duration(elapsed / done * (total - done)) if done else "unknown")


class BlockProgress:
    """Blocks done / total, ETA, voxels per second in total and per worker (actor)."""

    def __init__(self, total_blocks: int, enabled: bool = True, desc: str = "segmenting") -> None:
        bars = bars_wanted(enabled)
        self.bar = tqdm(total=total_blocks, unit="block", disable=not bars, dynamic_ncols=True, desc=desc)
        self.lines = _Lines(not bars)
        self.desc, self.total, self.done = desc, total_blocks, 0
        self.voxels = 0
        self.per_worker: dict[str, tuple[int, float]] = {}

    def start(self, total_blocks: int) -> None:
        """Set the total once a pass knows it (the blocks still to run)."""
        self.bar.reset(total=total_blocks)
        self.total, self.done, self.voxels = total_blocks, 0, 0
        self.lines = _Lines(self.lines.enabled)

    def __call__(self, block: Block, seconds: float, worker: str = "") -> None:
        self.voxels += block.core.size
        self.done += 1
        voxels, busy = self.per_worker.get(worker, (0, 0.0))
        self.per_worker[worker] = (voxels + block.core.size, busy + seconds)
        elapsed = max(time.perf_counter() - self.lines.begin, 1e-9)
        rates = ""
        if len(self.per_worker) > 1:
            rates = " (" + ", ".join(f"{w} {v / max(t, 1e-9) / 1e6:.2f}" for w, (v, t) in
                                     sorted(self.per_worker.items())) + ")"
        rate = f"{self.voxels / elapsed / 1e6:.2f} Mvox/s{rates}"
        self.bar.set_postfix_str(rate, refresh=False)
        self.bar.update(1)
        if self.lines.due(self.done, self.total):
            log.info("%s: %d/%d blocks (%d%%), %s, %s", self.desc, self.done, self.total,
                     100 * self.done // max(self.total, 1), rate, self.lines.eta(self.done, self.total))

    def close(self) -> None:
        self.bar.close()


class StepProgress:
    """Training steps with loss and steps per second."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        bars = bars_wanted(enabled)
        self.bar = tqdm(total=total, unit="step", desc=desc, disable=not bars, dynamic_ncols=True)
        self.lines = _Lines(not bars)
        self.desc = desc

    def __call__(self, step: int, total: int, loss: float, steps_per_second: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {steps_per_second:.2f} step/s", refresh=False)
        self.bar.update(step - self.bar.n)
        if self.lines.due(step, total):
            log.info("%s: step %d/%d, loss %.4f, %.2f step/s, %s", self.desc, step, total, loss, steps_per_second,
                     self.lines.eta(step, total))

    def close(self) -> None:
        self.bar.close()
