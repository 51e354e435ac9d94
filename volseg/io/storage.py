"""Key-value storage under volume URLs: one shared tensorstore context, JSON documents, atomic updates.

All tensorstore opens in volseg go through :data:`CONTEXT`. Sharing it matters for ``memory://`` URLs:
tensorstore's memory store lives in a context, so two opens with separate contexts would see two
different, empty stores. (The cache pool of the context holds 0 bytes, so nothing is cached across
opens and a reader always sees what another process wrote.)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import tensorstore as ts

from volseg.errors import UnsupportedURLError, VolsegError, VolumeFormatError, VolumeNotFoundError
from volseg.io.urls import VolumeURL

CONTEXT = ts.Context()
"""The tensorstore context of this process (memory stores, concurrency limits)."""

_CAS_ATTEMPTS = 64


def open_kvstore(url: VolumeURL) -> ts.KvStore:
    """Open the key-value store of ``url``'s directory (no I/O for most drivers)."""
    return ts.KvStore.open(url.kvstore(), context=CONTEXT).result()


def read_keys(url: VolumeURL, keys: Iterable[str]) -> dict[str, bytes | None]:
    """Read several keys of ``url``'s directory concurrently; a missing key maps to ``None``.

    Raises :class:`~volseg.errors.VolumeNotFoundError` when the storage cannot be reached or read
    (permission, network), naming the URL and the underlying error.
    """
    names = list(keys)
    try:
        store = open_kvstore(url)
        futures = [store.read(key) for key in names]
        results = [f.result() for f in futures]
    except ValueError as err:
        raise VolumeNotFoundError(
            f"Could not read {', '.join(names)} under {url.url}: {err}",
            "check the URL, the credentials and that the storage is reachable.",
        ) from err
    return {k: (r.value if r.state == "value" else None) for k, r in zip(names, results, strict=True)}


def parse_json(raw: bytes, where: str) -> dict[str, Any]:
    """Decode a JSON object; anything else raises :class:`~volseg.errors.VolumeFormatError`."""
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VolumeFormatError(f"{where} is not valid JSON: {err}.", "repair or remove the file.") from err
    if not isinstance(value, dict):
        raise VolumeFormatError(f"{where} holds {type(value).__name__}, not a JSON object.", "repair it.")
    return value


def read_json(url: VolumeURL, key: str) -> dict[str, Any] | None:
    """The JSON object stored at ``key`` in ``url``'s directory, or ``None`` if the key is missing."""
    raw = read_keys(url, [key])[key]
    return None if raw is None else parse_json(raw, f"{url.url.rstrip('/')}/{key}")


def update_json(
    url: VolumeURL,
    key: str,
    change: Callable[[dict[str, Any] | None], dict[str, Any] | None],
) -> dict[str, Any] | None:
    """Atomically replace the JSON object at ``key`` by ``change(current)``.

    ``current`` is ``None`` when the key is missing; ``change`` returning ``None`` leaves the key as it
    is. The write is conditional on the key not having changed since it was read (compare-and-swap on
    the storage generation), and retried with a fresh read otherwise, so concurrent updates from many
    processes never lose each other's changes. ``change`` may therefore run more than once and must not
    have side effects. Returns the object that was written (or ``None``).
    """
    if url.read_only:
        raise UnsupportedURLError(
            f"Cannot write {key} under {url.url}: {url.scheme}:// storage is read-only.",
            "copy the volume to writable storage (local disk, gs://, s3://).",
        )
    store = open_kvstore(url)
    where = f"{url.url.rstrip('/')}/{key}"
    for attempt in range(_CAS_ATTEMPTS):
        current = store.read(key).result()
        document = parse_json(current.value, where) if current.state == "value" else None
        updated = change(document)
        if updated is None:
            return None
        encoded = json.dumps(updated, indent=2, sort_keys=False).encode()
        stamp = store.write(key, encoded, if_equal=current.stamp.generation).result()
        if stamp.generation:
            return updated
        time.sleep(min(0.001 * 2**attempt, 0.2))
    raise VolsegError(
        f"Could not update {where}: it kept changing under {_CAS_ATTEMPTS} concurrent writers.",
        "retry; if it persists, fewer processes should update this volume's attributes at once.",
    )
