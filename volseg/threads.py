"""How many CPU threads torch computes with, set for the duration of a piece of work.

Float results depend on the thread count (reductions split differently), so a run computes every block
with ``execution.threads`` threads on every executor (:mod:`volseg.commands.run`); training takes the
``threads`` of its config section, by default torch's own (one per physical core). Two processes that
share a machine should split its cores between them: each with every core, they slow each other
several times over.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Compute with ``threads`` torch threads inside the block (None: leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
