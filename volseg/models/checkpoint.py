"""Checkpoints: weights as ``.safetensors`` (no pickle) plus a JSON card beside them.

``model.safetensors`` holds the tensors; ``model.json`` (the card) records the model spec, how the
model was trained (config, data URLs, steps, metrics) and a hash of the weights file, so that any
output can be traced back to the exact weights that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from volseg.errors import CheckpointError
from volseg.models.registry import ModelSpec, build_model, foreign_loader

CARD_VERSION = 1


def card_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, card: Mapping[str, Any]) -> Path:
    """Write ``path`` (.safetensors) and its card atomically (temp file + rename); returns ``path``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"Checkpoint path {str(path)!r} does not end in .safetensors.",
                              "name the checkpoint file like model.safetensors.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"volseg_model": spec.canonical()})
    os.replace(tmp, path)
    full_card = {
        "card_version": CARD_VERSION,
        **dict(card),
        "model": spec.to_json(),
        "weights_sha256": file_sha256(path),
    }
    tmp_card = card_path(path).with_name(card_path(path).name + ".tmp")
    tmp_card.write_text(json.dumps(full_card, indent=2, sort_keys=True, default=str))
    os.replace(tmp_card, card_path(path))
    return path


def read_card(path: str | Path) -> dict[str, Any]:
    """The JSON card of a checkpoint (an empty dict when the card is missing)."""
    card = card_path(path)
    if not card.is_file():
        return {}
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"Checkpoint card {str(card)!r} is not valid JSON ({error}).",
                              "restore the card from the training run or delete it.") from None


def load_checkpoint(path: str | Path, spec: ModelSpec) -> nn.Module:
    """A model built from ``spec`` with the weights at ``path``.

    Refuses, naming the mismatch, a file that is missing or unreadable, a card whose model spec
    differs from ``spec``, and weights whose names or shapes do not fit the model. A file that is not
    ``.safetensors`` goes to the model's own loader when it has one (SAM reads its released ``.pth``).
    """
    path = Path(path)
    load_foreign = foreign_loader(spec) if path.suffix != ".safetensors" else None
    if load_foreign is not None:  # e.g. SAM's released .pth weights
        return load_foreign(path, spec)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.",
                              "set model.checkpoint to a .safetensors file written by `volseg train`.")
    card = read_card(path)
    if card.get("model") and ModelSpec.from_json(card["model"]) != spec:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} was trained as model {card['model']}, but the config asks for "
            f"{spec.to_json()}.",
            "make the config's model section match the checkpoint's card (or train a new checkpoint).",
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Checkpoint {str(path)!r} is not a readable safetensors file ({error}).",
                              "point model.checkpoint at a .safetensors file.") from None
    model = build_model(spec)
    _check_fits(model.state_dict(), tensors, path)
    model.load_state_dict(tensors)
    return model


def read_state_dict(path: Path, what: str, fix: str,
                    wrappers: tuple[str, ...] = ("model", "state_dict")) -> dict[str, torch.Tensor]:
    """The tensors of a weights file made elsewhere (pretrained encoders, SAM's release): ``.safetensors``,
    or a ``.pth`` state dict read with ``weights_only`` (tensors, never pickled code), taken out of each
    of ``wrappers`` it is nested in, in turn. A file that cannot be read, or holds anything but tensors,
    raises :class:`CheckpointError` naming ``what`` and the file, with ``fix``."""
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch and safetensors raise many types for a corrupt or foreign file
        raise CheckpointError(f"{what} {str(path)!r} is not a readable PyTorch state dict ({error}).", fix) from None
    for wrapper in wrappers:
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{what} {str(path)!r} does not hold a state dict of tensors.", fix)
    return dict(state)


def _check_fits(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not fit the configured model: {'; '.join(parts)}.",
            "set model.name/options to those the checkpoint was trained with (see its .json card).",
        )
