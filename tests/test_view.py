"""`volseg view` serves exactly the run's volumes, each under its route, to the Neuroglancer origin only,
with byte ranges; the link points Neuroglancer at those routes (issue 12, item 8: it served `/`)."""

from __future__ import annotations

import http.client
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from volseg.commands.view import (
    NEUROGLANCER,
    ViewerPortError,
    VolumeServer,
    bundled_client,
    byte_range,
    link,
    make_server,
    needs_server,
    neuroglancer_state,
    open_viewer,
    resolve,
    volume_routes,
    web_origin,
)
from volseg.config import Config, parse_config
from volseg.errors import ConfigError, UnsupportedURLError, VolumeNotFoundError
from volseg.io import create_volume, open_volume

ORIGIN = "https://neuroglancer-demo.appspot.com"
SECRET = b"not for the browser"
SHAPE = (5, 20, 24)


def _volume(url: str, dtype: str, seed: int, **kw: object) -> np.ndarray:
    vol = create_volume(url, shape=SHAPE, dtype=dtype, voxel_size_nm=(40.0, 4.0, 4.0), **kw)  # type: ignore[arg-type]
    data = np.random.default_rng(seed).integers(1, 200, size=vol.array_shape(vol.bounds)).astype(dtype)
    vol.write(vol.bounds, data)
    return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Config, dict[str, np.ndarray]]:
    """A run's four volumes (prob: sharded zarr v3; instances: precomputed), a config file and secrets
    beside them: a sibling of the image inside its zarr group, a symlink inside a volume pointing out of
    it, and run state under the output's `.volseg/`."""
    root = tmp_path_factory.mktemp("run").resolve()
    data = {"image": _volume(f"{root}/data.zarr/raw", "uint8", 0, chunk_shape=(2, 8, 8)),
            "probabilities": _volume(f"zarr3://{root}/out.zarr/prob", "float32", 1,
                                     chunk_shape=(2, 8, 8), shard_shape=(4, 16, 16)),
            "density": _volume(f"{root}/out.zarr/density", "float32", 2, chunk_shape=(2, 8, 8)),
            "instances": _volume(f"precomputed://{root}/seg", "uint64", 3, kind="segmentation",
                                 chunk_shape=(2, 8, 8))}
    (root / "data.zarr" / "secret.txt").write_bytes(SECRET)
    (root / "out.zarr" / "prob" / "leak").symlink_to(root / "data.zarr" / "secret.txt")
    (root / "out.zarr" / "prob" / ".volseg" / "sig").mkdir(parents=True)
    (root / "out.zarr" / "prob" / ".volseg" / "sig" / "block").write_bytes(SECRET)
    config_dict = {"input": {"url": f"{root}/data.zarr/raw"},
                   "output": {"probabilities": f"zarr3://{root}/out.zarr/prob", "density": f"{root}/out.zarr/density"},
                   "instances": {"url": f"precomputed://{root}/seg"}}
    (root / "config.yaml").write_bytes(SECRET)
    return root, parse_config(config_dict, str(root / "config.yaml")), data


def _start(server: VolumeServer) -> Iterator[VolumeServer]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def server(run_dir: tuple[Path, Config, dict[str, np.ndarray]]) -> Iterator[VolumeServer]:
    yield from _start(make_server(volume_routes(run_dir[1]), 0))


