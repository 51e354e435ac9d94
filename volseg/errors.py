"""The exception hierarchy of volseg.

Every error a user can cause is a :class:`VolsegError`. Its message teaches: what was given, what was
expected, and how to fix it, in one paragraph without a traceback. The CLI prints the message and exits
with code 2 (:data:`USER_ERROR_EXIT_CODE`); anything that is not a ``VolsegError`` is a bug in volseg
and keeps its traceback.

The classes also subclass the matching built-in (``ValueError``, ``FileNotFoundError``, ...) so that
library users can catch them the way they already catch such errors.
"""

from __future__ import annotations

USER_ERROR_EXIT_CODE = 2


class VolsegError(Exception):
    """Base class of all user-facing volseg errors.

    ``what`` says what was wrong, ``fix`` how to put it right; both end up in ``str(error)``.
    """

    def __init__(self, what: str, fix: str | None = None) -> None:
        self.what = what
        self.fix = fix
        super().__init__(what if fix is None else f"{what} Fix: {fix}")


class ConfigError(VolsegError, ValueError):
    """A run configuration is malformed: a field is missing, unknown or out of range."""


class VolumeNotFoundError(VolsegError, FileNotFoundError):
    """A volume URL names nothing that can be opened."""


class VolumeFormatError(VolsegError, ValueError):
    """A volume exists but is not what is needed: wrong dtype, axis order, rank or format."""


class GeometryMismatchError(VolsegError, ValueError):
    """An existing output has another shape, voxel size, offset, chunking or dtype than requested."""


class OutputExistsError(VolsegError, FileExistsError):
    """An output exists and the request would overwrite it."""


class AlignmentError(VolsegError, ValueError):
    """Block cores do not line up with the output's storage chunks, so two writers could share a chunk."""


class PointsError(VolsegError, ValueError):
    """Point prompts are malformed or lie outside the volume."""


class CheckpointError(VolsegError, ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model spec."""


class UnsupportedURLError(VolsegError, ValueError):
    """A URL has a scheme or format prefix that volseg has no backend for."""


class StorageUnreachableError(VolumeNotFoundError, ConnectionError):
    """Storage did not answer in time, or refused access: a bucket without credentials, a host that cannot
    be reached. The message names the URL and says how to supply credentials or check the network."""
