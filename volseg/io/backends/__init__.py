"""Storage backends of a :class:`~volseg.io.volume.Volume`: tensorstore (zarr v2/v3, N5, precomputed) and
cloud-volume (precomputed). Each implements :class:`~volseg.io.array.ArrayBackend` and imports only
:mod:`volseg.io.array` of the Volume's side."""
