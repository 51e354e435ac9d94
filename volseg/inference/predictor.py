"""The Predictor protocol (a batch of raw windows → class probabilities and a density map) and its
torch implementation.

A predictor's output stacks the channels as ``C`` class probabilities followed by one density
channel, so blending treats them alike::

    windows      B × Z × Y × X       raw voxels, the volume's dtype
    prediction   B × (C+1) × Z × Y × X  float32: p(class 0..C-1), then density

A 2D model has a window of Z = 1 and runs on each slice; a 3D model on a Z-deep window. Numpy↔torch,
device placement and autocast happen here, never in ``volseg.models``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from volseg.allocator import keep_freed_memory
from volseg.errors import ConfigError
from volseg.geometry import Coord
from volseg.intensity import read_boxes, sample_boxes
from volseg.models import InputContract
from volseg.models.norms import calibrate_norms, norm_digest, norm_layers
from volseg.models.views import VIEWS, PlaneView

#: Windows per axis (z, y, x) of the lattice :meth:`TorchPredictor.calibrate_norms` samples a volume with.
CALIBRATION_LATTICE = (4, 4, 4)


@runtime_checkable
class Predictor(Protocol):
    """Anything that maps a batch of windows to probabilities and density (see the module docstring)."""

    @property
    def window(self) -> Coord:
        """The window shape (z, y, x) the predictor evaluates."""

    @property
    def num_classes(self) -> int:
        """Number of probability channels ``C`` (the density channel comes after them)."""

    def predict(self, windows: np.ndarray, prompts: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """B×Z×Y×X raw windows → B×(C+1)×Z×Y×X float32 predictions.

        ``prompts``, when given, holds for each window an ``n×3`` array of point prompts (z, y, x) in
        that window's coordinates (``n`` may be 0)."""


#: Grey-value dtypes a model can read (see :meth:`InputContract.normalize`).
INPUT_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))


