"""The SAM-based methods next to Prompt-DAS on real EM: VNC (labelled source) → Lucchi (FIB-SEM target).

    uv run python bench/sam_methods.py --sam-checkpoint ~/weights/sam_vit_b_01ec64.pth   # data: ../shared/data
    uv run python bench/sam_methods.py                  # no SAM weights: says so, prints the plan, exits 0
    uv run python bench/sam_methods.py --smoke          # tiny random SAM and Prompt-DAS: checks the code runs

Prints Dice and IoU on every ``--eval-every``-th Lucchi slice (scored blockwise over volseg's global window
grid, the way `volseg run` segments) for:
  Prompt-DAS source-only          trained on VNC with bench/adaptation.py's CPU recipe (or --promptdas-source)
  Prompt-DAS + 15% points         the same model, the sparse points file as test-time prompts
  SAM zero-shot, 15% points       one object per point, union of SAM's masks
  SAM zero-shot, Prompt-DAS peaks Prompt-DAS's density peaks as SAM's point prompts (the chain)
  SAM prompt learning             head prompt + prefix tokens + adapters learned on VNC labels, no prompts
  All-in-SAM                      weak labels of Lucchi (15% points, or --weak boxes: those objects' boxes)
                                  → SAM pseudo-masks → adapters + decoder, no prompts
  DFG (source-free)               the source Prompt-DAS adapted with SAM pseudo-labels from box prompts
Lucchi's labels only score, except with ``--weak boxes`` (the extents of the 15% objects the points select).
No SAM weights can be downloaded by volseg: fetch the release file once and pass its path.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adaptation import SCALES, Row, data_dir, print_table
from adaptation import score as adaptation_score

from volseg.allocator import keep_freed_memory
from volseg.errors import ConfigError
from volseg.evaluation.metrics import Confusion
from volseg.geometry import Box, PointSet
from volseg.io import open_volume
from volseg.io.points import read_points
from volseg.models import ModelSpec, build_model, input_contract
from volseg.models.checkpoint import load_checkpoint, read_card
from volseg.models.sam.model import SamSegmenter, load_sam
from volseg.training.promptdas.pseudo_labels import density_peaks, nms_radius
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData, train_promptdas
from volseg.training.sam.all_in_sam import AllInSamSettings, all_in_sam
from volseg.training.sam.dfg import DfgSettings, dfg_adapt
from volseg.training.sam.dfg_boxes import BoxSearchSettings
from volseg.training.sam.prompt_learning import learn_sam_prompts
from volseg.training.sam.tuning import SamTuneSettings
from volseg.training.sam.weak_labels import instances_at_points, weak_labels_from_instances, weak_labels_from_points

#: Prompt-DAS as bench/adaptation.py trains it on a CPU (its source-only row is this baseline).
PROMPTDAS = ModelSpec("promptdas", options=SCALES["cpu"]["model"])
SMOKE_PROMPTDAS = ModelSpec("promptdas", options={"encoder": "vit_tiny8", "decoder_dim": 32, "decoder_heads": 2,
                                                   "decoder_mlp": 32, "projection_dim": 8})
ROWS = ["Prompt-DAS source-only", "Prompt-DAS + 15% points", "SAM zero-shot, 15% points",
        "SAM zero-shot, Prompt-DAS peaks", "SAM prompt learning", "All-in-SAM", "DFG (source-free)"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam-checkpoint", help="SAM's released weights (.pth), e.g. sam_vit_b_01ec64.pth")
    parser.add_argument("--variant", default="b", choices=["b", "l", "h"], help="the checkpoint's SAM variant")
    parser.add_argument("--promptdas-source", help="a source-trained Prompt-DAS checkpoint (default: train one on VNC)")
    parser.add_argument("--promptdas-steps", type=int, default=600, help="source training steps when training one")
    parser.add_argument("--steps", type=int, default=200, help="steps of each SAM method's training")
    parser.add_argument("--crop", type=int, default=256, help="training crop (y = x)")
    parser.add_argument("--window", type=int, default=512, help="scoring window (y = x); stride 3/4 of it")
    parser.add_argument("--eval-every", type=int, default=8, help="score every N-th Lucchi slice")
    parser.add_argument("--roi", type=int, default=0, help="score only the top-left N×N of each slice (0: all)")
    parser.add_argument("--max-slices", type=int, default=16, help="All-in-SAM: weakly labelled slices used")
    parser.add_argument("--weak", choices=["points", "boxes"], default="points", help="All-in-SAM's weak labels")
    parser.add_argument("--dfg-slices", type=int, default=16, help="DFG: target slices pseudo-labelled")
    parser.add_argument("--smoke", action="store_true", help="tiny random SAM and Prompt-DAS, a few steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def plan_lines(args: argparse.Namespace) -> list[str]:
    return [f"  {name}" for name in ROWS] + [
        f"  SAM {args.variant}, {args.steps} steps per method, crops {args.crop}², windows {args.window}², "
        f"every {args.eval_every}th Lucchi slice scored; All-in-SAM weak labels: {args.weak}"]


def score(model: torch.nn.Module, raw, labels, slices: list[int], window: int, roi: int,
          points: PointSet | None = None) -> Confusion:
    """:func:`adaptation.score` with windows of ``window`` (at most the slice) and stride 3/4 of it."""
    name = "sam" if isinstance(model, SamSegmenter) else "promptdas"
    window = min(window, *raw.shape[1:])
    return adaptation_score(model, raw, labels, slices, window, max(1, 3 * window // 4), points, roi, name,
                            batch_size=4)


@torch.no_grad()
def density_peak_prompts(model: torch.nn.Module, raw, slices: list[int], roi: int, sigma_vx: float) -> PointSet:
    """Prompt-DAS's density peaks (threshold 0.3) on the scored slices, as one global point set."""
    device = next(model.parameters()).device
    contract = input_contract(ModelSpec("promptdas"))
    stop_yx = tuple(min(roi, s) if roi else s for s in raw.shape[1:])
    found = []
    for z in slices:
        plane = raw.read(Box((z, 0, 0), (z + 1, *(s - s % 8 for s in stop_yx))))
        image = contract.normalize(torch.from_numpy(plane)).unsqueeze(1).to(device)
        peaks = density_peaks(model.eval()(image).density.cpu(), 0.3, nms_radius(sigma_vx))[0]
        found.append(np.column_stack([np.full(len(peaks), z), peaks]))
    return PointSet(np.concatenate(found).astype(np.float64).reshape(-1, 3))


