"""`volseg convert`: an image stack (one PNG or TIFF per z-slice) into a new chunked volume."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from volseg.io import Volume
from volseg.io.guard import PathRef, check_outputs
from volseg.io.stacks import ImageStack, convert_stack


def convert(pattern: str, url: str, voxel_size_nm: Sequence[float], chunk: Sequence[int] | None = None,
            labels: bool = False, progress: bool = True) -> tuple[ImageStack, Volume]:
    """Find the stack, check that the output touches none of its files, and write it."""
    from tqdm.auto import tqdm

    stack = ImageStack.find(pattern)
    folders = sorted({str(Path(f).parent.resolve()) for f in stack.files})
    check_outputs([PathRef("SLICES", folder) for folder in folders], [PathRef("OUT", url)])
    with tqdm(total=stack.shape[0], unit="slice", desc="converting", disable=not progress,
              dynamic_ncols=True) as bar:
        volume = convert_stack(stack, url, voxel_size_nm, chunk, "segmentation" if labels else "image", bar.update)
    return stack, volume
