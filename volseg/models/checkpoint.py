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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from volseg.errors import CheckpointError, OutputExistsError
from volseg.models.registry import ModelSpec, build_model, foreign_loader, resolve, saved

CARD_VERSION = 1


def card_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def curve_path(weights_path: str | Path) -> Path:
    """The loss curve (PNG) written beside a trained checkpoint."""
    path = Path(weights_path)
    return path.with_name(path.stem + "_loss.png")


#: The PNG text field that marks a loss curve as volseg's (so --overwrite may replace it).
CURVE_SOFTWARE = "volseg"


def written_by_volseg(path: str | Path) -> bool:
    """Whether ``path`` is a file volseg wrote for a checkpoint: weights whose safetensors metadata
    names a volseg model, a card with volseg's ``card_version``, or a loss curve marked as volseg's."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as handle:
                return "volseg_model" in (handle.metadata() or {})
        if path.suffix == ".json":
            card = json.loads(path.read_text())
            return isinstance(card, dict) and "card_version" in card and "weights_sha256" in card
        from PIL import Image

        with Image.open(path) as image:
            return image.info.get("Software", "").startswith(CURVE_SOFTWARE)
    except Exception:  # unreadable or foreign: not volseg's
        return False


def check_checkpoint_output(path: str | Path, field: str, overwrite: bool) -> None:
    """Refuse to write a checkpoint where one exists, unless ``overwrite``; and even then, refuse
    to replace any file (weights, card, loss curve) that volseg did not write."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{field} {str(path)!r} does not end in .safetensors.",
                              f"name the checkpoint file like model.safetensors in {field}.")
    existing = [p for p in (path, card_path(path), curve_path(path)) if p.exists()]
    if not existing:
        return
    if not overwrite:
        raise OutputExistsError(f"{field} {str(existing[0])!r} already exists; volseg never replaces a checkpoint "
                                "silently.", f"choose another path for {field}, or pass --overwrite to replace it.")
    foreign = next((p for p in existing if not written_by_volseg(p)), None)
    if foreign is not None:
        raise OutputExistsError(f"{str(foreign)!r} (beside {field}) was not written by volseg; --overwrite replaces "
                                "only volseg's own checkpoints.", f"choose another path for {field}.")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, card: Mapping[str, Any],
                    replace: bool = True) -> Path:
    """Write ``path`` (.safetensors) and its card atomically (temp file + rename); returns ``path``.

    With ``replace=False`` an existing ``path`` is never replaced, even one that appeared while the
    model trained (another run): the weights are published with a hard link, which fails if the name
    is taken, and :class:`~volseg.errors.OutputExistsError` is raised."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"Checkpoint path {str(path)!r} does not end in .safetensors.",
                              "name the checkpoint file like model.safetensors.")
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = resolve(spec)  # the card names every option, defaults included: later defaults cannot change it
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"volseg_model": spec.canonical()})
    _publish(tmp, path, replace)
    full_card = {
        "card_version": CARD_VERSION,
        **dict(card),
        "model": spec.to_json(),
        "weights_sha256": file_sha256(path),
    }
    tmp_card = card_path(path).with_name(f"{card_path(path).name}.{os.getpid()}.tmp")
    tmp_card.write_text(json.dumps(full_card, indent=2, sort_keys=True, default=str))
    os.replace(tmp_card, card_path(path))
    return path


def _publish(tmp: Path, path: Path, replace: bool) -> None:
    """Move the finished ``tmp`` to ``path``: atomically replacing, or only if ``path`` is free."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"Checkpoint {str(path)!r} appeared while this model trained (another run wrote "
                                "it); it was left as it is.", "pass --overwrite to replace it, or choose another "
                                "path; this run's weights were not kept.") from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if path.exists():
            tmp.unlink(missing_ok=True)
            raise OutputExistsError(f"Checkpoint {str(path)!r} appeared while this model trained; it was left as "
                                    "it is.", "pass --overwrite to replace it, or choose another path.") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def load_checkpoint(path: str | Path, spec: ModelSpec, field: str = "model.checkpoint") -> nn.Module:
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
        raise CheckpointError(f"Checkpoint {str(path)!r} ({field}) does not exist.",
                              f"set {field} to a .safetensors file written by `volseg train`.")
    card = read_card(path)
    if card.get("model"):
        _check_spec(saved(ModelSpec.from_json(card["model"])), resolve(spec), path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Checkpoint {str(path)!r} is not a readable safetensors file ({error}).",
                              "point model.checkpoint at a .safetensors file.") from None
    model = build_model(spec)
    _check_fits(model.state_dict(), tensors, path)
    model.load_state_dict(tensors)
    return model


def _check_spec(trained: ModelSpec, asked: ModelSpec, path: Path) -> None:
    """Refuse a config whose (resolved) model spec differs from the checkpoint's, naming the options."""
    if trained == asked:
        return
    if (trained.name, trained.num_classes) != (asked.name, asked.num_classes):
        raise CheckpointError(
            f"Checkpoint {str(path)!r} was trained as model {trained.to_json()}, but the config asks for "
            f"{asked.to_json()}.",
            "make the config's model section match the checkpoint's card (or train a new checkpoint).")
    keys = sorted(set(trained.options) | set(asked.options), key=str)
    differ = [f"{k}: checkpoint {trained.options.get(k)!r}, config {asked.options.get(k)!r}" for k in keys
              if trained.options.get(k) != asked.options.get(k)]
    raise CheckpointError(f"Checkpoint {str(path)!r} was trained with other model.options: {'; '.join(differ)}.",
                          "set model.options as the checkpoint's .json card says (or train a new checkpoint).")


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
