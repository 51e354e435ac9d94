"""The deployment files: configs/mitoem*.yaml and cluster/ (KubeRay manifests, cluster-launcher YAML,
image recipe). They run nowhere in the tests, so these tests check what their consumers require: the
config parses and validates given its data; the manifests have the fields KubeRay's ray.io/v1 CRDs and
the Ray cluster launcher's schema need; the image and the launcher install volseg the way README.md does."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import write_config
from volseg.cli import main
from volseg.config import load_config
from volseg.engine.cluster import _unseen_markers, _workers_in_this_interpreter, check_shared_storage
from volseg.io import create_volume
from volseg.io.guard import check_job_paths
from volseg.models import build_model
from volseg.models.checkpoint import card_path, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MITOEM = {"R": REPO / "configs/mitoem.yaml", "H": REPO / "configs/mitoem-h.yaml"}


def load_yaml(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet (split at newlines, `&&`, `||` and `;`), as token lists;
    comments dropped."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;", line.split(" #")[0]):
            tokens = shlex.split(part, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def readme_install() -> tuple[list[str], str]:
    """From README.md's "Set up and run": the command that installs uv (``pip install uv``) and the Python
    version that ``uv run --python X`` builds the environment with."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [c for block in blocks for c in shell_commands(block)]
    installs = [c for c in commands if c[:2] == ["pip", "install"]]
    runs = [c for c in commands if c[:2] == ["uv", "run"] and "--python" in c]
    assert installs and runs, f"README.md's set-up commands changed: {commands}"
    return installs[0], runs[0][runs[0].index("--python") + 1]


def installs_like_readme(commands: list[list[str]], where: str) -> None:
    """``commands`` install uv as README.md does and build the environment with uv from uv.lock
    (``--locked``/``--frozen``: the lock decides every version, as `uv run` does) with README's Python."""
    install, python = readme_install()
    assert any([t for t in c if not t.startswith("-")] == install for c in commands), \
        f"{where} does not run {shlex.join(install)!r} as README.md does"
    syncs = [c for c in commands if c[:2] in (["uv", "sync"], ["uv", "run"])]
    assert syncs, f"{where} never builds the environment with `uv sync` / `uv run`"
    for command in syncs:
        assert "--python" in command and command[command.index("--python") + 1] == python, \
            f"{where}: {shlex.join(command)!r} must use --python {python} like README.md"
        assert {"--locked", "--frozen"} & set(command), f"{where}: {shlex.join(command)!r} must install from uv.lock"


def locked_ray_version() -> str:
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    return next(p["version"] for p in lock["package"] if p["name"] == "ray")


# --- configs/mitoem.yaml, configs/mitoem-h.yaml ---------------------------------------------------------


@pytest.mark.parametrize("which", ["R", "H"])
def test_mitoem_config_has_the_papers_inference_settings(which):
    config = load_config(MITOEM[which])
    assert f"MitoEM-{which}" in config.input.url
    assert config.model.name == "promptdas" and config.model.options["encoder"] == "vit_s8"
    assert config.inference.window == (1, 384, 384) and config.inference.stride == (1, 128, 128)
    assert config.inference.precision == "bfloat16" and config.inference.threshold == 0.5
    assert config.prompts is not None and config.prompts.auto and config.output.density is not None
    assert config.instances is not None and config.instances.method == "watershed"
    assert config.execution.executor == "ray"
    block, shard, chunk = config.execution.block, config.output.shard, config.output.chunk
    assert all(b % s == 0 for b, s in zip(block, shard, strict=True))  # blocks own whole shards
    assert all(s % c == 0 for s, c in zip(shard, chunk, strict=True))


def test_mitoem_configs_write_to_different_places():
    r, h = (load_config(MITOEM[k]) for k in "RH")
    assert r.input.url != h.input.url and r.model.checkpoint != h.model.checkpoint
    r_outputs = {r.output.probabilities, r.output.density, r.instances.url}
    h_outputs = {h.output.probabilities, h.output.density, h.instances.url}
    assert len(r_outputs) == 3 and not r_outputs & h_outputs


