"""`volseg validate CONFIG`: check everything each section of a config needs, writing nothing.

Every section present is checked as its command would check it before starting work: ``input`` +
``output`` as `volseg run` (volumes, model, grid, prompts, outputs), ``train``, ``adapt`` and
``sam_adapt`` (volumes opened, starting checkpoints loaded, the output checkpoint checked), ``eval``
(prediction and labels opened and compared, the report path checked). The first problem raises the
same error the command would; otherwise one line per section says what was checked.
"""

from __future__ import annotations

from pathlib import Path

from volseg.config import Config
from volseg.errors import CheckpointError


def validate(config: Config, overwrite: bool = False) -> list[str]:
    """Check every section of ``config`` (as its command would with ``overwrite``); summary lines."""
    lines = [f"{config.source_path or 'config'}: the config is valid"]
    if config.synthetic and not _synthetic_ready(config):
        return [*lines, "its synthetic volumes are not generated yet: `volseg demo` generates them, then the "
                "sections that read them can be checked"]
    if config.input is not None and config.output is not None:
        lines += _run_lines(config, overwrite)
    if config.train is not None:
        lines.append(_train_line(config, overwrite))
    if config.adapt is not None:
        lines.append(_adapt_line(config, overwrite))
    if config.sam_adapt is not None:
        lines.append(_sam_adapt_line(config, overwrite))
    if config.eval is not None and (config.eval.prediction is not None or config.output is not None):
        lines.append(_eval_line(config))
    return lines


def _synthetic_ready(config: Config) -> bool:
    from volseg.commands.demo import already_generated

    return all(already_generated(cfg) for cfg in config.synthetic or [])


def _run_lines(config: Config, overwrite: bool) -> list[str]:
    from volseg.inference.segment import plan_segmentation

    plan = plan_segmentation(config, overwrite)
    assert config.input is not None
    return [f"input {config.input.url}: shape {plan.source.shape}, {plan.source.dtype}, "
            f"voxel size {plan.source.voxel_size_nm} nm",
            f"{plan.grid.num_blocks} blocks of core {plan.grid.core_shape} over roi {plan.grid.roi}; "
            f"output chunks {plan.chunk}",
            f"model {config.model.name} from {config.model.checkpoint}"]


def _train_line(config: Config, overwrite: bool) -> str:
    from volseg.commands.train import check_training_outputs, open_labelled, train_inputs
    from volseg.models import build_model, input_contract

    cfg = config.train
    assert cfg is not None
    check_training_outputs(config, train_inputs(config), "train.checkpoint", cfg.checkpoint, overwrite)
    raw, _ = open_labelled(cfg.raw, cfg.labels, "train")
    input_contract(config.model.spec).check_window(cfg.crop)
    build_model(config.model.spec)
    return f"train: {cfg.raw.url} {raw.shape} with labels {cfg.labels.url} → {cfg.checkpoint}"


def _adapt_line(config: Config, overwrite: bool) -> str:
    from volseg.commands.adapt import adapt_inputs, adapt_paths
    from volseg.commands.train import check_training_outputs

    cfg = config.adapt
    assert cfg is not None
    check_training_outputs(config, adapt_paths(config), "adapt.checkpoint", cfg.checkpoint, overwrite)
    inputs = adapt_inputs(config)
    assert inputs.target is not None
    points = "" if inputs.target.points is None else f", {len(inputs.target.points)} points"
    return f"adapt ({cfg.mode}): target {cfg.target.raw.url} {inputs.target.raw.shape}{points} → {cfg.checkpoint}"


def _sam_adapt_line(config: Config, overwrite: bool) -> str:
    from volseg.commands.sam_adapt import sam_adapt_paths
    from volseg.commands.train import check_training_outputs
    from volseg.models.checkpoint import load_checkpoint

    cfg = config.sam_adapt
    assert cfg is not None
    check_training_outputs(config, sam_adapt_paths(config), "sam_adapt.checkpoint", cfg.checkpoint, overwrite)
    labelled = (cfg.labelled.raw, cfg.labelled.labels) if cfg.labelled is not None else ()
    target = (cfg.target.raw, cfg.target.labels) if cfg.target is not None else ()
    for ref in (cfg.sparse_labels, *labelled, *target):
        if ref is not None:
            ref.open()
    if cfg.init is not None:
        load_checkpoint(cfg.init, config.model.spec, "sam_adapt.init")
    if cfg.sam_checkpoint is not None and not Path(cfg.sam_checkpoint).is_file():
        raise CheckpointError(f"sam_adapt.sam_checkpoint {cfg.sam_checkpoint!r} does not exist.",
                              "give the path of SAM's released .pth weights (e.g. sam_vit_b_01ec64.pth).")
    return f"sam-adapt ({cfg.method}) → {cfg.checkpoint}"


def _eval_line(config: Config) -> str:
    from volseg.commands.evaluate import check_report_path, eval_paths, prediction_ref
    from volseg.evaluation.streaming import check_pair

    assert config.eval is not None
    inputs, report = eval_paths(config)
    check_report_path(report, inputs)
    labels = config.eval.labels.open()
    instances = config.eval.instances
    own_instances = instances is not None and config.instances is not None and instances.url == config.instances.url
    scored = [(config.eval.prediction is not None, prediction_ref(config)), (not own_instances, instances)]
    lines = []
    for given, ref in scored:
        if ref is None:
            continue
        if not given and not volume_exists(ref.url):  # the run's own output, not written yet
            lines.append(f"{ref.url} (written by `volseg run`)")
            continue
        volume = ref.open()
        check_pair(volume, labels)
        lines.append(f"{volume.url} {volume.shape}")
    return f"eval: {' and '.join(lines)} against {labels.url} {labels.shape} → report {report.url}"


def volume_exists(url: str) -> bool:
    """Whether a volume's metadata exists at ``url`` (storage that cannot be read raises)."""
    from volseg.io.formats import probe_format
    from volseg.io.urls import parse_url

    return probe_format(parse_url(url)) is not None
