"""Neuroglancer: a viewer state showing a run's image, probabilities, density, instances and prompts,
and `volseg view CONFIG`, which serves the run's local volumes over HTTP so Neuroglancer can read them.

Volumes in buckets or on web servers are linked as they are (``zarr://gs://…``). Each local volume is
served under its own route, named after its layer, and linked there::

    /data/em.zarr/raw          →  http://127.0.0.1:9015/image/…
    /out/run.zarr/prob         →  http://127.0.0.1:9015/probabilities/…
    /out/run.zarr/density      →  http://127.0.0.1:9015/density/…
    precomputed:///out/seg     →  http://127.0.0.1:9015/instances/…

The server hands out the regular files inside those directories and nothing else: no file outside them
(whatever ``..``, percent-encoding or symlinks a request uses), no directory listing, no run state
(``.volseg/``). It listens on 127.0.0.1 unless told otherwise, answers only browsers on the Neuroglancer
client's origin (CORS), and serves byte ranges, which sharded zarr v3 volumes need.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import mimetypes
import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from volseg.config import Config
from volseg.engine.lease import STATE_DIRECTORY  # run state (done-marks, lease): never served
from volseg.errors import ConfigError, UnsupportedURLError, VolsegError, VolumeNotFoundError
from volseg.geometry import PointSet
from volseg.instances.meshes import MESHES
from volseg.instances.properties import PROPERTIES
from volseg.io import open_volume
from volseg.io.formats import creation_format
from volseg.io.point_index import PointIndex
from volseg.io.urls import parse_url

NEUROGLANCER = "https://neuroglancer-demo.appspot.com/"
#: ``--neuroglancer`` value that serves the ``neuroglancer`` package's own client (offline clusters).
BUNDLED = "bundled"
#: The route of that client on the server (no volume layer has this name).
CLIENT_ROUTE = "neuroglancer"
DEFAULT_PORT = 9015
DEFAULT_HOST = "127.0.0.1"
#: Overlay colours of the outputs drawn over the EM (probabilities red, density green).
OVERLAY_COLOURS = {"probabilities": (1.0, 0.0, 0.0), "density": (0.0, 1.0, 0.0)}
#: Screen pixels the state's zoom fits the volume's larger in-plane side into.
VIEW_PIXELS = 800
#: Prompts beyond this many are left out of the state (a URL has to stay short enough to open).
MAX_INLINE_POINTS = 2000
#: A local point index is read whole for the state only when it has at most this many cells.
MAX_INLINE_CELLS = 1000
SOURCE_PREFIX = {"zarr2": "zarr2", "zarr3": "zarr3", "n5": "n5", "precomputed": "precomputed"}
mimetypes.add_type("application/wasm", ".wasm")  # the client compiles its WebAssembly only with this type
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_COPY_BYTES = 1 << 16


class ViewerPortError(VolsegError, OSError):
    """`volseg view` cannot listen where it was asked: a port outside 1..65535, a port in use, a host
    this machine does not have."""


def layer_urls(config: Config) -> list[tuple[str, str, str]]:
    """(name, layer type, volume URL) of every volume of the run, whether it exists or not. The name is
    also the volume's route on the server."""
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


def needs_server(config: Config) -> bool:
    """Whether any volume of the run is local, so that Neuroglancer can only see it through `volseg view`."""
    return any(parse_url(url).scheme == "file" for _, _, url in layer_urls(config))


def volume_routes(config: Config) -> dict[str, Path]:
    """Route name → directory (symlinks resolved) of every local volume of the run: what `volseg view`
    serves. An output not written yet (a run still going, or not started) has its route too: its files
    are served as the run writes them, so a link made before the run shows them once it has."""
    return {name: Path(os.path.realpath(parse_url(url).path)) for name, _, url in layer_urls(config)
            if parse_url(url).scheme == "file"}