def weak_slices(raw, labels, points: PointSet, excluded: set[int], how: str, limit: int, seed: int):
    """Up to ``limit`` Lucchi slices with points (not scored ones), their raw planes and weak labels."""
    z_of = np.rint(points.zyx[:, 0]).astype(int)
    zs = sorted(set(z_of.tolist()) - excluded)
    zs = sorted(np.random.default_rng(seed).choice(zs, min(limit, len(zs)), replace=False).tolist())
    planes = np.concatenate([raw.read(Box((z, 0, 0), (z + 1, *raw.shape[1:]))) for z in zs])
    weak = []
    for z in zs:
        yx = points.zyx[z_of == z, 1:]
        if how == "boxes":
            dense = labels.read(Box((z, 0, 0), (z + 1, *raw.shape[1:])))[0]
            weak.append(weak_labels_from_instances(instances_at_points(ndimage.label(dense > 0)[0], yx)))
        else:
            weak.append(weak_labels_from_points(yx))
    return zs, planes, weak


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root = data_dir()
    if not args.sam_checkpoint and not args.smoke:
        print("No SAM checkpoint given, so nothing was run. This benchmark needs SAM's released weights, which "
              "volseg never downloads: fetch sam_vit_b_01ec64.pth (or _l_/_h_) from the segment-anything release "
              "once and pass --sam-checkpoint PATH (and --variant l|h for those).")
        print(f"With one, it would score on {root / 'lucchi_train.zarr'} (source {root / 'vnc.zarr'}):")
        print("\n".join(plan_lines(args)))
        return 0
    if not (root / "vnc.zarr").exists() or not (root / "lucchi_train.zarr").exists():
        print(f"no data at {root}: set VOLSEG_DATA to the folder with vnc.zarr and lucchi_train.zarr; nothing run")
        return 0
    if args.smoke:  # the smallest run that still goes through every method
        args.steps, args.promptdas_steps, args.eval_every, args.roi, args.window = 2, 2, 82, 128, 128
        args.crop, args.max_slices, args.dfg_slices = 64, 2, 2
    keep_freed_memory()
    return run_benchmark(args, root)


