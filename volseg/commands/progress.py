"""Progress bars for long commands (tqdm on stderr; quiet when disabled)."""

from __future__ import annotations

from tqdm.auto import tqdm

from volseg.geometry import Block


class BlockProgress:
    """Blocks done / total, ETA, voxels per second in total and per worker (actor)."""

    def __init__(self, total_blocks: int, enabled: bool = True, desc: str = "segmenting") -> None:
        self.bar = tqdm(total=total_blocks, unit="block", disable=not enabled, dynamic_ncols=True, desc=desc)
        self.voxels = 0
        self.per_worker: dict[str, tuple[int, float]] = {}

    def start(self, total_blocks: int) -> None:
        """Set the total once a pass knows it (the blocks still to run)."""
        self.bar.reset(total=total_blocks)

    def __call__(self, block: Block, seconds: float, worker: str = "") -> None:
        self.voxels += block.core.size
        voxels, busy = self.per_worker.get(worker, (0, 0.0))
        self.per_worker[worker] = (voxels + block.core.size, busy + seconds)
        elapsed = self.bar.format_dict["elapsed"] or 1e-9
        rates = ""
        if len(self.per_worker) > 1:
            rates = " (" + ", ".join(f"{w} {v / max(t, 1e-9) / 1e6:.2f}" for w, (v, t) in
                                     sorted(self.per_worker.items())) + ")"
        self.bar.set_postfix_str(f"{self.voxels / elapsed / 1e6:.2f} Mvox/s{rates}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class StepProgress:
    """Training steps with loss and steps per second."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, unit="step", desc=desc, disable=not enabled, dynamic_ncols=True)

    def __call__(self, step: int, total: int, loss: float, steps_per_second: float) -> None:
        self.bar.set_postfix_str(f"loss {loss:.4f}, {steps_per_second:.2f} step/s", refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