def server_url(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> str:
    """The base URL a browser on this machine reaches the server at (a wildcard host is 127.0.0.1)."""
    if host in ("", "0.0.0.0", "::"):
        host = DEFAULT_HOST
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def source(name: str, url: str, volume_format: str, server: str) -> str:
    """A Neuroglancer data source for a volume: its format prefix and a URL Neuroglancer can fetch (the
    volume's route on ``server`` for a local volume, its own URL otherwise)."""
    parsed = parse_url(url)
    location = f"{server}/{name}" if parsed.scheme == "file" else parsed.location
    return f"{SOURCE_PREFIX.get(volume_format, 'zarr')}://{location}"


def neuroglancer_state(config: Config, prompts: PointSet | PointIndex | None = None, port: int = DEFAULT_PORT,
                       host: str = DEFAULT_HOST) -> dict[str, Any]:
    """The viewer state (JSON) of a run's volumes, local ones at their routes on the server at
    ``host:port``, and of its prompts as an annotation layer. Outputs not written yet are linked where and
    in the format the run writes them (Neuroglancer shows them once they exist); position and zoom come
    from the first volume that exists."""
    found = [(n, t, u, _opened(u)) for n, t, u in layer_urls(config)]
    existing = [volume for *_, volume in found if volume is not None]
    if not existing:
        return {"layers": []}
    server = server_url(host, port)
    vz, vy, vx = existing[0].voxel_size_nm
    offset = np.asarray(existing[0].voxel_offset, dtype=np.float64)
    layers = []
    for name, kind, url, volume in found:
        if volume is None and name == "image":
            continue  # an input that does not exist is not the run's to write
        fmt = volume.format if volume is not None else creation_format(parse_url(url), None)  # as it will be
        layer: dict[str, Any] = {"type": kind, "name": name, "source": source(name, url, fmt, server)}
        if kind == "segmentation" and fmt != "precomputed":  # precomputed lists these in its info
            extra = [PROPERTIES] + ([MESHES] if config.instances is not None and config.instances.meshes else [])
            layer["source"] = [layer["source"], *(source(name, url, "precomputed", server) + f"/{e}" for e in extra)]
        if name in OVERLAY_COLOURS:
            layer["shader"] = overlay_shader(OVERLAY_COLOURS[name])
        layers.append(layer)
    if isinstance(prompts, PointIndex) and prompts.url.scheme != "file":  # Neuroglancer reads the collection
        layers.append({"type": "annotation", "name": "prompts", "source": f"precomputed://{prompts.url.location}"})
        prompts = None
    elif isinstance(prompts, PointIndex):  # a local collection: inline, if reading it all is cheap
        prompts = prompts.read(prompts.bounds) if prompts.num_cells <= MAX_INLINE_CELLS else None
    if prompts is not None and 0 < len(prompts) <= MAX_INLINE_POINTS:
        layers.append({"type": "annotation", "name": "prompts", "source": {"url": "local://annotations"},
                       # Neuroglancer puts voxel corners at integers: a voxel's centre is index + 0.5
                       "annotations": [{"type": "point", "id": str(i),
                                        "point": [float(v) for v in (p + 0.5 + offset)[::-1]]}
                                       for i, p in enumerate(prompts.zyx)]})
    shape = np.asarray(existing[0].shape[-3:], dtype=np.float64)
    centre = offset + shape / 2  # Neuroglancer's voxel corners are at integers
    return {"dimensions": {"x": [vx * 1e-9, "m"], "y": [vy * 1e-9, "m"], "z": [vz * 1e-9, "m"]},
            "position": [float(v) for v in centre[::-1]],
            "crossSectionScale": float(max(shape[1] * vy, shape[2] * vx) / min(vx, vy) / VIEW_PIXELS),
            "layout": "xy", "layers": layers}


def overlay_shader(rgb: tuple[float, float, float]) -> str:
    """An image layer's shader drawing its values in ``rgb``, transparent where they are low: the EM under
    it keeps its brightness (an opaque black-to-colour ramp at half opacity halves it)."""
    colour = ", ".join(f"{c:.1f}" for c in rgb)
    return ("#uicontrol invlerp normalized\n"
            f"void main() {{ float v = clamp(normalized(), 0.0, 1.0); emitRGBA(vec4({colour}, 0.6 * v)); }}")


def link(state: dict[str, Any], neuroglancer: str = NEUROGLANCER) -> str:
    """The URL opening ``state`` in the Neuroglancer client at ``neuroglancer``."""
    return neuroglancer.split("#", 1)[0] + "#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")))