class TorchPredictor:
    """A :class:`Predictor` around a torch module whose forward maps ``B×1×(Z×)Y×X`` input to a tuple
    that starts with ``(logits B×C×…, density B×1×…)``.

    ``batch_size`` windows go through the model at once; ``amp_dtype`` (e.g. ``torch.bfloat16``)
    turns on autocast on the device.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        contract: InputContract,
        window: Coord,
        num_classes: int,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        amp_dtype: torch.dtype | None = None,
        intensity: tuple[float, float] | None = None,
        tta: int = 1,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model = model.to(self.device).eval()
        self.contract = contract
        self._window = tuple(int(w) for w in window)
        self._num_classes = int(num_classes)
        self.batch_size = int(batch_size)
        self.amp_dtype = amp_dtype
        #: The volume's robust grey-value range (low, high), when the contract normalises by one.
        self.intensity = intensity
        if tta not in VIEWS:
            raise ValueError(f"tta must be one of {sorted(VIEWS)}, not {tta}")
        #: Test-time augmentation: each window's prediction is the mean over these in-plane views.
        self.views = VIEWS[tta]
        contract.check_window(self._window)
        if tta > 1 and self._window[1] != self._window[2]:
            raise ValueError(f"tta {tta} turns windows a quarter turn: the window {self._window} must be square")

    def to(self, device: str | torch.device) -> None:
        """Move the model to ``device`` (an executor's actor does this once, on its own GPU)."""
        self.device = torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.model = self.model.to(self.device)

    def __getstate__(self) -> dict[str, Any]:
        """Pickles with its weights on the CPU, so a GPU-less process can unpickle it."""
        state = dict(self.__dict__)
        state["model"] = copy.deepcopy(self.model).to("cpu") if self.device.type != "cpu" else self.model
        state["device"] = torch.device("cpu")
        return state

    def calibrate_norms(self, volume: Any) -> str | None:
        """Re-estimate the model's BatchNorm statistics on ``volume`` (AdaBN): windows of the predictor's
        shape on :data:`CALIBRATION_LATTICE`, spread evenly over the volume (so they depend on the volume
        alone), normalised as blocks are. Every block then uses the same statistics. Returns their
        digest (for the run signature), or None for a model without BatchNorm (nothing changes)."""
        if not norm_layers(self.model):
            return None
        boxes = sample_boxes(tuple(volume.shape)[-3:], CALIBRATION_LATTICE, self._window)
        windows = np.stack(read_boxes(volume, boxes))
        calibrate_norms(self.model, self._model_input(windows), self.batch_size)
        return norm_digest(self.model)

    @property
    def window(self) -> Coord:
        return self._window

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @torch.inference_mode()
    def predict(self, windows: np.ndarray, prompts: Sequence[np.ndarray] | None = None) -> np.ndarray:
        out = np.empty((len(windows), self._num_classes + 1, *windows.shape[1:]), dtype=np.float32)
        stacked = torch.from_numpy(out)  # the batches' results are written straight into ``out``
        for begin in range(0, len(windows), self.batch_size):
            batch = windows[begin : begin + self.batch_size]
            batch_prompts = None if prompts is None else prompts[begin : begin + self.batch_size]
            self._predict_batch(batch, batch_prompts, stacked[begin : begin + len(batch)])
        return out

    def _model_input(self, windows: np.ndarray) -> torch.Tensor:
        """Raw ``B×Z×Y×X`` windows → normalised model input on the device: 2D, the Z = 1 slices of the
        windows become the batch; 3D, a channel axis is added."""
        x = self.contract.normalize(torch.from_numpy(np.ascontiguousarray(windows)).to(self.device), self.intensity)
        return x.reshape(-1, 1, *x.shape[-2:]) if self.contract.dims == 2 else x.unsqueeze(1)

    def _prompt_tensors(self, prompts: Sequence[np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-window (z, y, x) prompts → padded ``B×N×2`` (y, x) points and a ``B×N`` validity mask."""
        if prompts is None or not any(len(p) for p in prompts):
            return None
        if not getattr(self.model, "promptable", False) or self.contract.dims != 2:
            raise ConfigError(
                f"Point prompts were given, but the model {type(self.model).__name__} takes none.",
                "use a promptable model (model.name: promptdas) or remove the points.",
            )
        n = max(len(p) for p in prompts)
        points = torch.zeros(len(prompts), n, 2)
        mask = torch.zeros(len(prompts), n, dtype=torch.bool)
        for i, p in enumerate(prompts):
            points[i, : len(p)] = torch.from_numpy(np.asarray(p, dtype=np.float32).reshape(-1, 3)[:, 1:])
            mask[i, : len(p)] = True
        return points.to(self.device), mask.to(self.device)

    def _predict_batch(self, batch: np.ndarray, prompts: Sequence[np.ndarray] | None, out: torch.Tensor) -> None:
        """Predict ``batch`` into ``out`` (a CPU view, ``B×(C+1)×Z×Y×X``): the mean over :attr:`views`
        of each view's prediction, turned back (the prompts turn with the image)."""
        x = self._model_input(batch)
        prompt_tensors = self._prompt_tensors(prompts)
        channels = out[:, :, 0] if self.contract.dims == 2 else out  # 2D: B×(C+1)×Y×X of B×(C+1)×1×Y×X
        total = None
        for view in self.views:
            view_prompts = None if prompt_tensors is None else (_view_points(view, *prompt_tensors, x.shape[-2:]),
                                                                 prompt_tensors[1])
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                images = view.apply(x).contiguous()
                outputs = self.model(images) if view_prompts is None else self.model(images, *view_prompts)
            predicted = view.undo(torch.cat([torch.sigmoid(outputs[0].float()), outputs[1].float()], dim=1))
            total = predicted if total is None else total + predicted
        assert total is not None
        channels.copy_(total / len(self.views))  # exact for one view: x / 1 == x


def _view_points(view: PlaneView, points: torch.Tensor, mask: torch.Tensor, shape_yx: Sequence[int]) -> torch.Tensor:
    """Padded ``B×N×2`` (y, x) prompts where ``view`` moves them (padding, ``mask`` False, is left as is)."""
    if view == PlaneView(0, False):  # the identity: no round trip through the host
        return points
    moved = points.clone()
    moved[mask] = torch.from_numpy(view.points(points[mask].cpu().numpy(), tuple(shape_yx))).to(points)
    return moved
