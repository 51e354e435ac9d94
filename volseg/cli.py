"""The command line: `volseg run | validate | train | adapt | sam-adapt | peaks | eval | view | convert | demo`.

Every user error (a :class:`~volseg.errors.VolsegError`, or a malformed command line) is printed as
one line on stderr and exits with code 2; Ctrl-C prints one line saying what was kept and exits with
130. Nothing else is caught, so a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from volseg.allocator import keep_freed_memory
from volseg.errors import USER_ERROR_EXIT_CODE, ConfigError, VolsegError

DEMO_CONFIG = "configs/demo.yaml"
#: Exit code of a run whose blocks did not all succeed (the rest are written; a rerun resumes).
BLOCKS_FAILED_EXIT_CODE = 1
#: Exit code after Ctrl-C (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT_CODE = 130
#: What Ctrl-C leaves behind, by command.
INTERRUPTED = {
    "run": "blocks already written are marked done; run the same command again to resume",
    "train": "no checkpoint was written (with cluster.workers > 1, running it again resumes from the last one)",
    "adapt": "no checkpoint was written (with cluster.workers > 1, running it again resumes from the last one)",
    "sam-adapt": "no checkpoint was written",
    "demo": "run it again: it reuses what is finished",
}


class _Parser(argparse.ArgumentParser):
    """A parser whose errors are one line (``volseg run: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_EXIT_CODE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port between 1 and 65535")
    return port


NO_PROGRESS = "no progress bars: plain log lines instead"


def _config(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("config", help=what)
    _set(parser)


def _set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", dest="overrides",
                        help="override one config value (YAML), validated like the file's; repeatable, e.g. "
                             "--set adapt.steps=100 --set inference.window=[1,256,256]")


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress`` or ``-q`` (without a terminal, plain lines instead)."""
    return not args.no_progress and args.verbose >= args.quiet


def _load(args: argparse.Namespace) -> Any:
    from volseg.config import load_config
    from volseg.io.guard import check_job_paths

    config = load_config(args.config, args.overrides)
    check_job_paths(config.written_paths())  # inside `ray job submit --working-dir`: no relative outputs
    return config


def _overwrite(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--overwrite", action="store_true", help=what)


def _verbosity(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="more log lines (-vv: debug); also shows the Ray workers' output")
    parser.add_argument("-q", "--quiet", action="count", default=default,
                        help="only warnings and errors (no progress lines)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="volseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"volseg {_version()}")
    _verbosity(parser, 0)
    common = argparse.ArgumentParser(add_help=False)
    _verbosity(common, argparse.SUPPRESS)  # after the verb too, without resetting what came before it
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=lambda **kw: _Parser(parents=[common], **kw))

    run = commands.add_parser("run", help="segment a volume blockwise as the config says")
    _config(run, "YAML config with input:, model:, output: (and inference:, execution:, prompts:)")
    _overwrite(run, "replace outputs that a different volseg run wrote (never data volseg did not write)")
    run.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    run.add_argument("--points", metavar="FILE",
                     help="point prompts (CSV z,y,x or Neuroglancer annotation JSON); overrides prompts.points")
    run.add_argument("--confirm-nm", type=float, metavar="NM",
                     help="remove the 2D components that no point prompt of a slice within NM (in z) confirms; "
                          "overrides prompts.confirm_nm")

    validate = commands.add_parser("validate", help="check a config, its volumes and model; write nothing")
    _config(validate, "YAML config to check (any verb's)")
    _overwrite(validate, "check as the command would run with --overwrite")

    checkpoint_help = "replace an existing checkpoint (only one volseg wrote)"
    train = commands.add_parser("train", help="train a model on a labelled volume (config: train:)")
    _config(train, "YAML config with train: and model:")
    train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    _overwrite(train, checkpoint_help)

    adapt = commands.add_parser("adapt", help="adapt a source-trained model to a target volume (config: adapt:)")
    _config(adapt, "YAML config with adapt: and model:")
    adapt.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    _overwrite(adapt, checkpoint_help)

    sam_adapt = commands.add_parser("sam-adapt", help="SAM prompt learning, All-in-SAM or DFG (config: sam_adapt:)")
    _config(sam_adapt, "YAML config with sam_adapt: and model:")
    sam_adapt.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    _overwrite(sam_adapt, checkpoint_help)

    peaks = commands.add_parser("peaks", help="write the density peaks of a run's output as a points CSV")
    _config(peaks, "YAML run config whose output.density was written")
    peaks.add_argument("--out", required=True, metavar="CSV", help="where the points (z,y,x) go (a new file)")

    evaluate = commands.add_parser("eval", help="score a prediction and/or an instance output against labels "
                                                "(config: eval:)")
    _config(evaluate, "YAML config with eval: (prediction defaults to output.probabilities; eval.instances adds "
                      "the MitoEM AP-75 of an instance output)")
    evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    view = commands.add_parser("view", help="serve a run's local volumes and print a Neuroglancer link")
    _config(view, "YAML config whose input and outputs to show")
    view.add_argument("--port", type=_port, default=9015, help="HTTP port (default 9015)")
    view.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only)")
    view.add_argument("--neuroglancer", default=None, metavar="URL",
                      help="the Neuroglancer client to link to and allow (CORS); default the public demo client; "
                           "`bundled`: serve the client of the installed neuroglancer package from this server "
                           "(the link then needs no internet)")

    convert = commands.add_parser("convert", help="write an image stack (one PNG/TIFF per slice) into a new volume")
    convert.add_argument("slices", metavar="SLICES",
                         help="the slices: a quoted glob (e.g. 'MitoEM-R/im/*.png') or their folder; sorted by the "
                              "numbers in their names")
    convert.add_argument("out", metavar="OUT", help="the new volume's URL (zarr / OME-Zarr, .n5, precomputed://; "
                                                   "never an existing one)")
    convert.add_argument("--voxel-size-nm", type=float, nargs=3, required=True, metavar=("Z", "Y", "X"),
                         help="voxel size in nanometres, z y x (MitoEM: 30 8 8)")
    convert.add_argument("--chunk", type=int, nargs=3, metavar=("Z", "Y", "X"),
                         help="storage chunk shape, z y x (default: chosen from the shape and dtype)")
    convert.add_argument("--labels", action="store_true",
                         help="the slices hold label ids (a precomputed output becomes a segmentation)")
    convert.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    demo = commands.add_parser("demo", help="generate data, train, segment and score, end to end")
    demo.add_argument("config", nargs="?", default=DEMO_CONFIG, help=f"YAML demo config (default: {DEMO_CONFIG})")
    _set(demo)
    demo.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("volseg")
    except PackageNotFoundError:  # a source tree that was not installed
        return "unknown (not installed)"


def configure_logging(verbosity: int) -> None:
    """volseg's log lines on stderr: progress and INFO by default, DEBUG with ``-vv``, warnings only with
    ``-q``; ``-v`` also shows the Ray workers' output on the driver."""
    from volseg.engine import cluster

    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity < 2 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s" if verbosity < 2 else
                                           "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("volseg")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    cluster.worker_logs = verbosity > 0
    cluster.ray_log_level = logging.WARNING if verbosity < 0 else logging.INFO


def _print(lines: Sequence[str]) -> None:
    for line in lines:
        print(line)


def _run(args: argparse.Namespace) -> int:
    from volseg.commands.run import run
    from volseg.config import PromptsConfig

    config = _load(args)
    prompts = config.prompts
    if args.points:  # the file replaces the config's points or detection; its confirm_nm is kept
        prompts = PromptsConfig(points=args.points, confirm_nm=prompts.confirm_nm if prompts else 0.0)
    if args.confirm_nm is not None:
        if prompts is None:
            raise ConfigError("--confirm-nm confirms components by point prompts, and this run has none.",
                              "give --points FILE (or prompts.points in the config).")
        if args.confirm_nm < 0:
            raise ConfigError(f"--confirm-nm {args.confirm_nm:g} is negative.",
                              "give a distance in nm (0: off).")
        prompts = prompts.model_copy(update={"confirm_nm": args.confirm_nm})
    config = config.model_copy(update={"prompts": prompts})
    result = run(config, overwrite=args.overwrite, progress=_progress(args))
    _print(result.summary_lines())
    if result.failed:
        print(f"volseg run: error: {result.failure_message()}", file=sys.stderr)
        return BLOCKS_FAILED_EXIT_CODE
    return 0


def _validate(args: argparse.Namespace) -> int:
    from volseg.commands.validate import validate

    _print(validate(_load(args), overwrite=args.overwrite))
    return 0


def _train(args: argparse.Namespace) -> int:
    from volseg.commands.train import train

    _print(_trained_lines(train(_load(args), progress=_progress(args), overwrite=args.overwrite)))
    return 0


def _trained_lines(result: Any) -> list[str]:
    """Summary of a `train` or `adapt` result: checkpoint, steps, time, final loss, curve."""
    history = result.history
    lines = [f"checkpoint {result.checkpoint} ({len(history.losses)} steps, {history.seconds:.1f} s, "
             f"final loss {history.losses[-1]:.4f})", f"loss curve {result.curve}"]
    guard = history.guard or {}
    if guard.get("stopped_at") is not None:
        lines.append(f"adaptation stopped at step {guard['stopped_at']}: {guard['reason']}; kept the teacher of "
                     f"step {guard['kept_step']} (the last healthy check)")
    return lines


def _demo(args: argparse.Namespace) -> int:
    from volseg.commands.demo import demo

    result = demo(_load(args), progress=_progress(args))
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

    _print(_trained_lines(adapt(_load(args), progress=_progress(args), overwrite=args.overwrite)))
    return 0


def _sam_adapt(args: argparse.Namespace) -> int:
    from volseg.commands.sam_adapt import sam_adapt

    result = sam_adapt(_load(args), progress=_progress(args), overwrite=args.overwrite)
    _print([*_trained_lines(result.trained), *result.lines])
    return 0


def _peaks(args: argparse.Namespace) -> int:
    from volseg.commands.peaks import export_peaks

    points = export_peaks(_load(args), args.out)
    print(f"{len(points)} density peaks written to {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from volseg.commands.evaluate import evaluate

    report = evaluate(_load(args), progress=_progress(args))
    _print(report.table_lines())
    return 0


def _convert(args: argparse.Namespace) -> int:
    from volseg.commands.convert import convert

    stack, volume = convert(args.slices, args.out, args.voxel_size_nm, args.chunk, args.labels, _progress(args))
    _print([f"{len(stack.files)} slices ({stack.files[0]} … {stack.files[-1]}) → {volume.url}: shape (z, y, x) "
            f"{volume.shape}, {volume.dtype}, voxel size {volume.voxel_size_nm} nm, chunks {volume.chunk_shape}"])
    return 0


def _view(args: argparse.Namespace) -> int:
    from volseg.commands.view import NEUROGLANCER, open_viewer

    viewer = open_viewer(_load(args), args.port, host=args.host,
                         neuroglancer=args.neuroglancer or NEUROGLANCER)
    _print(viewer.lines())
    sys.stdout.flush()
    viewer.serve_forever()
    return 0


COMMANDS = {"run": _run, "validate": _validate, "train": _train, "adapt": _adapt, "eval": _eval, "demo": _demo,
            "view": _view, "sam-adapt": _sam_adapt, "peaks": _peaks, "convert": _convert}


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # before any I/O thread starts (see volseg.allocator)
    args = _parser().parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    from volseg.io import storage

    storage.drop_native_logs = True  # a storage failure is one volseg line, not tensorstore's log too
    try:
        return COMMANDS[args.command](args)
    except VolsegError as error:
        print(f"volseg {args.command}: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        kept = INTERRUPTED.get(args.command, "nothing was changed")
        print(f"\nvolseg {args.command}: interrupted (Ctrl-C); {kept}.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