def _opened(url: str) -> Any:
    """The volume at ``url``, or None when it is not written yet (its layer still links where it will be)."""
    try:
        return open_volume(url)
    except VolsegError:
        return None


def web_origin(url: str) -> str:
    """The origin of a web page's URL as browsers send it in ``Origin``: ``scheme://host[:port]``, lower
    case, without a default port (``https://neuroglancer-demo.appspot.com/`` → itself without the ``/``)."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or port == -1:
        raise UnsupportedURLError(f"The Neuroglancer client URL {url!r} is not an http(s) URL with a host.",
                                  f"give the URL of the client page, e.g. {NEUROGLANCER}.")
    scheme, host = parts.scheme.lower(), parts.hostname
    host = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[scheme]
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def resolve(request_path: str, routes: Mapping[str, Path]) -> Path | None:
    """The file a request path (``/ROUTE/REST``, percent-encoded) names, or None when it names nothing
    served: an unknown route, a path that is not a regular file (directories are not listed), a path
    that after resolving symlinks leaves its route's directory, anything under the run state
    (``.volseg/``), and requests written to look like paths elsewhere (``..`` or ``.`` segments, empty
    segments as in ``//etc``, backslashes, NUL bytes, undecodable bytes), decoded or not."""
    raw = request_path.split("?", 1)[0].split("#", 1)[0]
    try:
        decoded = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        return None
    segments = decoded.split("/")
    if (segments[0] != "" or len(segments) < 3 or "\\" in decoded or "\x00" in decoded
            or any(s in ("", ".", "..") for s in segments[1:]) or segments[1] not in routes):
        return None
    root = os.path.realpath(routes[segments[1]])
    target = os.path.realpath(os.path.join(root, *segments[2:]))
    if os.path.commonpath([root, target]) != root:
        return None
    if STATE_DIRECTORY in Path(target).relative_to(root).parts or not os.path.isfile(target):
        return None
    return Path(target)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The bytes [start, stop) a ``Range`` header asks of a file of ``size`` bytes: ``bytes=a-b``,
    ``bytes=a-`` or ``bytes=-n`` (the last n), clipped to the file. None means the whole file: no header,
    or one this server ignores as RFC 9110 allows (malformed, ``b < a``, several ranges). An empty range
    (start == stop) means unsatisfiable (answered 416): ``a`` at or past the end, ``-0``, any range of an
    empty file."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        return (size, size) if suffix == 0 or size == 0 else (max(size - suffix, 0), size)
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        return (size, size)
    return start, size if last == "" else min(int(last) + 1, size)


class VolumeRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the files :func:`resolve` finds (with byte ranges), OPTIONS for CORS preflights;
    the CORS headers go only to the server's Neuroglancer origin. Other methods get 501. Quiet."""

    server: VolumeServer
    server_version = "volseg-view"
    sys_version = ""

    def do_GET(self) -> None:
        self._send_file(body=True)

    def do_HEAD(self) -> None:
        self._send_file(body=False)

    def do_OPTIONS(self) -> None:
        if not self._host_allowed():
            return
        self.send_response(HTTPStatus.NO_CONTENT)
        if self._allowed_origin() is not None:
            self.send_header("Access-Control-Allow-Methods", "GET, HEAD, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Range")
            self.send_header("Access-Control-Max-Age", "600")
            if self.headers.get("Access-Control-Request-Private-Network") == "true":
                self.send_header("Access-Control-Allow-Private-Network", "true")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self) -> None:
        if self._allowed_origin() is not None:
            self.send_header("Access-Control-Allow-Origin", self.server.origin)
            self.send_header("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges")
        self.send_header("Vary", "Origin")
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _allowed_origin(self) -> str | None:
        headers = getattr(self, "headers", None)  # absent when the request line itself was malformed
        origin = headers.get("Origin") if headers is not None else None
        return origin if origin == self.server.origin else None

    def _host_allowed(self) -> bool:
        """Refuse (403) a request naming another host than this machine's loopback when the server listens
        only there: a web page whose name was rebound to 127.0.0.1 would otherwise read it same-origin."""
        host = self.headers.get("Host")
        if not self.server.loopback_only or host is None or _is_loopback(urllib.parse.urlsplit("//" + host).hostname):
            return True
        self.send_error(HTTPStatus.FORBIDDEN)
        return False

    def _send_file(self, body: bool) -> None:
        if not self._host_allowed():
            return
        path = resolve(self.path, self.server.routes)
        try:
            file = open(path, "rb") if path is not None else None  # noqa: SIM115 (a `with` below)
        except OSError:  # gone since resolve() saw it
            file = None
        if file is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        with file:
            self._send_bytes(file, os.fstat(file.fileno()).st_size, str(path), body)

    def _send_bytes(self, file: BinaryIO, size: int, name: str, body: bool) -> None:
        wanted = byte_range(self.headers.get("Range"), size)
        if wanted is not None and wanted[0] == wanted[1]:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, stop = wanted or (0, size)
        self.send_response(HTTPStatus.OK if wanted is None else HTTPStatus.PARTIAL_CONTENT)
        if wanted is not None:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Type", mimetypes.guess_type(name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        self.send_header("Cache-Control", "no-cache")  # a run still going rewrites its outputs
        self.end_headers()
        if body:
            file.seek(start)
            _copy(file, self.wfile, stop - start)


