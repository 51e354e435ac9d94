"""The model registry: a name → builder and input contract, and the spec that selects one."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from volseg.errors import ConfigError

_INTEGER_SCALE = {torch.uint8: 1.0 / 255.0, torch.uint16: 1.0 / 65535.0}


@dataclass(frozen=True)
class InputContract:
    """What a model expects of its input windows.

    ``dims``: 2 (a window is one z slice, Z = 1) or 3. Raw voxels are scaled to [0, 1] and
    standardised with ``mean``/``std``. The scaling is the dtype's maximum (uint8: 255) unless
    ``percentiles`` is set: then each volume's own robust range (those percentiles of a sample of it,
    :mod:`volseg.intensity`) maps to [0, 1]. Window sizes must be multiples of ``size_multiple`` on the
    axes the model downsamples.
    """

    dims: int
    size_multiple: int = 1
    mean: float = 0.5
    std: float = 0.25
    percentiles: tuple[float, float] | None = None

    def normalize(self, raw: torch.Tensor, intensity: tuple[float, float] | None = None) -> torch.Tensor:
        """Raw voxels → model input: scaled to [0, 1], then standardised with ``mean``/``std``.

        ``intensity`` ``(low, high)`` in raw units (the volume's robust range) maps ``low`` → 0 and
        ``high`` → 1, clipping beyond; without it integers are divided by their dtype's maximum (uint8:
        255, uint16: 65535) and floats are taken as already in [0, 1]."""
        if intensity is None:
            gain = _INTEGER_SCALE.get(raw.dtype, 1.0) / self.std
            # One fresh float tensor, scaled and shifted in place (the input is never modified).
            return raw.to(torch.float32, copy=True).mul_(gain).sub_(self.mean / self.std)
        low, high = (float(v) for v in intensity)
        scaled = raw.to(torch.float32, copy=True).sub_(low).mul_(1.0 / (high - low)).clamp_(0.0, 1.0)
        return scaled.sub_(self.mean).mul_(1.0 / self.std)

    def check_window(self, window_zyx: Sequence[int]) -> None:
        """Raise :class:`ConfigError` if the model cannot run on windows of ``window_zyx``."""
        window = tuple(int(w) for w in window_zyx)
        if self.dims == 2 and window[0] != 1:
            raise ConfigError(
                f"inference.window is {window}, but this is a 2D model: its windows are one slice deep.",
                f"set inference.window to [1, {window[1]}, {window[2]}].",
            )
        spatial = window[1:] if self.dims == 2 else window
        bad = [w for w in spatial if w % self.size_multiple]
        if bad:
            raise ConfigError(
                f"inference.window {window} has sizes {bad} that are not multiples of "
                f"{self.size_multiple}, which this model's downsampling needs.",
                f"round the window to multiples of {self.size_multiple}.",
            )


@dataclass(frozen=True)
class ModelSpec:
    """Selects a registered model: ``name`` plus builder keyword ``options`` (e.g. width, depth)."""

    name: str
    num_classes: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "options": dict(self.options)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(str(data["name"]), int(data.get("num_classes", 1)), dict(data.get("options", {})))

    def canonical(self) -> str:
        """A stable string of the spec, for hashing into run signatures."""
        return json.dumps(self.to_json(), sort_keys=True)


@dataclass(frozen=True)
class RegisteredModel:
    """``load``: reads weights in a format of the model's own (e.g. SAM's released ``.pth``) for
    :func:`volseg.models.checkpoint.load_checkpoint`; None: volseg ``.safetensors`` checkpoints only.

    ``defaults``: the options a spec gets where it leaves them out (a value, or a function of the spec's
    options giving it, for a default that depends on another option); ``legacy``: what checkpoints written
    before those options existed were built with (their cards do not name them)."""

    build: Callable[..., nn.Module]
    contract: Callable[[ModelSpec], InputContract]
    description: str
    load: Callable[[Path, ModelSpec], nn.Module] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    legacy: Mapping[str, Any] = field(default_factory=dict)


MODELS: dict[str, RegisteredModel] = {}

#: Options every model takes, which select its input rather than build it: ``intensity``, the
#: percentiles (low, high) of each volume's robust grey-value range (:mod:`volseg.intensity`), or None
#: for scaling by the dtype's maximum.
INPUT_OPTIONS = ("intensity",)


def register(name: str, build: Callable[..., nn.Module], contract: Callable[[ModelSpec], InputContract],
             description: str, load: Callable[[Path, ModelSpec], nn.Module] | None = None,
             defaults: Mapping[str, Any] | None = None, legacy: Mapping[str, Any] | None = None) -> None:
    MODELS[name] = RegisteredModel(build, contract, description, load, dict(defaults or {}), dict(legacy or {}))


#: The built-in models' modules, each imported when its model is first asked for (the encoders' timm and
#: segment-anything take seconds to import, which a U-Net run should not pay).
BUILTIN_MODULES = {
    "unet": "volseg.models.unet",
    "convnet": "volseg.models.convnet",
    "promptdas": "volseg.models.promptdas.model",
    "sam": "volseg.models.sam.model",
}


def _entry(spec: ModelSpec) -> RegisteredModel:
    if spec.name not in MODELS and spec.name in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[spec.name])
    if spec.name not in MODELS:
        raise ConfigError(
            f"model.name {spec.name!r} is not a registered model.",
            f"use one of: {', '.join(sorted(set(MODELS) | set(BUILTIN_MODULES)))}.",
        )
    return MODELS[spec.name]


def resolve(spec: ModelSpec) -> ModelSpec:
    """``spec`` with every option it leaves out set to the model's default (what is built and saved)."""
    options = dict(spec.options)
    for key, default in _entry(spec).defaults.items():
        if key not in options:
            options[key] = default(dict(spec.options)) if callable(default) else default
    return ModelSpec(spec.name, spec.num_classes, options)


