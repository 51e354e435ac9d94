"""Blockwise inference scaling over Ray actors, side by side in one run.

    uv run python bench/scaling.py            # 64×1024×1024 uint8 zarr, small U-Net
    uv run python bench/scaling.py --quick    # 32×512×512
    uv run python bench/scaling.py --gpu      # also: Prompt-DAS ViT-S/8, 384 windows, bf16, on the GPU

Each row runs `volseg run` end to end (zarr on disk → zarr on disk) in a fresh process with its own
local Ray instance: the serial executor with one torch thread, then the Ray executor with 1 and with 2
actors of one CPU each. It prints the seconds spent starting actors and shipping them the model, the
steady voxels/s of the block pass after that (every block read, predicted, blended, written and
marked done), voxels/s end to end (with Ray's and the actors' start), and the 2-actor / 1-actor ratio
of the steady rates. With ``--gpu`` it also times Prompt-DAS ViT-S/8 on 384×384 windows in bf16 on
the GPU and reports voxels/s and the fraction of the GPU's peak bf16 FLOP/s (FLOPs counted by torch).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from blockwise import CHUNK, MODEL, STRIDE, WINDOW, make_volume

from volseg.config import parse_config
from volseg.models import ModelSpec, build_model
from volseg.models.checkpoint import save_checkpoint

#: Dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
PROMPTDAS_VITS8 = ModelSpec("promptdas", options={"encoder": "vit_s8"})


def block_for(shape: tuple[int, ...]) -> list[int]:
    return [CHUNK[0], shape[1] // 2, shape[2] // 2]


def child_run(url: str, checkpoint: str, out: str, executor: str, actors: int, block: list[int]) -> dict:
    from volseg.commands.run import run

    torch.set_num_threads(1)
    execution = {"block": block, "executor": executor}
    if executor == "ray":
        execution |= {"actors": actors, "cpus_per_actor": 1, "in_flight": 2}
    config = parse_config({
        "input": {"url": url},
        "model": {"name": MODEL.name, "options": dict(MODEL.options), "checkpoint": checkpoint},
        "inference": {"window": list(WINDOW), "stride": list(STRIDE), "batch_size": 16, "device": "cpu"},
        "output": {"probabilities": f"{out}/prob", "density": f"{out}/density", "chunk": list(CHUNK),
                   "dtype": "uint8"},
        "execution": execution,
    }, "bench")
    begin = time.perf_counter()
    result = run(config, overwrite=True, progress=False)
    return {"pass_seconds": result.stats.seconds - result.stats.startup_seconds,
            "startup_seconds": result.stats.startup_seconds, "total_seconds": time.perf_counter() - begin,
            "voxels": result.stats.voxels, "blocks": result.stats.blocks_done}


def gpu_promptdas(seconds: float = 20.0) -> dict:
    """Prompt-DAS ViT-S/8 on 384×384 windows in bf16: voxels/s and fraction of peak FLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode

    from volseg.inference.predictor import TorchPredictor
    from volseg.models import input_contract

    if not torch.cuda.is_available():
        return {"error": "no CUDA GPU on this machine"}
    model = build_model(PROMPTDAS_VITS8)
    predictor = TorchPredictor(model, input_contract(PROMPTDAS_VITS8), (1, 384, 384), 1, device="cuda",
                               batch_size=32, amp_dtype=torch.bfloat16)
    windows = torch.randint(0, 255, (32, 1, 384, 384), dtype=torch.uint8).numpy()
    with FlopCounterMode(display=False) as counter:
        predictor.predict(windows[:1])
    flops_per_window = counter.get_total_flops()
    for _ in range(3):
        predictor.predict(windows)
    torch.cuda.synchronize()
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        predictor.predict(windows)
        count += len(windows)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - begin
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    achieved = flops_per_window * count / elapsed
    return {"device": name, "voxels_per_s": count * 384 * 384 / elapsed, "tflops": achieved / 1e12,
            "peak_fraction": achieved / peak if peak else None}


def run_child(**kwargs: str) -> dict:
    args = [sys.executable, __file__, "--child"] + [f"--{k}={v}" for k, v in kwargs.items()]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-output/scaling")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--url")
    parser.add_argument("--checkpoint")
    parser.add_argument("--out")
    parser.add_argument("--executor")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--block")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_run(args.url, args.checkpoint, args.out, args.executor, args.actors,
                                   json.loads(args.block))))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shape = (32, 512, 512) if args.quick else (64, 1024, 1024)
    url = make_volume(work / f"volume_{'x'.join(map(str, shape))}.zarr", shape)
    torch.manual_seed(0)
    checkpoint = str(save_checkpoint(work / "unet.safetensors", build_model(MODEL), MODEL, {"mode": "bench"}))
    rows = []
    for label, executor, actors in (("serial, 1 torch thread", "serial", 1), ("Ray, 1 actor × 1 CPU", "ray", 1),
                                    ("Ray, 2 actors × 1 CPU", "ray", 2)):
        print(f"running {label} on {shape} ...", file=sys.stderr, flush=True)
        out = work / f"out_{shape[0]}x{shape[1]}_{executor}{actors}.zarr"
        rows.append((label, run_child(url=url, checkpoint=checkpoint, out=str(out),
                                      executor=executor, actors=str(actors), block=json.dumps(block_for(shape)))))
    print(f"\nvolume {shape} uint8 zarr, model {MODEL.name} {dict(MODEL.options)}, window {WINDOW}, "
          f"stride {STRIDE}, block {tuple(block_for(shape))}")
    header = (f"| {'executor':<24} | {'blocks':>6} | {'actor start s':>13} | {'steady Mvox/s':>13} | "
              f"{'end-to-end Mvox/s':>17} |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    speeds = {}
    for label, result in rows:
        if "error" in result:
            print(f"| {label:<24} | {'—':>6} | {'—':>13} | {result['error'][:30]:>13} | {'—':>17} |")
            continue
        speeds[label] = result["voxels"] / result["pass_seconds"]
        print(f"| {label:<24} | {result['blocks']:6d} | {result['startup_seconds']:13.1f} | "
              f"{speeds[label] / 1e6:13.3f} | {result['voxels'] / result['total_seconds'] / 1e6:17.3f} |")
    one, two = speeds.get("Ray, 1 actor × 1 CPU"), speeds.get("Ray, 2 actors × 1 CPU")
    if one and two:
        print(f"2 actors / 1 actor: {two / one:.2f}×")
    if args.gpu:
        gpu = gpu_promptdas()
        if "error" in gpu:
            print(f"GPU: {gpu['error']}")
        else:
            fraction = "unknown peak" if gpu["peak_fraction"] is None else f"{gpu['peak_fraction']:.1%} of peak"
            print(f"GPU {gpu['device']}: Prompt-DAS ViT-S/8, 384 windows, bf16: "
                  f"{gpu['voxels_per_s'] / 1e6:.1f} Mvox/s per GPU, {gpu['tflops']:.1f} TFLOP/s ({fraction})")


if __name__ == "__main__":
    main()