def _copy(source: BinaryIO, sink: Any, length: int) -> None:
    """Copy ``length`` bytes (fewer if the file shrank meanwhile) in pieces."""
    while length > 0:
        piece = source.read(min(length, _COPY_BYTES))
        if not piece:
            return
        sink.write(piece)
        length -= len(piece)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class VolumeServer(ThreadingHTTPServer):
    """The HTTP server of `volseg view`: ``routes`` (name → volume directory) for the page origin
    ``origin``. ``loopback_only`` when it listens on a loopback address (then it also checks ``Host``)."""

    request_queue_size = 128  # the default backlog of 5 stalls tensorstore's and Neuroglancer's parallel requests

    def __init__(self, address: tuple[str, int], routes: Mapping[str, Path], origin: str) -> None:
        self.routes = {name: Path(os.path.realpath(path)) for name, path in routes.items()}
        self.origin = origin
        self.loopback_only = _is_loopback(address[0])
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, VolumeRequestHandler)

    @property
    def url(self) -> str:
        """The base URL a browser on this machine reaches the server at."""
        return server_url(str(self.server_address[0]), int(self.server_address[1]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):  # the viewer dropped a request it no longer needs
            return
        super().handle_error(request, client_address)


def make_server(routes: Mapping[str, Path], port: int, host: str = DEFAULT_HOST,
                neuroglancer: str = NEUROGLANCER) -> VolumeServer:
    """A bound (not yet serving) :class:`VolumeServer` of ``routes`` on ``host:port`` (port 0: any free
    port) for pages of the Neuroglancer client at ``neuroglancer``. Raises :class:`ViewerPortError` for a
    port out of range or in use, :class:`VolumeNotFoundError` when there is nothing to serve."""
    _check_port(port, lowest=0)
    origin = web_origin(neuroglancer)
    if not routes:
        raise VolumeNotFoundError("None of the run's volumes is on local disk, so there is nothing to serve.",
                                  "open the Neuroglancer link of the run's volumes directly.")
    try:
        return VolumeServer((host, port), routes, origin)
    except OSError as error:
        raise _bind_error(error, host, port) from None


def _check_port(port: int, lowest: int) -> None:
    if not lowest <= port <= 65535:
        raise ViewerPortError(f"Port {port} is outside {lowest}..65535.", "give a free port, e.g. --port 9015.")


def _bind_error(error: OSError, host: str, port: int) -> ViewerPortError:
    if error.errno == errno.EADDRINUSE:
        return ViewerPortError(f"Port {port} on {host} is already in use (another `volseg view`, or another "
                               "server).", f"stop that one, or give another port: --port {port + 1}.")
    if error.errno == errno.EACCES:
        return ViewerPortError(f"Port {port} on {host} needs privileges here.", "give a port ≥ 1024: --port 9015.")
    return ViewerPortError(f"Cannot listen on {host}:{port}: {error.strerror or error}.",
                           f"give an address of this machine (default {DEFAULT_HOST}) and a free --port.")


@dataclass
class Viewer:
    """What `volseg view` prints and serves: the Neuroglancer link of the run's volumes and the server of
    its local ones (None when every volume is remote: the link is all there is)."""

    link: str
    server: VolumeServer | None

    def lines(self) -> list[str]:
        """The lines to print before serving."""
        lines = [f"Neuroglancer: {self.link}"]
        if self.server is not None:
            routes = ", ".join(f"/{name} → {path}" for name, path in self.server.routes.items())
            lines.append(f"serving {routes} on {self.server.url} (Ctrl-C stops)")
        return lines

    def serve_forever(self) -> None:
        """Serve until Ctrl-C (return at once without a server); the port is free again on return."""
        if self.server is None:
            return
        try:
            self.server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server.server_close()


def bundled_client() -> Path:
    """The Neuroglancer client that the ``neuroglancer`` Python package ships (its ``static/client``
    folder), found without importing the package. Raises :class:`ConfigError` when it is not installed."""
    spec = importlib.util.find_spec("neuroglancer")
    folders = [] if spec is None or spec.submodule_search_locations is None else list(spec.submodule_search_locations)
    client = next((Path(f) / "static" / "client" for f in folders
                   if (Path(f) / "static" / "client" / "index.html").is_file()), None)
    if client is None:
        raise ConfigError("--neuroglancer bundled serves the client of the `neuroglancer` Python package, which is "
                          "not installed here.", "install it (`uv pip install neuroglancer`), or give the URL of a "
                          "Neuroglancer client with --neuroglancer URL.")
    return client


def open_viewer(config: Config, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST,
                neuroglancer: str = NEUROGLANCER) -> Viewer:
    """`volseg view`: bind the server of the run's local volumes on ``host:port`` and make the link that
    shows every volume in the Neuroglancer client at ``neuroglancer`` (:data:`BUNDLED`: the client of the
    ``neuroglancer`` package, served by this server under ``/neuroglancer/``, so the link needs no
    internet). Serving starts with :meth:`Viewer.serve_forever`. Raises :class:`VolumeNotFoundError` when
    none of the volumes exists yet, :class:`ViewerPortError` for a port outside 1..65535 or in use."""
    _check_port(port, lowest=1)
    routes = volume_routes(config)
    if neuroglancer == BUNDLED:
        routes[CLIENT_ROUTE] = bundled_client()
        neuroglancer = f"{server_url(host, port)}/{CLIENT_ROUTE}/index.html"
    web_origin(neuroglancer)  # a malformed client URL fails before any volume is opened
    state = neuroglancer_state(config, port=port, host=host)
    if not state["layers"]:
        where = config.source_path or "the config"
        raise VolumeNotFoundError(f"{where}: none of its volumes exists yet.", f"run `volseg run {where}`.")
    server = make_server(routes, port, host, neuroglancer) if routes else None
    return Viewer(link(state, neuroglancer), server)