def run_benchmark(args: argparse.Namespace, root: Path) -> int:
    device = torch.device(args.device)
    source = DomainData(open_volume(str(root / "vnc.zarr/raw")), open_volume(str(root / "vnc.zarr/mito")))
    raw = open_volume(str(root / "lucchi_train.zarr/raw"))
    labels = open_volume(str(root / "lucchi_train.zarr/mito"))
    points = read_points(root / "lucchi_train_points_15pct.csv", raw.voxel_size_nm, raw.voxel_offset, raw.bounds)
    slices = list(range(0, raw.shape[0], args.eval_every))
    sigma = 40.0 / raw.voxel_size_nm[2]
    crop = (1, args.crop, args.crop)
    tune = SamTuneSettings(steps=args.steps, batch_size=2, crop=crop, seed=args.seed)
    rows: list[Row] = []
    begin = time.perf_counter()

    def evaluate(name: str, model: torch.nn.Module, seconds: float, prompts: PointSet | None = None) -> None:
        rows.append(Row(name, score(model, raw, labels, slices, args.window, args.roi, prompts), seconds))
        print(f"{name}: Dice {rows[-1].score.dice:.3f} ({time.perf_counter() - begin:.0f} s so far)", flush=True)

    def fresh_sam(**options: object) -> SamSegmenter:
        variant = "tiny" if args.smoke else args.variant
        spec = ModelSpec("sam", options={"variant": variant, **options})
        torch.manual_seed(args.seed)
        model = build_model(spec) if args.smoke else load_sam(args.sam_checkpoint, spec)
        assert isinstance(model, SamSegmenter)
        return model.to(device)

    timed = time.perf_counter
    t = timed()
    promptdas_spec = SMOKE_PROMPTDAS if args.smoke else PROMPTDAS
    if args.promptdas_source:
        promptdas_spec = ModelSpec.from_json(read_card(args.promptdas_source)["model"])
        source_model = load_checkpoint(args.promptdas_source, promptdas_spec).to(device)
    else:
        torch.manual_seed(args.seed)
        source_model = build_model(promptdas_spec).to(device)
        source_crop = min(args.crop, SCALES["cpu"]["crop"])
        train_promptdas(source_model, AdaptSettings(
            mode="source", steps=args.promptdas_steps, batch_size=4, crop=(1, source_crop, source_crop),
            learning_rate=SCALES["cpu"]["source_lr"],
            density_sigma=sigma, source_density_sigma=40.0 / source.raw.voxel_size_nm[2], seed=args.seed),
            source=source)
    source_seconds = timed() - t
    source_state = {k: v.clone() for k, v in source_model.state_dict().items()}
    evaluate(ROWS[0], source_model, source_seconds)
    evaluate(ROWS[1], source_model, source_seconds, points)

    sam = fresh_sam()
    evaluate(ROWS[2], sam, 0.0, points)
    evaluate(ROWS[3], sam, source_seconds, density_peak_prompts(source_model, raw, slices, args.roi, sigma))

    t = timed()
    prompted = fresh_sam(head_prompt=True, prefix_tokens=8, adapter_dim=16)
    learn_sam_prompts(prompted, source, tune)
    evaluate(ROWS[4], prompted, timed() - t)

    t = timed()
    adapted_sam = fresh_sam(adapter_dim=16)
    _, planes, weak = weak_slices(raw, labels, points, set(slices), args.weak, args.max_slices, args.seed)
    settings = AllInSamSettings(prompt=args.weak, tune=replace(tune, train_decoder=True))
    try:
        _, pseudo = all_in_sam(adapted_sam, planes, weak, settings)
        evaluate(f"{ROWS[5]} ({pseudo.kept}/{pseudo.prompted} objects)", adapted_sam, timed() - t)
    except ConfigError as error:
        print(f"{ROWS[5]}: not scored: {error}", flush=True)

    t = timed()
    target_model = build_model(promptdas_spec).to(device)
    target_model.load_state_dict(source_state)
    dfg = DfgSettings(slices=args.dfg_slices, crop_yx=(args.crop, args.crop), search=BoxSearchSettings(),
                      seed=args.seed)
    small = min(128, args.crop)
    adapt = AdaptSettings(mode="uda", steps=args.steps, batch_size=4, crop=(1, small, small), density_sigma=sigma,
                          seed=args.seed)
    try:
        result, found = dfg_adapt(target_model, sam, raw, dfg, adapt)
        evaluate(f"{ROWS[6]} ({found.kept}/{found.tried} boxes)", result.model, source_seconds + timed() - t)
    except ConfigError as error:
        print(f"{ROWS[6]}: not scored: {error}", flush=True)

    total = time.perf_counter() - begin
    what = "SMOKE: random tiny SAM and Prompt-DAS, numbers mean nothing" if args.smoke else \
        f"SAM {args.variant} from {args.sam_checkpoint}"
    print(f"\nVNC → Lucchi; {what}; Prompt-DAS {dict(promptdas_spec.options)}; scored on {len(slices)} of "
          f"{raw.shape[0]} slices{f' (top-left {args.roi}²)' if args.roi else ''}; device {device}; "
          f"{total / 60:.1f} min")
    print_table(rows, "method")
    return 0


if __name__ == "__main__":
    sys.exit(main())
