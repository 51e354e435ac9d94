"""SAM's official checkpoints (``sam_vit_b_01ec64.pth`` …), read from a local path and checked.

No weights are downloaded: the user fetches the release file once and names it. A file that is missing,
unreadable, not SAM, or of another variant than the config asks for is refused with a
:class:`~volseg.errors.CheckpointError` naming the file, what was expected and the fix — before any large
model is built, since the variant is read off two tensors (the patch embedding's width and the number of
encoder blocks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from volseg.errors import CheckpointError
from volseg.models.checkpoint import read_state_dict
from volseg.models.sam.variants import SAM_VARIANTS, SamVariant

_PATCH_KEY = "image_encoder.patch_embed.proj.weight"
_BLOCK = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def read_sam_state(path: str | Path, variant: SamVariant) -> dict[str, torch.Tensor]:
    """The tensors of a SAM checkpoint (``.pth`` as released, or ``.safetensors``), checked to be ``variant``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} does not exist (expected the official {variant.describe()} weights, "
            f"released as {variant.checkpoint_name}).",
            f"download {variant.checkpoint_name} from the segment-anything release to this machine and give its "
            "local path (volseg never downloads weights).",
        )
    state = read_state_dict(path, "SAM checkpoint",
                            "give the .pth file of the segment-anything release, unmodified.")
    check_sam_state(state, variant, path)
    return state


def state_signature(state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(encoder width, encoder blocks) of a SAM state dict, or None when it is no SAM image encoder."""
    patch = state.get(_PATCH_KEY)
    if patch is None:
        return None
    blocks = {int(m.group(1)) for key in state if (m := _BLOCK.match(key))}
    return int(patch.shape[0]), len(blocks)


def check_sam_state(state: Mapping[str, torch.Tensor], variant: SamVariant, path: str | Path) -> None:
    """Refuse a state dict that is not SAM, or is SAM of another variant than ``variant``."""
    found = state_signature(state)
    if found is None:
        raise CheckpointError(
            f"{str(path)!r} is not a SAM checkpoint: it has no {_PATCH_KEY} (expected the {variant.describe()} "
            f"weights, {variant.checkpoint_name}).",
            "give the .pth file of the segment-anything release for that variant.",
        )
    if found != (variant.embed_dim, variant.depth):
        other = next((k for k, v in SAM_VARIANTS.items() if (v.embed_dim, v.depth) == found), None)
        what = SAM_VARIANTS[other].describe() if other else f"SAM of width {found[0]} with {found[1]} blocks"
        fix = (f"set model.options.variant: {other} to use it as it is, or give {variant.checkpoint_name}"
               if other else f"give {variant.checkpoint_name}")
        raise CheckpointError(
            f"SAM checkpoint {str(path)!r} is {what}, but the config asks for {variant.describe()}.", fix + ".")


def load_sam_weights(sam: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path) -> None:
    """Copy ``state`` into a ``Sam`` module; every tensor must exist and fit (else CheckpointError)."""
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(expected) & set(state))
              if tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape mismatch {'; '.join(shapes[:3])}" if shapes else "") if part)
        raise CheckpointError(f"SAM checkpoint {str(path)!r} does not fit the model: {detail}.",
                              "give the unmodified .pth of the segment-anything release for the configured variant.")
    sam.load_state_dict(dict(state))
