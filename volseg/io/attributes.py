"""User attributes of a volume: a JSON object stored next to (or inside) the volume's metadata.

Where they live, by format:

==============  =====================================================================
zarr v2         ``.zattrs`` of the array, or of the OME-Zarr group
zarr v3         ``attributes`` inside ``zarr.json`` of the array, or of the OME-Zarr group
N5              ``attributes.json`` of the dataset (or multiscale group)
precomputed     the sidecar ``volseg_attributes.json`` next to ``info``
==============  =====================================================================

Keys the format itself owns (OME ``multiscales``, N5 ``dimensions``, volseg's geometry keys...) are
*reserved*: they are hidden from :meth:`AttributeStore.read` and refused by
:meth:`AttributeStore.update`, so user attributes can never corrupt the volume's geometry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volseg.errors import VolumeFormatError, VolumeNotFoundError
from volseg.io.storage import read_json, update_json
from volseg.io.urls import VolumeURL

PRECOMPUTED_SIDECAR = "volseg_attributes.json"


@dataclass(frozen=True)
class AttributeStore:
    """The user attributes in the JSON document ``key`` of ``url``'s directory.

    ``member`` names the object inside the document that holds them (``"attributes"`` for zarr v3's
    ``zarr.json``); ``None`` means the whole document. ``reserved`` keys belong to the format.
    """

    url: VolumeURL
    key: str
    member: str | None = None
    reserved: frozenset[str] = frozenset()

    @property
    def where(self) -> str:
        """The document's URL, for messages."""
        return f"{self.url.url.rstrip('/')}/{self.key}"

    def read(self) -> dict[str, Any]:
        """The current user attributes (reserved keys left out); ``{}`` if there are none."""
        document = read_json(self.url, self.key) or {}
        values = document.get(self.member, {}) if self.member else document
        if not isinstance(values, dict):
            raise VolumeFormatError(f"{self.where} has a non-object '{self.member}' member.", "repair it.")
        return {k: v for k, v in values.items() if k not in self.reserved}

    def update(self, values: Mapping[str, Any]) -> None:
        """Merge ``values`` into the attributes (a shallow update: each given key is replaced).

        The read-modify-write is atomic against concurrent updates from other processes (see
        :func:`volseg.io.storage.update_json`). Raises :class:`~volseg.errors.VolumeFormatError` for a
        reserved key or a value that is not JSON-serialisable.
        """
        clash = sorted(set(values) & self.reserved)
        if clash:
            raise VolumeFormatError(
                f"Cannot set the attribute(s) {clash} of {self.where}: the format uses these keys for "
                "the volume's own metadata.",
                "store your values under other keys.",
            )
        try:
            encoded = json.loads(json.dumps(dict(values)))
        except (TypeError, ValueError) as err:
            raise VolumeFormatError(
                f"The attributes for {self.where} are not JSON-serialisable: {err}.",
                "pass only dicts, lists, strings, numbers, booleans and None.",
            ) from err
        update_json(self.url, self.key, lambda document: self._merged(document, encoded))

    def _merged(self, document: dict[str, Any] | None, values: dict[str, Any]) -> dict[str, Any]:
        if self.member is None:
            return {**(document or {}), **values}
        if document is None:
            raise VolumeNotFoundError(
                f"{self.where} is missing, so the attributes cannot be written.",
                "create the volume first (create_volume).",
            )
        return {**document, self.member: {**document.get(self.member, {}), **values}}
