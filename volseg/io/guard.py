"""What a command may write: never into its inputs, never into each other, never where it cannot.

Every command lists the paths it reads (:class:`PathRef` inputs: volumes, checkpoints, point files)
and the paths it writes (outputs: volumes, checkpoints, reports), each with the config field that
named it. :func:`check_outputs` then refuses, before anything is written:

* an output that is an input, holds one, or lies inside one (compared as resolved storage
  locations, :mod:`volseg.io.locations`, not as strings);
* an output inside the container of an input volume (e.g. ``user.zarr/prob`` beside the input
  ``user.zarr/raw``: it would add files to the user's dataset);
* two outputs that are, or hold, one another;
* a local output that cannot be written: a parent that is a regular file, a folder that is not
  writable, a file output that is a folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from volseg.errors import ConfigError, StorageUnreachableError, VolsegError
from volseg.io.locations import Location, container_of, location_of
from volseg.io.storage import unreachable
from volseg.io.urls import VolumeURL, parse_url

Kind = Literal["volume", "file"]


@dataclass(frozen=True)
class PathRef:
    """A path or URL a command reads or writes: the config ``field`` that named it, and whether it
    is a ``volume`` (a folder of chunks; an input volume's container is protected too) or a ``file``."""

    field: str
    url: str
    kind: Kind = "volume"

    @cached_property
    def location(self) -> Location:
        return location_of(self.url)


def points_ref(field: str, points: str) -> PathRef:
    """A points file, or a precomputed annotation folder or URL (``precomputed://`` dropped)."""
    return PathRef(field, points.removeprefix("precomputed://"), "file")


_WORDS = {"same": "is the same place as", "inside": "lies inside", "contains": "contains"}


def check_outputs(inputs: Sequence[PathRef], outputs: Sequence[PathRef]) -> None:
    """Refuse outputs that would write into an input or into each other, or that cannot be written
    (see the module docstring). Raises :class:`~volseg.errors.ConfigError` naming both fields."""
    present = [ref for ref in inputs if ref.url]
    containers = {ref: _container(ref) for ref in present if ref.kind == "volume"}
    for output in outputs:
        _check_against_inputs(output, present, containers)
    for i, first in enumerate(outputs):
        for second in outputs[i + 1:]:
            relation = first.location.relation(second.location)
            if relation is not None:
                raise ConfigError(
                    f"{first.field} {first.url!r} {_WORDS[relation]} {second.field} {second.url!r}; one output "
                    "would write into the other.", "give each output its own path, outside the others.")
    for output in outputs:
        check_writable(output)


def _check_against_inputs(output: PathRef, inputs: Sequence[PathRef],
                          containers: dict[PathRef, VolumeURL | None]) -> None:
    where = output.location
    for ref in inputs:
        relation = where.relation(ref.location)
        if relation is not None:
            raise ConfigError(
                f"{output.field} {output.url!r} {_WORDS[relation]} the input {ref.field} {ref.url!r}; volseg "
                "never writes into its inputs.", f"choose a path for {output.field} outside every input.")
        container = containers.get(ref)
        if container is not None and where.relation(location_of(container)) == "inside":
            shown = container.path.rstrip("/") if container.scheme == "file" else container.location
            raise ConfigError(
                f"{output.field} {output.url!r} lies inside {shown}, the dataset that holds the input "
                f"{ref.field}; volseg never adds files to an input's dataset.",
                f"choose a path for {output.field} outside {shown}.")


def _container(ref: PathRef) -> VolumeURL | None:
    try:
        return container_of(ref.url)
    except StorageUnreachableError:  # named after the input, not the folder above it that was probed
        raise unreachable(parse_url(ref.url)) from None
    except VolsegError:  # an input that cannot be read is reported when it is opened
        return None


def check_writable(ref: PathRef) -> None:
    """Refuse a local output that cannot be created: under a regular file, in a folder this user
    cannot write, or (for a file output) an existing folder. Buckets are checked when written."""
    parsed = parse_url(ref.url)
    if parsed.scheme != "file":
        return
    path = Path(parsed.path.rstrip("/") or "/")
    if ref.kind == "file" and path.is_dir():
        raise ConfigError(f"{ref.field} {ref.url!r} is a folder, not a file.", f"give {ref.field} a file path.")
    if ref.kind == "volume" and path.is_file():
        raise ConfigError(f"{ref.field} {ref.url!r} is a regular file, not a volume folder.",
                          f"choose another path for {ref.field}.")
    ancestor = path if path.is_dir() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{ref.field} {ref.url!r} cannot be created: {ancestor} is a file, not a folder.",
                          f"choose a path for {ref.field} in a folder.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{ref.field} {ref.url!r} cannot be created: the folder {ancestor} is not writable.",
                          f"choose a path for {ref.field} where you can write, or fix the folder's permissions.")


# --- Ray jobs ---------------------------------------------------------------------------------------

#: Where Ray unpacks a job's ``--working-dir`` (the entrypoint runs inside it).
RAY_WORKING_DIR_PART = "runtime_resources/working_dir_files"


def job_working_dir(cwd: str | None = None) -> str | None:
    """The temporary copy of a ``ray job submit --working-dir`` that this process runs in, or None."""
    cwd = os.getcwd() if cwd is None else cwd
    return cwd if RAY_WORKING_DIR_PART in cwd.replace(os.sep, "/") else None


def check_job_paths(outputs: Sequence[tuple[str, str]], cwd: str | None = None) -> None:
    """Inside a Ray job's uploaded working directory, refuse relative local output paths: they would be
    written into that temporary copy, on whichever node ran the job, and deleted with it. ``outputs``:
    ``(config field, path or URL)``."""
    where = job_working_dir(cwd)
    if where is None:
        return
    for field, url in outputs:
        parsed = parse_url(url)
        if parsed.scheme == "file" and parsed.relative:
            raise ConfigError(
                f"{field} {url!r} is a relative path, and volseg runs inside the Ray job's uploaded copy of the "
                f"working directory ({where}): it would be written there, on one node, and deleted with the job.",
                f"give {field} an absolute path on storage every node mounts (e.g. /mnt/shared/...), or a bucket "
                "URL (gs://, s3://).")
