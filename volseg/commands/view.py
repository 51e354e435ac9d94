"""Neuroglancer: a viewer state showing a run's image, probabilities, density, instances and prompts,
and `volseg view CONFIG`, which serves local outputs over HTTP (with CORS) so Neuroglancer can read them.

Volumes in buckets or on web servers are linked as they are (``zarr://gs://…``); local volumes are
linked through ``volseg view``'s server (``zarr://http://127.0.0.1:PORT/…``), which serves the deepest
directory holding all of them.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Sequence
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from volseg.config import Config
from volseg.errors import VolsegError
from volseg.geometry import PointSet
from volseg.io import open_volume
from volseg.io.urls import parse_url

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
DEFAULT_PORT = 9015
#: Prompts beyond this many are left out of the state (a URL has to stay short enough to open).
MAX_INLINE_POINTS = 2000
SOURCE_PREFIX = {"zarr2": "zarr2", "zarr3": "zarr3", "n5": "n5", "precomputed": "precomputed"}


def layer_urls(config: Config) -> list[tuple[str, str, str]]:
    """(name, layer type, volume URL) of every volume of the run that exists."""
    layers = []
    if config.input is not None:
        layers.append(("image", "image", config.input.url))
    if config.output is not None:
        layers.append(("probabilities", "image", config.output.probabilities))
        if config.output.density:
            layers.append(("density", "image", config.output.density))
    if config.instances is not None:
        layers.append(("instances", "segmentation", config.instances.url))
    return layers


def served_root(urls: Sequence[str]) -> Path | None:
    """The deepest directory holding every local volume of ``urls`` (None when none is local)."""
    paths = [parse_url(u).path.rstrip("/") for u in urls if parse_url(u).scheme == "file"]
    return Path(os.path.commonpath(paths)) if paths else None


def source(url: str, volume_format: str, server: str | None, root: Path | None) -> str:
    """A Neuroglancer data source for a volume: its format prefix and a URL Neuroglancer can fetch."""
    parsed = parse_url(url)
    if parsed.scheme == "file" and root is not None and server is not None:
        location = f"{server}/{Path(parsed.path).relative_to(root).as_posix()}"
    else:
        location = parsed.location
    return f"{SOURCE_PREFIX.get(volume_format, 'zarr')}://{location}"


def neuroglancer_state(config: Config, prompts: PointSet | None = None, port: int = DEFAULT_PORT) -> dict[str, Any]:
    """The viewer state (JSON) of a run's volumes, and of its prompts as an annotation layer."""
    layers_found = [(n, t, u, open_volume(u)) for n, t, u in layer_urls(config) if _exists(u)]
    root = served_root([u for _, _, u, _ in layers_found])
    server = f"http://127.0.0.1:{port}"
    if not layers_found:
        return {"layers": []}
    vz, vy, vx = layers_found[0][3].voxel_size_nm
    offset = np.asarray(layers_found[0][3].voxel_offset, dtype=np.float64)
    layers = []
    for name, kind, url, volume in layers_found:
        layer: dict[str, Any] = {"type": kind, "name": name, "source": source(url, volume.format, server, root)}
        if name in ("probabilities", "density"):
            layer["opacity"] = 0.5
            layer["shader"] = "#uicontrol invlerp normalized\nvoid main() { emitRGB(vec3(normalized(), 0, 0)); }"
        layers.append(layer)
    if prompts is not None and 0 < len(prompts) <= MAX_INLINE_POINTS:
        layers.append({"type": "annotation", "name": "prompts", "source": {"url": "local://annotations"},
                       # Neuroglancer puts voxel corners at integers: a voxel's centre is index + 0.5
                       "annotations": [{"type": "point", "id": str(i),
                                        "point": [float(v) for v in (p + 0.5 + offset)[::-1]]}
                                       for i, p in enumerate(prompts.zyx)]})
    return {"dimensions": {"x": [vx * 1e-9, "m"], "y": [vy * 1e-9, "m"], "z": [vz * 1e-9, "m"]},
            "layout": "xy", "layers": layers}


def link(state: dict[str, Any]) -> str:
    return NEUROGLANCER + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def needs_server(config: Config) -> bool:
    return served_root([u for _, _, u in layer_urls(config)]) is not None


def _exists(url: str) -> bool:
    try:
        open_volume(url)
    except VolsegError:  # not written yet (e.g. instances of a run still going): not shown
        return False
    return True


class CorsHandler(SimpleHTTPRequestHandler):
    """Static files with the CORS header Neuroglancer (another origin) needs; quiet."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


def make_server(root: Path, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", port), partial(CorsHandler, directory=str(root)))
