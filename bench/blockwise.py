"""Blockwise inference throughput and memory, side by side in one run.

    uv run --group bench python bench/blockwise.py            # 256×1024×1024 and 4× that
    uv run --group bench python bench/blockwise.py --quick    # 64×512×512, for a smoke test
    uv run --group bench python bench/blockwise.py --scales 1 --repeats 3   # 1× only, fastest of 3

Measures, for one model, window and overlap, each in a fresh subprocess (so peak memory is its own):
  (a) the model alone on the same windows, held in memory (only the model calls are timed);
  (b) volseg's blockwise run end to end, zarr on disk → zarr on disk (plan, read, predict, blend, write),
      with float32 probabilities, and again with uint8 probabilities (output.dtype: uint8; density stays
      float32);
  (b') the same with blocks a quarter of the plane, to show what recomputing shared windows costs;
  (c) MONAI's sliding_window_inference with Gaussian blending on the whole volume in memory.
and prints voxels/s, the ratio to (a), the CPU time (user + system, all threads) of the timed part, and
peak resident memory, at 1× and 4× the volume size. On a machine whose cores the model already fills,
CPU seconds show what I/O and blending cost more steadily than wall time does.
The runs at 1× are repeated ``--repeats`` times, interleaved (a, b, b', c, a, b, …), and each row reports
its fastest run: on a shared machine one run can lose 10% to a neighbour, and the fastest of interleaved
runs compares the methods under the same conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from volseg.allocator import keep_freed_memory
from volseg.config import parse_config
from volseg.data.synthetic import generate_volume
from volseg.geometry import Box
from volseg.inference.blockwise import window_input
from volseg.inference.predictor import TorchPredictor
from volseg.inference.windows import WindowGrid
from volseg.io import create_volume, open_volume
from volseg.models import ModelSpec, build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, save_checkpoint

MODEL = ModelSpec("unet", options={"dims": 2, "width": 8, "levels": 2})
WINDOW = (1, 256, 256)
STRIDE = (1, 192, 192)  # = MONAI overlap 0.25 on a 256 window
BATCH = 16
CHUNK = (16, 256, 256)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_volume(path: Path, shape: tuple[int, int, int]) -> str:
    """A uint8 zarr volume of ``shape`` tiled from one synthetic EM tile (content is realistic, cheap)."""
    url = f"{path}/raw"
    if path.exists():
        return url
    tile = generate_volume((32, 512, 512), "tem", seed=7).raw
    vol = create_volume(url, shape=shape, dtype="uint8", voxel_size_nm=(40, 4, 4), chunk_shape=(32, 256, 256))
    for z in range(0, shape[0], 32):
        slab = np.tile(tile, (1, -(-shape[1] // 512), -(-shape[2] // 512)))[:, : shape[1], : shape[2]]
        box = Box((z, 0, 0), (min(z + 32, shape[0]), shape[1], shape[2]))
        vol.write(box, slab[: box.shape[0]])
    return url


def predictor_from(checkpoint: str) -> TorchPredictor:
    return TorchPredictor(load_checkpoint(checkpoint, MODEL), input_contract(MODEL), WINDOW, 1, batch_size=BATCH)


def child_model_only(url: str, checkpoint: str) -> dict:
    volume = open_volume(url)
    data = volume.read(volume.bounds)
    predictor = predictor_from(checkpoint)
    windows = WindowGrid(volume.shape, WINDOW, STRIDE)
    origins = windows.overlapping(volume.bounds)
    model_seconds = model_cpu = 0.0
    for begin in range(0, len(origins), BATCH):
        batch = np.stack([window_input(data, volume.bounds, windows, o) for o in origins[begin:begin + BATCH]])
        t, c = time.perf_counter(), cpu_seconds()
        predictor.predict(batch)
        model_seconds += time.perf_counter() - t
        model_cpu += cpu_seconds() - c
    return {"seconds": model_seconds, "cpu": model_cpu, "voxels": int(np.prod(volume.shape)),
            "windows": len(origins)}


def child_volseg(url: str, checkpoint: str, out: str, block: list[int], dtype: str) -> dict:
    from volseg.commands.run import run

    config = parse_config({
        "input": {"url": url},
        "model": {"name": MODEL.name, "options": dict(MODEL.options), "checkpoint": checkpoint},
        "inference": {"window": list(WINDOW), "stride": list(STRIDE), "batch_size": BATCH, "device": "cpu"},
        "output": {"probabilities": f"{out}/prob", "density": f"{out}/density", "chunk": list(CHUNK),
                   "dtype": dtype},
        "execution": {"block": block, "executor": "serial"},
    }, "bench")
    t, c = time.perf_counter(), cpu_seconds()
    result = run(config, overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t, "cpu": cpu_seconds() - c, "voxels": result.stats.voxels,
            "blocks": result.stats.blocks_done}


def child_monai(url: str, checkpoint: str) -> dict:
    from monai.inferers import sliding_window_inference

    volume = open_volume(url)
    data = volume.read(volume.bounds)
    predictor = predictor_from(checkpoint)
    model = predictor.model
    contract = predictor.contract

    def network(x: torch.Tensor) -> torch.Tensor:  # B×1×1×Y×X (raw scaled) → B×2×1×Y×X
        logits, density = model((x[:, :, 0] - contract.mean) / contract.std)
        return torch.cat([torch.sigmoid(logits), density], 1).unsqueeze(2)

    image = torch.from_numpy(data).float().div_(255.0)[None, None]
    t, c = time.perf_counter(), cpu_seconds()
    with torch.inference_mode():
        sliding_window_inference(image, WINDOW, BATCH, network, overlap=(0.0, 0.25, 0.25), mode="gaussian")
    return {"seconds": time.perf_counter() - t, "cpu": cpu_seconds() - c, "voxels": int(np.prod(volume.shape))}


def run_child(kind: str, **kwargs: str) -> dict:
    args = [sys.executable, __file__, "--child", kind] + [f"--{k}={v}" for k, v in kwargs.items()]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-output/blockwise")
    parser.add_argument("--quick", action="store_true", help="64×512×512 and 2×, for a smoke test")
    parser.add_argument("--child")
    parser.add_argument("--url")
    parser.add_argument("--checkpoint")
    parser.add_argument("--out")
    parser.add_argument("--block")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each row at 1× (the fastest is shown)")
    parser.add_argument("--scales", default=None, help="volume sizes to run, e.g. '1' (default: 1,4; --quick: 1,2)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    if args.child:
        keep_freed_memory()  # as `volseg` does first thing: before any I/O thread starts
        if args.child == "a":
            result = child_model_only(args.url, args.checkpoint)
        elif args.child == "b":
            result = child_volseg(args.url, args.checkpoint, args.out, json.loads(args.block), args.dtype)
        else:
            result = child_monai(args.url, args.checkpoint)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = (64, 512, 512) if args.quick else (256, 1024, 1024)
    scales = tuple(int(s) for s in args.scales.split(",")) if args.scales else (1, 2) if args.quick else (1, 4)
    if 1 not in scales:
        parser.error("--scales must include 1: every row is compared with (a), which runs at 1×")
    torch.manual_seed(0)
    checkpoint = str(save_checkpoint(work / "bench_unet.safetensors", build_model(MODEL), MODEL, {"mode": "bench"}))
    plane_block = [CHUNK[0], base[1], base[2]]
    quarter_block = [CHUNK[0], base[1] // 2, base[2] // 2]
    rows = []
    for scale in scales:
        shape = (base[0] * scale, base[1], base[2])
        url = make_volume(work / f"volume_{'x'.join(map(str, shape))}.zarr", shape)
        plan = [("a", "model alone, windows in memory", {})] if scale == 1 else []
        plan += [("b", f"volseg disk→disk, float32, block {tuple(plane_block)}", {"block": plane_block}),
                 ("b", f"volseg disk→disk, uint8, block {tuple(plane_block)}",
                  {"block": plane_block, "dtype": "uint8"})]
        if scale == 1:
            plan += [("b", f"volseg disk→disk, float32, block {tuple(quarter_block)}", {"block": quarter_block})]
        plan += [("c", "MONAI sliding_window_inference (gaussian), in memory", {})]
        results: dict[str, list[dict]] = {label: [] for _, label, _ in plan}
        for repeat in range(args.repeats if scale == 1 else 1):
            for kind, label, extra in plan:
                kwargs = {"url": url, "checkpoint": checkpoint}
                if kind == "b":
                    dtype = extra.get("dtype", "float32")
                    kwargs |= {"out": str(work / f"out_{scale}x_{dtype}.zarr"), "block": json.dumps(extra["block"]),
                               "dtype": dtype}
                print(f"running {label} on {shape} (run {repeat + 1}) ...", file=sys.stderr, flush=True)
                results[label].append(run_child(kind, **kwargs))
        for kind, label, _ in plan:
            runs = [r for r in results[label] if "error" not in r] or results[label]
            best = min(runs, key=lambda r: r.get("seconds", float("inf")))
            rows.append((scale, shape, kind, label, {**best, "runs": len(results[label])}))

    reference = next(r[4] for r in rows if r[2] == "a")
    ref_speed = reference["voxels"] / reference["seconds"]
    print(f"\nmodel {MODEL.name} {dict(MODEL.options)}, window {WINDOW}, stride {STRIDE}, batch {BATCH}, "
          f"{torch.get_num_threads()} CPU threads; the fastest of {args.repeats} interleaved runs at 1×, one at 4×")
    header = (f"| {'volume':>16} | {'run':<58} | {'Mvoxels/s':>9} | {'× (a)':>6} | {'CPU s':>6} | "
              f"{'peak RSS MB':>11} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for _, shape, _, label, result in rows:
        name = "x".join(map(str, shape))
        if "error" in result:
            print(f"| {name:>16} | {label:<58} | {'—':>9} | {'—':>6} | {'—':>6} | {result['error'][:40]:>11} |")
            continue
        speed = result["voxels"] / result["seconds"]
        print(f"| {name:>16} | {label:<58} | {speed / 1e6:9.3f} | {speed / ref_speed:6.3f} | "
              f"{result['cpu']:6.0f} | {result['peak_rss_mb']:11.0f} |")


if __name__ == "__main__":
    main()