def _get(server: VolumeServer, path: str, method: str = "GET", **headers: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one raw request: the path goes out exactly as written."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    try:
        connection.request(method, path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


def test_routes_are_the_local_volumes_written_or_not(run_dir):
    root, config, _ = run_dir
    routes = volume_routes(config)
    assert routes == {"image": root / "data.zarr" / "raw", "probabilities": root / "out.zarr" / "prob",
                      "density": root / "out.zarr" / "density", "instances": root / "seg"}
    missing = parse_config({"input": {"url": f"{root}/data.zarr/raw"},
                            "output": {"probabilities": f"{root}/not-yet.zarr/prob"}})
    assert volume_routes(missing) == {"image": root / "data.zarr" / "raw",
                                      "probabilities": root / "not-yet.zarr" / "prob"} and needs_server(missing)


def test_a_link_made_before_the_run_shows_its_outputs_once_written(run_dir):
    """`volseg view` started before `volseg run`: the state links the outputs where the run writes them,
    and the server answers for their files as soon as they exist."""
    root = run_dir[0]
    config = parse_config({"input": {"url": f"{root}/data.zarr/raw"},
                           "output": {"probabilities": f"{root}/later.zarr/prob"},
                           "instances": {"url": f"precomputed://{root}/later_seg"}})
    state = neuroglancer_state(config, port=8124)
    assert {layer["name"]: layer["source"] for layer in state["layers"]} == {
        "image": "zarr3://http://127.0.0.1:8124/image", "probabilities": "zarr3://http://127.0.0.1:8124/probabilities",
        "instances": "precomputed://http://127.0.0.1:8124/instances"}
    for started in _start(make_server(volume_routes(config), 0)):
        assert _get(started, "/probabilities/zarr.json")[0] == 404
        _volume(f"{root}/later.zarr/prob", "float32", 4, chunk_shape=(2, 8, 8))
        status, _, body = _get(started, "/probabilities/zarr.json")
        assert status == 200 and body == (root / "later.zarr" / "prob" / "zarr.json").read_bytes()


def test_each_volume_is_served_under_its_route(run_dir, server):
    routes = volume_routes(run_dir[1])
    for route, file in (("image", "zarr.json"), ("probabilities", "zarr.json"), ("density", "0/zarr.json"),
                        ("instances", "info")):
        status, headers, body = _get(server, f"/{route}/{file}")
        assert status == 200 and body == (routes[route] / file).read_bytes()
        assert headers["Accept-Ranges"] == "bytes" and int(headers["Content-Length"]) == len(body)


@pytest.mark.parametrize("path", [
    "/data.zarr/secret.txt", "/secret.txt", "/config.yaml", "/etc/hostname", "/data.zarr/raw/zarr.json",
    "/image/../secret.txt", "/image/%2e%2e/secret.txt", "/image/%2E%2E%2Fsecret.txt", "/image/..%2fsecret.txt",
    "/image%2f..%2fsecret.txt", "/image/../../config.yaml", "/image/%2e%2e/%2e%2e/config.yaml",
    "/image/./zarr.json", "/image//etc/hostname", "/image/%2Fetc%2Fhostname", "//etc/hostname",
    "/image/..\\secret.txt", "/image/%5c..%5csecret.txt", "/image/zarr.json%00", "/image/zarr.json%00.png",
    "/image/%ff", "http://127.0.0.1/etc/hostname", "/probabilities/leak", "/probabilities/.volseg/sig/block",
    "/probabilities/%2evolseg/sig/block", "/", "/image", "/image/", "/image/0", "/image/0/", "/probabilities/c",
])
def test_nothing_outside_the_volumes_is_served(server, path):
    status, _, body = _get(server, path)
    assert status in (403, 404) and SECRET not in body
    assert _get(server, path, method="HEAD")[0] in (403, 404)


def test_only_reading_methods_are_answered(server):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert _get(server, "/image/zarr.json", method=method)[0] == 501


def test_a_request_for_another_host_name_is_refused(server):
    """DNS rebinding: a page whose name resolves to 127.0.0.1 is same-origin with it, CORS or not."""
    assert _get(server, "/image/zarr.json", Host="evil.example")[0] == 403
    assert _get(server, "/image/zarr.json", Host=f"localhost:{server.server_address[1]}")[0] == 200


def test_cors_headers_go_to_the_neuroglancer_origin_only(server):
    status, headers, _ = _get(server, "/image/zarr.json", Origin=ORIGIN)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Content-Range" in headers["Access-Control-Expose-Headers"]
    assert headers["Vary"] == "Origin"
    # a missing chunk is a 404 Neuroglancer must be able to read (it shows the fill value)
    assert _get(server, "/image/c/9/9/9", Origin=ORIGIN)[1]["Access-Control-Allow-Origin"] == ORIGIN
    for origin in ("https://evil.example", "http://neuroglancer-demo.appspot.com", "null"):
        status, headers, _ = _get(server, "/image/zarr.json", Origin=origin)
        assert "Access-Control-Allow-Origin" not in headers


def test_cors_preflight(server):
    status, headers, _ = _get(server, "/probabilities/c/0/0/0", method="OPTIONS", Origin=ORIGIN,
                              Access_Control_Request_Method="GET", Access_Control_Request_Headers="range")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "GET" in headers["Access-Control-Allow-Methods"] and "HEAD" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "Range"
    status, headers, _ = _get(server, "/probabilities/c/0/0/0", method="OPTIONS", Origin="https://evil.example",
                              Access_Control_Request_Method="GET")
    assert not any(k.startswith("Access-Control-Allow") for k in headers)


def test_a_self_hosted_client_gets_cors(run_dir):
    for server in _start(make_server(volume_routes(run_dir[1]), 0, neuroglancer="http://LocalHost:8080/ng/#!{}")):
        assert _get(server, "/image/zarr.json", Origin="http://localhost:8080")[1][
            "Access-Control-Allow-Origin"] == "http://localhost:8080"
        assert "Access-Control-Allow-Origin" not in _get(server, "/image/zarr.json", Origin=ORIGIN)[1]


def test_web_origin():
    assert web_origin(NEUROGLANCER) == ORIGIN
    assert web_origin("https://ng.example.org:443/x/") == "https://ng.example.org"
    assert web_origin("HTTP://[::1]:8080/") == "http://[::1]:8080"
    for bad in ("neuroglancer-demo.appspot.com", "file:///ng/index.html", "http://host:99999/"):
        with pytest.raises(UnsupportedURLError):
            web_origin(bad)


def test_the_server_listens_on_loopback_by_default(server):
    assert server.server_address[0] == "127.0.0.1" and server.loopback_only
    assert server.url == f"http://127.0.0.1:{server.server_address[1]}"


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=2-9", (2, 10)), ("bytes=5-", (5, 100)), ("bytes=-4", (96, 100)), ("bytes=90-200", (90, 100)),
    ("bytes=-200", (0, 100)), ("bytes=99-99", (99, 100)), ("bytes=100-", (100, 100)), ("bytes=-0", (100, 100)),
    (None, None), ("bytes=9-2", None), ("bytes=1-2,5-6", None), ("items=1-2", None), ("bytes=-", None),
])
def test_byte_range(header, expected):
    assert byte_range(header, 100) == expected


