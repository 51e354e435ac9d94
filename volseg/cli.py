"""The command line: `volseg run | validate | train | adapt | sam-adapt | peaks | eval | view | demo`.

Every user error (a :class:`~volseg.errors.VolsegError`) is printed as one line on stderr and exits
with code 2; nothing else is caught, so a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from volseg.allocator import keep_freed_memory
from volseg.errors import USER_ERROR_EXIT_CODE, VolsegError

DEMO_CONFIG = "configs/demo.yaml"
#: Exit code of a run whose blocks did not all succeed (the rest are written; a rerun resumes).
BLOCKS_FAILED_EXIT_CODE = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="segment a volume blockwise as the config says")
    run.add_argument("config", help="YAML run config")
    run.add_argument("--overwrite", action="store_true",
                     help="write into outputs left by a different run (their data is replaced)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--points", metavar="FILE",
                     help="point prompts (CSV z,y,x or Neuroglancer annotation JSON); overrides prompts.points")

    validate = commands.add_parser("validate", help="check a config, its volumes and model; write nothing")
    validate.add_argument("config")

    train = commands.add_parser("train", help="train a model on a labelled volume (config: train:)")
    train.add_argument("config")
    train.add_argument("--no-progress", action="store_true")

    adapt = commands.add_parser("adapt", help="adapt a source-trained model to a target volume (config: adapt:)")
    adapt.add_argument("config")
    adapt.add_argument("--no-progress", action="store_true")

    sam_adapt = commands.add_parser("sam-adapt", help="SAM prompt learning, All-in-SAM or DFG (config: sam_adapt:)")
    sam_adapt.add_argument("config")
    sam_adapt.add_argument("--no-progress", action="store_true")

    peaks = commands.add_parser("peaks", help="write the density peaks of a run's output as a points CSV")
    peaks.add_argument("config")
    peaks.add_argument("--out", required=True, metavar="CSV", help="where the points (z,y,x) go")

    evaluate = commands.add_parser("eval", help="score a prediction against labels (config: eval:)")
    evaluate.add_argument("config")
    evaluate.add_argument("--no-progress", action="store_true")

    view = commands.add_parser("view", help="serve a run's local volumes and print a Neuroglancer link")
    view.add_argument("config")
    view.add_argument("--port", type=int, default=9015, help="HTTP port on 127.0.0.1 (default 9015)")

    demo = commands.add_parser("demo", help="generate data, train, segment and score, end to end")
    demo.add_argument("config", nargs="?", default=DEMO_CONFIG, help=f"default: {DEMO_CONFIG}")
    demo.add_argument("--no-progress", action="store_true")
    return parser


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _run(args: argparse.Namespace) -> int:
    from volseg.commands.run import run
    from volseg.config import PromptsConfig, load_config

    config = load_config(args.config)
    if args.points:
        config = config.model_copy(update={"prompts": PromptsConfig(points=args.points)})
    result = run(config, overwrite=args.overwrite, progress=not args.no_progress)
    _print(result.summary_lines())
    if result.failed:
        print(f"volseg run: error: {result.failure_message()}", file=sys.stderr)
        return BLOCKS_FAILED_EXIT_CODE
    return 0


def _validate(args: argparse.Namespace) -> int:
    from volseg.config import load_config
    from volseg.inference.segment import plan_segmentation

    config = load_config(args.config)
    lines = [f"{args.config}: the config is valid"]
    if config.input is not None and config.output is not None:
        plan = plan_segmentation(config)
        lines += [
            f"input {config.input.url}: shape {plan.source.shape}, {plan.source.dtype}, "
            f"voxel size {plan.source.voxel_size_nm} nm",
            f"{plan.grid.num_blocks} blocks of core {plan.grid.core_shape} over roi {plan.grid.roi}; "
            f"output chunks {plan.chunk}",
            f"model {config.model.name} from {config.model.checkpoint}",
        ]
    _print(lines)
    return 0


def _train(args: argparse.Namespace) -> int:
    from volseg.commands.train import train
    from volseg.config import load_config

    _print(_trained_lines(train(load_config(args.config), progress=not args.no_progress)))
    return 0


def _trained_lines(result: Any) -> list[str]:
    """Summary of a `train` or `adapt` result: checkpoint, steps, time, final loss, curve."""
    history = result.history
    return [f"checkpoint {result.checkpoint} ({len(history.losses)} steps, {history.seconds:.1f} s, "
            f"final loss {history.losses[-1]:.4f})", f"loss curve {result.curve}"]


def _demo(args: argparse.Namespace) -> int:
    from volseg.commands.demo import demo
    from volseg.config import load_config

    result = demo(load_config(args.config), progress=not args.no_progress)
    before, after = result.before.score, result.after.score
    lines = ["", "volseg demo summary (Prompt-DAS, source domain tem → target domain fibsem)",
             *result.after.run.summary_lines(),
             "held-out target Dice / IoU against the synthetic labels:",
             f"  source-only model       Dice {before.dice:.3f}  IoU {before.iou:.3f}",
             f"  adapted ({result.mode:<14}) Dice {after.dice:.3f}  IoU {after.iou:.3f}",
             f"montage (raw | source-only | adapted | labels): {result.montage}",
             f"total {result.seconds:.1f} s" + (f" (trained: {', '.join(result.trained)})" if result.trained else "")]
    _print(lines)
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from volseg.commands.adapt import adapt
    from volseg.config import load_config

    _print(_trained_lines(adapt(load_config(args.config), progress=not args.no_progress)))
    return 0


def _sam_adapt(args: argparse.Namespace) -> int:
    from volseg.commands.sam_adapt import sam_adapt
    from volseg.config import load_config

    result = sam_adapt(load_config(args.config), progress=not args.no_progress)
    _print([*_trained_lines(result.trained), *result.lines])
    return 0


def _peaks(args: argparse.Namespace) -> int:
    from volseg.commands.peaks import export_peaks
    from volseg.config import load_config

    points = export_peaks(load_config(args.config), args.out)
    print(f"{len(points)} density peaks written to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from volseg.commands.evaluate import evaluate
    from volseg.config import load_config

    report = evaluate(load_config(args.config), progress=not args.no_progress)
    _print(report.table_lines())
    return 0


def _view(args: argparse.Namespace) -> int:
    from volseg.commands.view import layer_urls, link, make_server, neuroglancer_state, served_root
    from volseg.config import load_config

    config = load_config(args.config)
    state = neuroglancer_state(config, port=args.port)
    if not state["layers"]:
        from volseg.errors import VolumeNotFoundError

        raise VolumeNotFoundError(f"{args.config}: none of its volumes exists yet.", f"run `volseg run {args.config}`.")
    root = served_root([url for _, _, url in layer_urls(config)])
    print(f"Neuroglancer: {link(state)}")
    if root is None:
        return 0
    server = make_server(root, args.port)
    print(f"serving {root} on http://127.0.0.1:{args.port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


COMMANDS = {"run": _run, "validate": _validate, "train": _train, "adapt": _adapt, "eval": _eval, "demo": _demo,
            "view": _view, "sam-adapt": _sam_adapt, "peaks": _peaks}


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before any I/O thread starts (see volseg.allocator)
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VolsegError as error:
        print(f"volseg {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