@pytest.mark.parametrize("which", ["R", "H"])
def test_mitoem_validate_without_data_names_the_missing_volume(which, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["validate", str(MITOEM[which])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert load_config(MITOEM[which]).input.url in err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def vit_s8_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised Prompt-DAS with the MitoEM configs' model spec (ViT-S/8, paper decoder)."""
    spec = load_config(MITOEM["R"]).model.spec
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("vits8") / "model.safetensors", build_model(spec), spec,
                           {"mode": "test"})


@pytest.mark.parametrize("which", ["R", "H"])
def test_mitoem_config_is_valid_given_its_data(which, vit_s8_checkpoint, tmp_path, monkeypatch, capsys):
    """With a (small) volume at input.url and a checkpoint of the configured spec at model.checkpoint,
    `volseg validate` accepts the config as it is: model spec, window, chunks, shards and blocks fit."""
    monkeypatch.chdir(tmp_path)
    config = load_config(MITOEM[which])
    raw = create_volume(config.input.url, shape=(20, 400, 448), dtype=np.uint8, voxel_size_nm=(30, 8, 8),
                        chunk_shape=(16, 256, 256))
    raw.write(raw.bounds, np.random.default_rng(0).integers(0, 255, raw.shape, dtype=np.uint8))
    checkpoint = Path(config.model.checkpoint)
    checkpoint.parent.mkdir(parents=True)
    checkpoint.symlink_to(vit_s8_checkpoint)
    card_path(checkpoint).symlink_to(card_path(vit_s8_checkpoint))

    code = main(["validate", str(MITOEM[which])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "the config is valid" in out and "voxel size (30.0, 8.0, 8.0) nm" in out
    assert not (tmp_path / "volseg-output").exists()  # validate writes nothing


# --- cluster/Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (CLUSTER / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def test_image_installs_volseg_the_way_the_readme_does():
    instructions = dockerfile_instructions()
    _, python = readme_install()
    base = next(args for op, args in instructions if op == "FROM")
    assert base.startswith(f"python:{python}"), f"the base image {base!r} must have README's Python {python}"
    runs = [c for op, args in instructions if op == "RUN" for c in shell_commands(args)]
    installs_like_readme(runs, "cluster/Dockerfile")

    copied = [args.split()[:-1] for op, args in instructions if op == "COPY"]
    copied = {source for sources in copied for source in sources}
    assert {"pyproject.toml", "uv.lock", "README.md", "volseg", "configs"} <= copied
    # The last `uv sync` (the one that installs volseg itself) comes after volseg's code is copied in.
    order = [(op, args) for op, args in instructions if op in ("COPY", "RUN")]
    last_sync = max(i for i, (op, args) in enumerate(order) if op == "RUN" and "uv sync" in args)
    copy_code = next(i for i, (op, args) in enumerate(order) if op == "COPY" and "volseg" in args.split()[:-1])
    assert copy_code < last_sync and "--no-install-project" not in order[last_sync][1]

    workdir = next(args for op, args in instructions if op == "WORKDIR")
    env = " ".join(args for op, args in instructions if op == "ENV")
    assert f"PATH={workdir}/.venv/bin:" in env, "volseg's environment must come first on PATH (ray start, volseg)"


def test_image_build_context_keeps_what_the_image_copies():
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    for source in ("pyproject.toml", "uv.lock", "README.md", "volseg/", "configs/"):
        assert f"!{source}" in ignore, f"{source} is left out of the build context"


# --- cluster/raycluster.yaml, cluster/rayjob.yaml, cluster/storage.yaml ----------------------------------


def image_workdir() -> str:
    return next(args for op, args in dockerfile_instructions() if op == "WORKDIR")


def check_ray_start_params(params: object, where: str) -> None:
    assert isinstance(params, dict), f"{where}.rayStartParams must be a mapping"
    for key, value in params.items():
        assert isinstance(value, str), f"{where}.rayStartParams.{key} must be a string (KubeRay: map[string]string)"


def check_pod_template(template: dict, where: str) -> list[dict]:
    """A pod template whose first container is the Ray container: image, resources, mounted volumes."""
    pod = template["spec"]
    containers = pod["containers"]
    assert containers, f"{where}: no containers"
    volumes = {v["name"] for v in pod.get("volumes", [])}
    for container in containers:
        name = f"{where}.containers[{container.get('name')}]"
        assert container.get("name") and container.get("image"), f"{name} needs a name and an image"
        resources = container["resources"]
        for kind in ("limits", "requests"):
            assert {"cpu", "memory"} <= set(resources[kind]), f"{name}.resources.{kind} needs cpu and memory"
        if "nvidia.com/gpu" in resources["limits"]:
            assert resources["requests"].get("nvidia.com/gpu") == resources["limits"]["nvidia.com/gpu"], \
                f"{name}: GPU requests must equal limits (extended resources)"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name} mounts {mount['name']!r}, which the pod does not define"
        assert container.get("workingDir", image_workdir()) == image_workdir()
    return containers


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert str(spec["rayVersion"]) == locked_ray_version(), f"{where}.rayVersion must be the ray of uv.lock"
    assert spec["authOptions"]["mode"] == "token"

    head = spec["headGroupSpec"]
    check_ray_start_params(head["rayStartParams"], f"{where}.headGroupSpec")
    head_containers = check_pod_template(head["template"], f"{where}.headGroupSpec")
    ports = {p["containerPort"] for p in head_containers[0].get("ports", [])}
    assert {6379, 8265, 10001} <= ports, f"{where}: the head must expose GCS, dashboard and client ports"

    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no workerGroupSpecs"
    gpus = 0
    for group in groups:
        name = f"{where}.workerGroupSpecs[{group['groupName']}]"
        low, count, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert all(isinstance(n, int) for n in (low, count, high)) and 0 <= low <= count <= high, name
        check_ray_start_params(group["rayStartParams"], name)
        containers = check_pod_template(group["template"], name)
        gpus += int(containers[0]["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus >= 1, f"{where}: no worker group has GPUs (nvidia.com/gpu limits)"

    images = {c["image"] for c in head_containers} | {
        c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1, f"{where}: head and workers must run one image, got {images}"


def claims(spec: dict) -> set[str]:
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod.get("volumes", [])
            if "persistentVolumeClaim" in v}


def test_raycluster_manifest_is_a_kuberay_gpu_cluster():
    manifest = load_yaml(CLUSTER / "raycluster.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    check_ray_cluster_spec(manifest["spec"], "RayCluster.spec")


def test_rayjob_manifest_runs_the_mitoem_config_on_the_same_cluster():
    manifest = load_yaml(CLUSTER / "rayjob.yaml")
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    assert spec["entrypoint"] == "volseg run configs/mitoem.yaml"
    load_config(REPO / spec["entrypoint"].split()[-1])  # the config it runs exists (in the image) and parses
    check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    assert spec["rayClusterSpec"] == load_yaml(CLUSTER / "raycluster.yaml")["spec"], \
        "rayjob.yaml's rayClusterSpec and raycluster.yaml's spec have drifted apart"
    assert spec["shutdownAfterJobFinishes"] is True


def test_shared_storage_is_the_claim_the_pods_mount():
    claim = load_yaml(CLUSTER / "storage.yaml")
    assert claim["apiVersion"] == "v1" and claim["kind"] == "PersistentVolumeClaim"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every GPU worker writes outputs
    assert claims(load_yaml(CLUSTER / "raycluster.yaml")["spec"]) == {claim["metadata"]["name"]}
    # The mounts make the relative paths of configs/mitoem.yaml land on the shared volume.
    config = load_config(MITOEM["R"])
    head = load_yaml(CLUSTER / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounted = {Path(m["mountPath"]).relative_to(image_workdir()).parts[0] for m in head["volumeMounts"]
               if m["mountPath"].startswith(image_workdir() + "/")}
    for path in (config.input.url, config.model.checkpoint, config.output.probabilities, config.instances.url):
        assert Path(path).parts[0] in mounted, f"{path} is not on the shared volume"


# --- cluster/aws-gpu.yaml (Ray cluster launcher) ---------------------------------------------------------


def test_cluster_launcher_config_has_a_head_and_gpu_workers():
    config = load_yaml(CLUSTER / "aws-gpu.yaml")
    assert config["cluster_name"] and isinstance(config["max_workers"], int)
    assert config["provider"]["type"] in ("aws", "gcp", "azure")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for name, node_type in types.items():
        assert node_type["node_config"] and isinstance(node_type["resources"], dict), name
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker node type"
    for name, node_type in workers.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name

    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    for start in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in start  # token auth; the token file is in file_mounts
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_cluster_launcher_nodes_install_volseg_the_way_the_readme_does():
    config = load_yaml(CLUSTER / "aws-gpu.yaml")
    commands = [c for text in config["setup_commands"] for c in shell_commands(text)]
    installs_like_readme(commands, "cluster/aws-gpu.yaml setup_commands")
    assert config["file_mounts"].get("~/volseg") == ".", "the nodes need this checkout (pyproject, uv.lock, volseg)"


def test_cluster_launcher_config_passes_rays_own_validation():
    util = pytest.importorskip("ray.autoscaler._private.util")
    config = util.prepare_config(copy.deepcopy(load_yaml(CLUSTER / "aws-gpu.yaml")))  # what `ray up` does first
    util.validate_config(config)  # ray-schema.json, then the node-type checks


# --- paths on a cluster ---------------------------------------------------------------------------------


def test_a_ray_job_refuses_relative_outputs_in_its_uploaded_working_dir(tmp_path, monkeypatch, capsys) -> None:
    """`ray job submit --working-dir .` runs volseg in a temporary copy: relative outputs would vanish."""
    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    config = {"input": {"url": "data/in.zarr"}, "model": {"name": "unet"},
              "output": {"probabilities": "volseg-output/p.zarr"}}
    write_config(job_dir / "run.yaml", config)
    monkeypatch.chdir(job_dir)
    capsys.readouterr()
    assert main(["validate", "run.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output.probabilities 'volseg-output/p.zarr' is a relative path" in err
    assert "_ray_pkg_abc" in err and "bucket URL" in err
    assert not (job_dir / "volseg-output").exists()
    # absolute paths and buckets are fine; outside a job working dir, relative paths are too
    check_job_paths([("output.probabilities", str(tmp_path / "p.zarr")), ("instances.url", "gs://b/i.zarr")])
    check_job_paths([("output.probabilities", "p.zarr")], cwd=str(tmp_path))


def test_only_a_local_instance_turns_off_rays_uv_hook(monkeypatch) -> None:
    """Under `uv run`, Ray would start each worker of a local instance through `uv run` again; the hook stays
    on for a cluster volseg joins, and whatever the user set in RAY_ENABLE_UV_RUN_RUNTIME_ENV wins."""
    from ray._private import ray_constants

    monkeypatch.delenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", raising=False)
    monkeypatch.setattr(ray_constants, "RAY_ENABLE_UV_RUN_RUNTIME_ENV", True)
    with _workers_in_this_interpreter(local=True):
        assert ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV is False
    assert ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV is True
    with _workers_in_this_interpreter(local=False):
        assert ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV is True
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "1")
    with _workers_in_this_interpreter(local=True):
        assert ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV is True


@pytest.mark.ray
def test_every_node_must_see_a_local_output(ray_cluster, tmp_path) -> None:
    """One task per node reads a marker the driver wrote beside each output; markers are deleted after."""
    (tmp_path / "out").mkdir()
    check_shared_storage([("output.probabilities", str(tmp_path / "out" / "new.zarr" / "p")),
                          ("instances.url", "gs://bucket/i.zarr")], min_nodes=1)
    assert list((tmp_path / "out").iterdir()) == []  # the marker is gone, nothing else written
    marker = tmp_path / "out" / ".volseg-shared-x"
    marker.write_text("x")
    assert _unseen_markers([str(marker), str(tmp_path / "elsewhere" / ".volseg-shared-x")], "x") == [
        str(tmp_path / "elsewhere" / ".volseg-shared-x")]
    assert _unseen_markers([str(marker)], "another run's token") == [str(marker)]
