"""Volume URLs: parsing user-facing URLs into a storage location and an optional format.

A volume URL is ``[FORMAT://]LOCATION`` (Neuroglancer style) or ``LOCATION|FORMAT:`` (Neuroglancer's
newer pipe style). FORMAT is one of :data:`FORMAT_PREFIXES`; LOCATION is a local path or a URL with a
scheme in :data:`SCHEMES`::

    /data/em.zarr                       local path, format found by probing its metadata
    zarr3://s3://bucket/em/raw          zarr v3 in an S3 bucket
    precomputed://gs://bucket/em/seg    Neuroglancer precomputed in Google Cloud Storage
    n5:///data/em.n5                    N5 on local disk
    memory://test/vol                   tensorstore's in-process memory store (tests)
    https://host/em/raw|zarr2:          zarr v2 over HTTP (read-only)

Parsing never touches storage; :meth:`VolumeURL.kvstore` gives the tensorstore key-value store spec.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from volseg.errors import UnsupportedURLError

FORMAT_PREFIXES: dict[str, str] = {
    "zarr": "zarr",
    "zarr2": "zarr2",
    "zarr3": "zarr3",
    "n5": "n5",
    "precomputed": "precomputed",
}
"""Format prefix → format name. ``zarr`` means "zarr v2 or v3, whichever is there" (v3 when creating)."""

PIPE_FORMATS: dict[str, str] = {
    "zarr": "zarr",
    "zarr2": "zarr2",
    "zarr3": "zarr3",
    "n5": "n5",
    "neuroglancer-precomputed": "precomputed",
    "precomputed": "precomputed",
}

SCHEMES: tuple[str, ...] = ("file", "memory", "gs", "s3", "http", "https")
"""Storage schemes volseg can open; a URL without a scheme is a local path."""

READ_ONLY_SCHEMES: frozenset[str] = frozenset({"http", "https"})

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_PIPE_RE = re.compile(r"^(.*)\|([A-Za-z0-9-]+):$", re.DOTALL)


@dataclass(frozen=True)
class VolumeURL:
    """A parsed volume URL.

    ``path`` is the directory inside the store, always ending in ``/`` unless empty (the root of a
    bucket or memory store): an absolute path for ``file``, a key prefix for ``gs``/``s3``/``memory``,
    the URL path for ``http(s)``. ``bucket`` is set for ``gs``/``s3``; ``host`` (``http://host:port``)
    for ``http(s)``. ``format`` is ``None`` when the URL has no format prefix.
    """

    url: str
    scheme: str
    path: str
    format: str | None = None
    bucket: str | None = None
    host: str | None = None
    #: A local path that was written relative to the working directory (``path`` is absolute already;
    #: ``str()`` of this URL is what a process elsewhere must be given).
    relative: bool = field(default=False, compare=False)

    @property
    def read_only(self) -> bool:
        """Whether the storage can only be read (HTTP)."""
        return self.scheme in READ_ONLY_SCHEMES

    @property
    def location(self) -> str:
        """The storage URL without format prefix, e.g. ``gs://bucket/em/raw`` or ``file:///data/em.zarr``."""
        path = self.path.rstrip("/")
        if self.scheme == "file":
            return f"file://{path}"
        if self.scheme in ("gs", "s3"):
            return f"{self.scheme}://{self.bucket}/{path}".rstrip("/")
        if self.scheme in READ_ONLY_SCHEMES:
            return f"{self.host}{path}"
        return f"memory://{path}"

    def kvstore(self) -> dict[str, Any]:
        """The tensorstore key-value store spec (JSON) of this location's directory."""
        if self.scheme == "file":
            return {"driver": "file", "path": self.path}
        if self.scheme == "memory":
            return {"driver": "memory", "path": self.path}
        if self.scheme == "gs":
            return {"driver": "gcs", "bucket": self.bucket, "path": self.path}
        if self.scheme == "s3":
            return {"driver": "s3", "bucket": self.bucket, "path": self.path}
        return {"driver": "http", "base_url": self.host, "path": self.path}

    def child(self, name: str) -> VolumeURL:
        """The URL of ``name`` (a relative, ``/``-separated path) inside this directory."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise UnsupportedURLError(
                f"The sub-path {name!r} inside {self.url} climbs out of its directory with '..'.",
                "use a path below the volume's directory.",
            )
        suffix = "".join(p + "/" for p in parts)
        return replace(self, url=f"{self.url.rstrip('/')}/{'/'.join(parts)}", path=self.path + suffix)

    def parent(self) -> VolumeURL | None:
        """The directory containing this one, or None at the root of its store."""
        parts = [p for p in self.path.split("/") if p]
        if not parts or (self.scheme == "file" and len(parts) == 1):
            return None
        cut = len(parts[-1]) + 1
        return replace(self, url=self.url.rstrip("/").rsplit("/", 1)[0], path=self.path[: len(self.path) - cut])

    def with_format(self, fmt: str | None) -> VolumeURL:
        """The same location with another format (``None``: probe)."""
        return replace(self, format=fmt)

    def __str__(self) -> str:
        return self.location if self.format is None else f"{self.format}://{self.location}"


def supported_forms() -> str:
    """A one-line list of the URL forms volseg accepts, for error messages."""
    prefixes = ", ".join(f"{p}://" for p in FORMAT_PREFIXES)
    schemes = ", ".join(f"{s}://" for s in SCHEMES)
    return f"format prefixes {prefixes} (optional) followed by a local path or {schemes}"


def parse_url(url: str) -> VolumeURL:
    """Parse a volume URL (see the module docstring for the forms).

    Local paths become absolute ``file`` locations (``~`` expanded). Raises
    :class:`~volseg.errors.UnsupportedURLError` for an unknown scheme or format prefix, or for a
    ``gs://``/``s3://`` URL without a bucket.
    """
    if not isinstance(url, str) or not url.strip():
        raise UnsupportedURLError(f"The volume URL {url!r} is empty.", f"give one of: {supported_forms()}.")
    rest = url.strip()
    fmt: str | None = None
    pipe = _PIPE_RE.match(rest)
    if pipe:
        name = pipe.group(2).lower()
        if name not in PIPE_FORMATS:
            raise UnsupportedURLError(
                f"The volume URL {url!r} ends in the unknown format '|{name}:'.",
                f"use one of {', '.join('|' + p + ':' for p in PIPE_FORMATS)}.",
            )
        rest, fmt = pipe.group(1), PIPE_FORMATS[name]
    match = _SCHEME_RE.match(rest)
    if match and match.group(1).lower() in FORMAT_PREFIXES:
        if fmt is not None:
            raise UnsupportedURLError(
                f"The volume URL {url!r} names its format twice (prefix and '|format:').",
                "keep only one of them.",
            )
        fmt = FORMAT_PREFIXES[match.group(1).lower()]
        rest = match.group(2)
        match = _SCHEME_RE.match(rest)
    if not match:
        return _local(url, rest, fmt)
    scheme, remainder = match.group(1).lower(), match.group(2)
    if scheme not in SCHEMES:
        raise UnsupportedURLError(
            f"The volume URL {url!r} has the unsupported scheme or format prefix '{scheme}://'.",
            f"use {supported_forms()}.",
        )
    if scheme == "file":
        return _local(url, remainder, fmt)
    if scheme == "memory":
        return VolumeURL(url=url, scheme="memory", path=_directory(remainder), format=fmt)
    if scheme in ("gs", "s3"):
        bucket, _, key = remainder.partition("/")
        if not bucket:
            raise UnsupportedURLError(
                f"The volume URL {url!r} has no bucket name.", f"write it as {scheme}://BUCKET/PATH."
            )
        return VolumeURL(url=url, scheme=scheme, path=_directory(key), format=fmt, bucket=bucket)
    host, slash, path = remainder.partition("/")
    if not host:
        raise UnsupportedURLError(
            f"The volume URL {url!r} has no host.", f"write it as {scheme}://HOST/PATH."
        )
    return VolumeURL(
        url=url,
        scheme=scheme,
        path="/" + _directory(path if slash else ""),
        format=fmt,
        host=f"{scheme}://{host}",
    )


def _local(url: str, path: str, fmt: str | None) -> VolumeURL:
    if not path:
        raise UnsupportedURLError(f"The volume URL {url!r} has an empty path.", "give a directory path.")
    absolute = os.path.abspath(os.path.expanduser(path))
    return VolumeURL(url=url, scheme="file", path=absolute.rstrip("/") + "/", format=fmt,
                     relative=not path.startswith("/"))


def _directory(path: str) -> str:
    stripped = path.strip("/")
    return stripped + "/" if stripped else ""
