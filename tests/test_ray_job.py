"""`ray job submit ... -- volseg run CONFIG` against a real Ray cluster started with `ray start --head`.

The cluster is this test's own: its own ports, its own temp dir (``--temp-dir`` and ``RAY_TMPDIR``), its
own token (``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH`` pointing at a fresh file, so the shared
``~/.ray/auth_token`` is neither read nor written). It is stopped by killing exactly the processes it
started (the session of `ray start`, and anything running in its temp dir), never with `ray stop`, which
would stop every Ray cluster on the machine.

How the job finds volseg: the job's working directory (a copy of the ``volseg`` package and the config) is
uploaded and put first on ``PYTHONPATH``, so the job imports the code under test; the ``volseg`` console
script is found because the cluster was started with this virtual environment's ``bin`` first on
``PATH`` (a job's entrypoint inherits the environment of the node it runs on; on KubeRay and cluster-launcher
nodes the image or setup commands put volseg's environment on ``PATH`` the same way).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import write_config
from volseg.cli import main
from volseg.io import open_volume

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class RayHead:
    """A head node being started by `ray start` (``process``); :meth:`wait` until it is up."""

    dashboard_url: str
    token: str
    env: dict[str, str]
    process: subprocess.Popen

    def wait(self) -> None:
        output, _ = self.process.communicate(timeout=120)
        assert self.process.returncode == 0, f"`ray start` failed:\n{output}"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago (all held open at once while choosing)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def cluster_env(temp_dir: Path, token_file: Path) -> dict[str, str]:
    """This environment, with this venv first on PATH and Ray pointed at the test's own temp dir and token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_TMPDIR": str(temp_dir),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def stop_cluster(session_id: int | None, temp_dir: Path) -> None:
    """Terminate (then kill) every process of the `ray start` session, and any process that runs in or
    names ``temp_dir`` (a job's driver runs in a session of its own, inside the temp dir)."""
    mine = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid():
                continue
            in_session = session_id is not None and os.getsid(proc.pid) == session_id
            if in_session or str(temp_dir) in " ".join(proc.cmdline()) or f"{proc.cwd()}/".startswith(f"{temp_dir}/"):
                mine.append(proc)
        except (psutil.Error, OSError):
            continue
    for proc in mine:
        with suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=4)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A `ray start --head` cluster with 2 CPUs, its dashboard (the job API) and token auth, starting in the
    background while the test prepares (call ``wait()`` before using it)."""
    ray_cli = VENV_BIN / "ray"
    if not ray_cli.exists():
        pytest.skip(f"no `ray` command beside {sys.executable}")
    # A short path: Ray's unix sockets live under it, and a socket path may have at most 107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="vsray-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    env = cluster_env(temp_dir, token_file)
    gcs, dashboard, agent, client = free_ports(4)
    command = [str(ray_cli), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
               f"--ray-client-server-port={client}", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               "--object-store-memory=100000000", "--disable-usage-stats"]
    session_id = None
    try:
        start = subprocess.Popen(command, cwd=temp_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        session_id = start.pid  # start_new_session: the session id is the leader's pid, inherited by Ray
        yield RayHead(f"http://127.0.0.1:{dashboard}", token, env, start)
    finally:
        stop_cluster(session_id, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job_info(head: RayHead, submission_id: str, token: str | None) -> dict:
    """The job's record from the Jobs REST API, sent with ``token`` as bearer (or none)."""
    request = urllib.request.Request(f"{head.dashboard_url}/api/jobs/{submission_id}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def tiny_configs(tmp_path: Path, run_config) -> tuple[dict, dict]:
    """The job's config (default executor, which is Ray) and the same with the serial executor, writing
    elsewhere. Absolute paths: the job runs in its unpacked working dir, on this machine."""
    job = run_config()
    job["output"] = {**job["output"], "probabilities": str(tmp_path / "job.zarr/prob"),
                     "density": str(tmp_path / "job.zarr/density")}
    job["execution"] = {"block": [4, 32, 48], "actors": 1, "cpus_per_actor": 1}
    serial = run_config()
    serial["execution"] = {"block": [4, 32, 48], "executor": "serial"}
    return job, serial


def working_dir(tmp_path: Path, config: dict) -> Path:
    """A copy of the package under test plus the job's config: what `ray job submit` uploads."""
    root = tmp_path / "job"
    shutil.copytree(REPO / "volseg", root / "volseg", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    write_config(root / "tiny.yaml", config)
    return root


def test_ray_job_submit_runs_volseg_and_writes_what_a_serial_run_writes(ray_head, tmp_path, run_config):
    job_config, serial_config = tiny_configs(tmp_path, run_config)
    wd = working_dir(tmp_path, job_config)
    # The reference first, while the cluster starts.
    assert main(["run", str(write_config(tmp_path / "serial.yaml", serial_config)), "--no-progress"]) == 0
    ray_head.wait()

    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(wd),
         "--", "volseg", "run", "tiny.yaml"],
        env=ray_head.env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    log = submit.stdout + submit.stderr
    print(log)  # shown when the test fails (or with -s)
    found = re.search(r"Job '(raysubmit_\w+)' submitted successfully", log)
    assert found, f"`ray job submit` did not submit:\n{log}"
    submission_id = found.group(1)

    info = job_info(ray_head, submission_id, ray_head.token)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{log}"
    assert submit.returncode == 0, log
    if "Connected to Ray cluster" in log:  # `volseg run` joined a cluster (the Ray executor): this one
        assert f"127.0.0.1:{ray_head.dashboard_url.rsplit(':', 1)[1]}" in log, log
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on: no token, no answer
        job_info(ray_head, submission_id, None)
    assert refused.value.code == 401

    for name in ("prob", "density"):
        job_out = open_volume(str(tmp_path / f"job.zarr/{name}"))
        serial_out = open_volume(str(tmp_path / f"out.zarr/{name}"))
        job_data, serial_data = job_out.read(job_out.bounds), serial_out.read(serial_out.bounds)
        assert job_data.shape == serial_data.shape == (10, 72, 80)
        assert float(np.std(job_data)) > 0  # a real prediction, not an untouched fill value
        # Float tolerance, not bytes: a Ray actor with 1 CPU runs torch on 1 thread (OMP_NUM_THREADS=1),
        # this process on several, and the order of float sums differs by a few ULP.
        np.testing.assert_allclose(job_data, serial_data, rtol=1e-5, atol=1e-6)
        assert job_out.attributes["volseg"]["signature"] == serial_out.attributes["volseg"]["signature"]
