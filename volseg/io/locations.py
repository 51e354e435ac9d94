"""Where data lives: storage locations that compare equal however a URL spells them.

Two URLs name the same place when they resolve to the same storage location, which a string
comparison cannot tell::

    user.zarr/raw   ./user.zarr/raw   /home/me/user.zarr/raw/   file:///home/me/user.zarr/raw
    zarr3://user.zarr/raw   link-to-user.zarr/raw (a symlink)   USER.ZARR/raw (case-insensitive disk)

A :class:`Location` is a path of *parts* from the root of a store. Local paths are resolved
(``~``, ``..``, symlinks) and every part that exists on disk is its ``(device, inode)``, so a symlink,
a bind mount, a hard-linked file or another spelling of a name on a case-insensitive file system
lands on the same parts; parts that do not exist yet are their names, case-folded (two new outputs
that differ only in case are treated as one place: refusing is the safe side). Bucket keys
(``gs://``, ``s3://``), ``memory://`` paths and HTTP URLs are their normalised ``/``-separated
components under (scheme, bucket or host). Format prefixes (``zarr3://``, ``n5://``, ``|zarr2:``)
never change a location.

A volume also has a **container**: the outermost folder of the hierarchy it belongs to (the zarr
or N5 group holding it, or the ``*.zarr`` / ``*.n5`` folder around it), see :func:`container_of`.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Literal

from volseg.io.urls import VolumeURL, parse_url

Part = str | tuple[int, int]
Relation = Literal["same", "inside", "contains"]

#: Metadata files that make a folder a node of a zarr or N5 hierarchy (a group or an array).
NODE_KEYS = ("zarr.json", ".zgroup", ".zarray", ".zattrs", "attributes.json")
#: Folder names that mark a container by convention, whatever metadata they hold.
CONTAINER_SUFFIXES = (".zarr", ".n5")


@dataclass(frozen=True)
class Location:
    """A resolved storage location: ``store`` (``("file",)``, ``("gs", bucket)``, ...) and the
    ``parts`` below its root. ``url`` is kept for messages only and never compared."""

    store: tuple[str, ...]
    parts: tuple[Part, ...]
    url: str = ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.store, self.parts) == (other.store, other.parts)

    def __hash__(self) -> int:
        return hash((self.store, self.parts))

    def relation(self, other: Location) -> Relation | None:
        """``"same"``, ``"inside"`` (self lies below ``other``), ``"contains"`` (other lies below
        self), or ``None`` when neither holds the other."""
        if self.store != other.store:
            return None
        if self.parts == other.parts:
            return "same"
        if self.parts[: len(other.parts)] == other.parts:
            return "inside"
        if other.parts[: len(self.parts)] == self.parts:
            return "contains"
        return None

    def overlaps(self, other: Location) -> bool:
        """Whether one of the two locations is, or holds, the other."""
        return self.relation(other) is not None


def location_of(url: str | VolumeURL) -> Location:
    """The location of a volume URL or a local file path (see the module docstring)."""
    parsed = url if isinstance(url, VolumeURL) else parse_url(url)
    if parsed.scheme == "file":
        return Location(("file",), _local_parts(parsed.path.rstrip("/") or "/"), parsed.url)
    names = tuple(_normalised(parsed.path))
    if parsed.scheme in ("gs", "s3"):
        return Location((parsed.scheme, str(parsed.bucket)), names, parsed.url)
    if parsed.scheme == "memory":
        return Location(("memory",), names, parsed.url)
    return Location(("http", str(parsed.host).lower().replace("https://", "http://")), names, parsed.url)


def _normalised(path: str) -> list[str]:
    """``/``-separated components with ``.``, ``..`` and repeated slashes resolved."""
    clean = posixpath.normpath("/" + path.strip("/"))
    return [p for p in clean.split("/") if p]


def _local_parts(path: str) -> tuple[Part, ...]:
    """Parts of a local path: ``(device, inode)`` for each prefix that exists, then the case-folded
    names of the prefixes that do not (yet)."""
    resolved = os.path.realpath(os.path.expanduser(path))
    names = [p for p in resolved.split(os.sep) if p]
    parts: list[Part] = []
    current = os.sep
    existing = True
    for name in names:
        current = os.path.join(current, name)
        if existing:
            try:
                info = os.stat(current)
            except OSError:
                existing = False
            else:
                parts.append((info.st_dev, info.st_ino))
                continue
        parts.append(name.casefold())
    return tuple(parts)


def container_of(url: str | VolumeURL) -> VolumeURL:
    """The outermost folder of the hierarchy holding the volume at ``url`` (the volume itself when it
    stands alone).

    Walking up from the volume, a folder belongs to the hierarchy while it is a zarr or N5 node (it
    holds one of :data:`NODE_KEYS`); any folder above named ``*.zarr`` or ``*.n5`` does too::

        /data/em.zarr/raw/s0   →  /data/em.zarr        (group em.zarr holds raw, raw holds s0)
        /data/em.n5/volumes/raw →  /data/em.n5
        /data/em/image (precomputed, plain folders above)  →  /data/em/image

    Read-only HTTP volumes are their own container (nothing can be written there anyway).
    """
    parsed = url if isinstance(url, VolumeURL) else parse_url(url)
    if parsed.read_only:
        return parsed
    from volseg.io.storage import read_keys

    outermost = parsed
    walking = True
    ancestor = parsed.parent()
    while ancestor is not None:
        if walking:
            found = read_keys(ancestor, NODE_KEYS)
            walking = any(value is not None for value in found.values())
            if walking:
                outermost = ancestor
        if ancestor.path.rstrip("/").lower().endswith(CONTAINER_SUFFIXES):
            outermost = ancestor
        ancestor = ancestor.parent()
    return outermost