def saved(card_spec: ModelSpec) -> ModelSpec:
    """The resolved spec of a checkpoint whose card says ``card_spec``: options its card does not name
    take the values of the time before they existed (the model's ``legacy``), then the defaults."""
    entry = _entry(card_spec)
    return resolve(ModelSpec(card_spec.name, card_spec.num_classes, {**entry.legacy, **dict(card_spec.options)}))


def build_model(spec: ModelSpec) -> nn.Module:
    """A freshly initialised module for ``spec`` (seed torch first for reproducible weights)."""
    entry = _entry(spec)
    options = {k: v for k, v in resolve(spec).options.items() if k not in INPUT_OPTIONS}
    try:
        return entry.build(num_classes=spec.num_classes, **options)
    except TypeError as error:
        raise ConfigError(
            f"model.options {dict(spec.options)} do not fit model {spec.name!r}: {error}.",
            "remove or rename the option (see the model's builder in volseg/models).",
        ) from None


def input_contract(spec: ModelSpec) -> InputContract:
    """What the model of ``spec`` expects of its input (with the ``intensity`` option applied)."""
    resolved = resolve(spec)
    contract = _entry(spec).contract(resolved)
    percentiles = resolved.options.get("intensity")
    if percentiles is None:
        return contract
    if (not isinstance(percentiles, Sequence) or len(percentiles) != 2
            or not 0 <= float(percentiles[0]) < float(percentiles[1]) <= 100):
        raise ConfigError(f"model.options.intensity {percentiles!r} is not two percentiles low < high in [0, 100].",
                          "use e.g. [1, 99] (each volume's 1st and 99th percentile become 0 and 1), or null.")
    return replace(contract, percentiles=(float(percentiles[0]), float(percentiles[1])))


def foreign_loader(spec: ModelSpec) -> Callable[[Path, ModelSpec], nn.Module] | None:
    """The model's loader of non-volseg weight files (see :class:`RegisteredModel`), or None."""
    return _entry(spec).load


def _load_builtin_models() -> None:
    """Register every built-in model (imports all their modules)."""
    for module in BUILTIN_MODULES.values():
        importlib.import_module(module)