def test_byte_range_of_an_empty_file_is_unsatisfiable():
    assert byte_range("bytes=0-", 0) == (0, 0) and byte_range("bytes=-5", 0) == (0, 0)


def test_range_requests(run_dir, server):
    whole = (run_dir[0] / "seg" / "info").read_bytes()
    for header, (start, stop) in (("bytes=3-17", (3, 18)), ("bytes=10-", (10, len(whole))),
                                  ("bytes=-7", (len(whole) - 7, len(whole)))):
        status, headers, body = _get(server, "/instances/info", Range=header, Origin=ORIGIN)
        assert status == 206 and body == whole[start:stop]
        assert headers["Content-Range"] == f"bytes {start}-{stop - 1}/{len(whole)}"
        assert headers["Content-Length"] == str(stop - start) and headers["Accept-Ranges"] == "bytes"
    status, headers, body = _get(server, "/instances/info", Range=f"bytes={len(whole)}-")
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(whole)}" and body == b""
    assert _get(server, "/instances/info", Range="bytes=9-2")[0:3:2] == (200, whole)
    status, headers, body = _get(server, "/instances/info", method="HEAD", Range="bytes=0-3")
    assert status == 206 and headers["Content-Length"] == "4" and body == b""


def test_the_state_links_local_volumes_at_their_routes(run_dir):
    _, config, _ = run_dir
    sources = {layer["name"]: layer["source"] for layer in neuroglancer_state(config, port=8123)["layers"]}
    assert sources == {"image": "zarr3://http://127.0.0.1:8123/image",
                       "probabilities": "zarr3://http://127.0.0.1:8123/probabilities",
                       "density": "zarr3://http://127.0.0.1:8123/density",
                       "instances": "precomputed://http://127.0.0.1:8123/instances"}
    wildcard = neuroglancer_state(config, port=8123, host="0.0.0.0")["layers"][0]["source"]
    assert wildcard == "zarr3://http://127.0.0.1:8123/image"


