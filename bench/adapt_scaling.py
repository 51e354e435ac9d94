"""Data-parallel mean-teacher adaptation (UDA) under Ray Train: samples/s with 1 and 2 workers, side by side.

    uv run python bench/adapt_scaling.py            # Prompt-DAS (ViT-tiny/8, decoder 128), 128² crops
    uv run python bench/adapt_scaling.py --quick    # tiny Prompt-DAS, 64² crops, fewer steps
    uv run python bench/adapt_scaling.py --gpu      # one worker per GPU (NCCL), 1 and 2 GPUs if there are 2

Writes a synthetic source (tem, labelled) and target (fibsem) volume as zarr, then runs the same UDA
training, with the same global batch (``--batch`` crops per domain and step, split evenly among the
workers), three ways: the training loop in this process (``--cpus-per-worker`` torch threads, as a
worker gets), and Ray Train with 1 and with 2 workers (CPU workers with gloo; with ``--gpu`` one GPU each,
NCCL). Every worker reads its crops straight from the zarr volumes.

A sample is one 2D crop through the student (source and target crops alike). "steady samples/s" is
measured over the second half of the steps (the first half includes warm-up: a checkpoint is written
after it); "wall s" includes starting Ray Train's workers. The last column is the ratio of the steady
rate to that of 1 Ray worker. On a 2-core machine 2 CPU workers can at best reach 2×; on GPUs the rate
per GPU is what should stay flat.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ray
import torch

from volseg.config import ClusterConfig
from volseg.data.synthetic import generate_volume
from volseg.io import create_volume, open_volume
from volseg.models import ModelSpec, build_model
from volseg.training.distributed import TrainingJob, train_distributed
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, TrainingInputs, train_promptdas

SCALES = {
    "full": {"model": {"encoder": "vit_tiny8", "decoder_dim": 128, "decoder_heads": 4, "decoder_mlp": 512,
                       "projection_dim": 64}, "crop": 128, "batch": 8, "steps": 16, "shape": (16, 256, 256)},
    "quick": {"model": {"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 32,
                        "projection_dim": 8}, "crop": 64, "batch": 4, "steps": 8, "shape": (8, 128, 128)},
}


@dataclass(frozen=True)
class Row:
    name: str
    workers: int
    per_worker_batch: int
    steady: float
    wall: float


def write_domains(root: Path, shape: tuple[int, int, int]) -> dict[str, str]:
    """Source (tem, raw + mito) and target (fibsem, raw) volumes as zarr under ``root``."""
    urls = {}
    for name, domain, seed in (("source", "tem", 1), ("target", "fibsem", 2)):
        data = generate_volume(shape, domain, seed)
        for array_name, array in (("raw", data.raw), ("mito", data.mito)):
            url = f"{root}/{name}.zarr/{array_name}"
            volume = create_volume(url, shape=array.shape, dtype=array.dtype, voxel_size_nm=data.voxel_size_nm,
                                   chunk_shape=(1, 64, 64))
            volume.write(volume.bounds, array)
            urls[f"{name}_{array_name}"] = url
    return urls


def uda_inputs(urls: dict[str, str], spec: ModelSpec, steps: int, batch: int, crop: int) -> TrainingInputs:
    """The UDA run every row trains: volumes opened here (in each worker), a seeded model."""
    source = DomainData(open_volume(urls["source_raw"]), open_volume(urls["source_mito"]))
    target = DomainData(open_volume(urls["target_raw"]))
    torch.manual_seed(0)
    settings = AdaptSettings(mode="uda", steps=steps, batch_size=batch, crop=(1, crop, crop), density_sigma=5.0,
                             peak_threshold=0.1)
    return TrainingInputs(build_model(spec), settings, source, target)


def in_process(prepare, steps: int, threads: int, device: str) -> tuple[float, float]:
    """(steady samples/s over the second half of the steps, wall seconds) of the loop in this process."""
    begin = time.perf_counter()
    torch.set_num_threads(threads)
    inputs = prepare()
    inputs.model.to(device)
    times: dict[int, float] = {}
    train_promptdas(inputs.model, inputs.settings, inputs.source, inputs.target,
                    on_step=lambda step, *_: times.__setitem__(step, time.perf_counter()))
    half = steps // 2
    samples = inputs.settings.batch_size * 2 * (steps - half)
    return samples / (times[steps] - times[half]), time.perf_counter() - begin


def on_ray(prepare, spec: ModelSpec, workers: int, steps: int, cpus: float, gpu: bool, root: Path
           ) -> tuple[float, float]:
    """(steady samples/s over the second half of the steps, wall seconds) of Ray Train with ``workers``."""
    begin = time.perf_counter()
    cluster = ClusterConfig(workers=workers, use_gpu=gpu, cpus_per_worker=cpus, checkpoint_every=steps // 2,
                            max_failures=0, storage=str(root / "ray"))
    run = train_distributed(TrainingJob(prepare, spec, {"bench": f"{workers} workers"},
                                        str(root / f"w{workers}.safetensors"), cluster))
    return float(run.metrics["samples_per_second"]), time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 64² crops, 8 steps")
    parser.add_argument("--gpu", action="store_true", help="one worker per GPU (and the in-process loop on cuda)")
    parser.add_argument("--steps", type=int, help="training steps per row (even; default by scale)")
    parser.add_argument("--batch", type=int, help="global batch: crops per domain and step (default by scale)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = parser.parse_args()
    scale = SCALES["quick" if args.quick else "full"]
    steps, batch = args.steps or scale["steps"], args.batch or scale["batch"]
    spec = ModelSpec("promptdas", options=scale["model"])
    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and gpus == 0:
        raise SystemExit("--gpu: torch sees no GPU")
    worker_counts = [1, 2] if not args.gpu else [n for n in (1, 2) if n <= gpus]
    threads = max(1, int(args.cpus_per_worker))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        urls = write_domains(root, scale["shape"])
        prepare = partial(uda_inputs, urls, spec, steps, batch, scale["crop"])
        ray.init(num_cpus=max(4, int(2 * args.cpus_per_worker) + 1), num_gpus=gpus, include_dashboard=False,
                 log_to_driver=False)
        rows = [Row(f"1 process ({threads} thread{'s' * (threads > 1)}, {'cuda' if gpus else 'cpu'})", 1, batch,
                    *in_process(prepare, steps, threads, "cuda" if gpus else "cpu"))]
        for workers in worker_counts:
            kind = "GPU" if gpus else "CPU"
            rows.append(Row(f"Ray Train, {workers} {kind} worker{'s' * (workers > 1)}", workers, batch // workers,
                            *on_ray(prepare, spec, workers, steps, args.cpus_per_worker, bool(gpus), root)))
        ray.shutdown()
    base = next(r for r in rows if r.name.startswith("Ray Train, 1"))
    print(f"\nUDA (source + target crops each step), Prompt-DAS {dict(spec.options)}, crop {scale['crop']}², "
          f"global batch {batch} per domain, {steps} steps; {torch.get_num_threads()} torch threads here, "
          f"{args.cpus_per_worker:g} CPU per worker")
    per = "samples/s per GPU" if gpus else "samples/s per worker"
    print(f"| {'run':<32} | {'workers':>7} | {'batch/worker':>12} | {'steady samples/s':>16} | {per:>20} | "
          f"{'wall s':>7} | {'vs 1 worker':>11} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 14}|{'-' * 18}|{'-' * 22}|{'-' * 9}|{'-' * 13}|")
    for r in rows:
        print(f"| {r.name:<32} | {r.workers:>7} | {r.per_worker_batch:>12} | {r.steady:>16.2f} | "
              f"{r.steady / r.workers:>20.2f} | {r.wall:>7.1f} | {r.steady / base.steady:>10.2f}× |")
    two = next((r for r in rows if r.name.startswith("Ray Train, 2")), None)
    if two is not None:
        print(f"2 workers / 1 worker (steady samples/s): {two.steady / base.steady:.2f}×")


if __name__ == "__main__":
    main()
