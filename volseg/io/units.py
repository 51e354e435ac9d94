"""Length units: converting the unit names found in volume metadata to nanometres."""

from __future__ import annotations

from volseg.errors import VolumeFormatError

NM_PER_UNIT: dict[str, float] = {
    "picometer": 1e-3,
    "pm": 1e-3,
    "angstrom": 0.1,
    "å": 0.1,
    "a": 0.1,
    "nanometer": 1.0,
    "nanometre": 1.0,
    "nm": 1.0,
    "micrometer": 1e3,
    "micrometre": 1e3,
    "micron": 1e3,
    "um": 1e3,
    "µm": 1e3,
    "μm": 1e3,
    "millimeter": 1e6,
    "millimetre": 1e6,
    "mm": 1e6,
    "centimeter": 1e7,
    "centimetre": 1e7,
    "cm": 1e7,
    "meter": 1e9,
    "metre": 1e9,
    "m": 1e9,
}
"""Unit name (OME-NGFF / UDUNITS spelling or common abbreviation, lower case) → nanometres per unit."""


def nm_per_unit(unit: str | None, where: str) -> float:
    """Nanometres per ``unit``; ``None`` or ``""`` (no unit given) is taken as nanometres.

    Raises :class:`~volseg.errors.VolumeFormatError` naming ``where`` for a unit that is not a length.
    """
    if unit is None or unit == "":
        return 1.0
    factor = NM_PER_UNIT.get(str(unit).strip().lower())
    if factor is None:
        raise VolumeFormatError(
            f"{where} gives the unit {unit!r}, which is not a known length unit.",
            "use a length unit such as 'nanometer' or 'micrometer'.",
        )
    return factor