def test_remote_volumes_are_linked_as_they_are(run_dir):
    _volume("zarr3://memory://view/raw", "uint8", 4, chunk_shape=(2, 8, 8))
    config = parse_config({"input": {"url": "zarr3://memory://view/raw"},
                           "output": {"probabilities": f"{run_dir[0]}/out.zarr/prob"}})
    sources = [layer["source"] for layer in neuroglancer_state(config, port=8123)["layers"]]
    assert sources == ["zarr3://memory://view/raw", "zarr3://http://127.0.0.1:8123/probabilities"]
    assert volume_routes(config) == {"probabilities": run_dir[0] / "out.zarr" / "prob"}
    remote = parse_config({"input": {"url": "zarr3://memory://view/raw"}})
    assert not needs_server(remote)
    viewer = open_viewer(remote)
    assert viewer.server is None and viewer.lines() == [f"Neuroglancer: {viewer.link}"]
    viewer.serve_forever()  # nothing to serve: returns at once


def test_volumes_read_through_the_server_equal_the_files(run_dir, server):
    """tensorstore reads the sharded probabilities' shard index and chunks with byte ranges."""
    _, config, data = run_dir
    state = neuroglancer_state(config, port=server.server_address[1])
    for layer in state["layers"]:
        volume = open_volume(layer["source"])
        np.testing.assert_array_equal(volume.read(volume.bounds), data[layer["name"]])
    sharded = open_volume(f"zarr3://{server.url}/probabilities")
    assert sharded.shard_shape == (4, 16, 16) and sharded.chunk_shape == (2, 8, 8)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_open_viewer_serves_and_links(run_dir):
    port = _free_port()
    viewer = open_viewer(run_dir[1], port=port)
    assert viewer.link.startswith(NEUROGLANCER + "#!%7B") and f"http%3A//127.0.0.1%3A{port}/image" in viewer.link
    assert viewer.lines()[0] == f"Neuroglancer: {viewer.link}" and f"127.0.0.1:{port}" in viewer.lines()[1]
    assert link({"layers": []}, "http://localhost:8080/#!old") == "http://localhost:8080/#!%7B%22layers%22%3A%5B%5D%7D"
    for server in _start(viewer.server):
        assert _get(server, "/density/zarr.json")[0] == 200


def test_the_bundled_client_is_served_beside_the_volumes(run_dir, monkeypatch):
    """`--neuroglancer bundled`: the neuroglancer package's client from the same server (no internet), its
    WebAssembly with the type browsers compile; without the package, one line saying how to get it."""
    port = _free_port()
    viewer = open_viewer(run_dir[1], port=port, neuroglancer="bundled")
    client = f"http://127.0.0.1:{port}/neuroglancer/index.html"
    assert viewer.link.startswith(client + "#!%7B") and f"http%3A//127.0.0.1%3A{port}/image" in viewer.link
    for server in _start(viewer.server):
        status, headers, body = _get(server, "/neuroglancer/index.html")
        assert status == 200 and b"<script" in body
        wasm = next(p.name for p in bundled_client().iterdir() if p.suffix == ".wasm")
        status, headers, _ = _get(server, f"/neuroglancer/{wasm}", Origin=f"http://127.0.0.1:{port}")
        assert status == 200 and headers["Content-Type"] == "application/wasm"
        assert headers["Access-Control-Allow-Origin"] == f"http://127.0.0.1:{port}"
        assert _get(server, "/image/zarr.json")[0] == 200
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # as if the package were absent
    with pytest.raises(ConfigError, match="not installed"):
        open_viewer(run_dir[1], port=_free_port(), neuroglancer="bundled")


def test_port_errors_are_one_line(run_dir):
    routes = volume_routes(run_dir[1])
    for port in (-1, 65536):
        with pytest.raises(ViewerPortError, match=r"outside 0\.\.65535"):
            make_server(routes, port)
    with pytest.raises(ViewerPortError, match=r"outside 1\.\.65535"):
        open_viewer(run_dir[1], port=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ViewerPortError, match=rf"Port {port} .* in use.*--port {port + 1}") as error:
            open_viewer(run_dir[1], port=port)
    assert "\n" not in str(error.value) and isinstance(error.value, OSError)


def test_nothing_to_serve(run_dir, tmp_path):
    with pytest.raises(VolumeNotFoundError, match="local disk"):
        make_server({}, 0)
    nothing = parse_config({"output": {"probabilities": str(tmp_path / "none.zarr")}}, "run.yaml")
    with pytest.raises(VolumeNotFoundError, match=r"run\.yaml: none of its volumes exists yet"):
        open_viewer(nothing, port=_free_port())


def test_a_symlink_inside_the_volume_pointing_inside_it_is_served(run_dir, server):
    root = run_dir[0]
    link_path = root / "out.zarr" / "density" / "alias.json"
    if not link_path.exists():
        os.symlink(root / "out.zarr" / "density" / "zarr.json", link_path)
    assert _get(server, "/density/alias.json")[2] == (root / "out.zarr" / "density" / "zarr.json").read_bytes()
    assert resolve("/density/alias.json", volume_routes(run_dir[1])) == link_path.resolve()


def test_the_state_opens_on_the_volume_centre_with_overlays_that_keep_the_em_visible(run_dir):
    _, config, _ = run_dir
    state = neuroglancer_state(config, port=8123)
    image = open_volume(config.input.url)
    z, y, x = (np.asarray(image.voxel_offset) + np.asarray(image.shape) / 2).tolist()
    assert state["position"] == [x, y, z]
    _, vy, vx = image.voxel_size_nm
    fitted = max(image.shape[1] * vy, image.shape[2] * vx) / min(vx, vy)  # the larger in-plane side, in voxels
    assert state["crossSectionScale"] == pytest.approx(fitted / 800)
    shaders = {layer["name"]: layer.get("shader") for layer in state["layers"]}
    assert shaders["image"] is None and shaders["instances"] is None
    for name in ("probabilities", "density"):  # alpha follows the value: transparent where it is 0
        assert "emitRGBA(vec4(" in shaders[name] and "0.6 * v)" in shaders[name] and "emitRGB(" not in shaders[name]
    assert all("opacity" not in layer for layer in state["layers"])


def test_zarr_instances_bring_their_segment_properties_and_meshes_as_more_sources(run_dir):
    root = run_dir[0]
    config = parse_config({"input": {"url": f"{root}/data.zarr/raw"},
                           "output": {"probabilities": f"{root}/out.zarr/prob"},
                           "instances": {"url": f"{root}/run.zarr/instances", "meshes": True}})
    layers = {layer["name"]: layer for layer in neuroglancer_state(config, port=8125)["layers"]}
    assert layers["instances"]["type"] == "segmentation" and layers["instances"]["source"] == [
        "zarr3://http://127.0.0.1:8125/instances", "precomputed://http://127.0.0.1:8125/instances/segment_properties",
        "precomputed://http://127.0.0.1:8125/instances/mesh"]
