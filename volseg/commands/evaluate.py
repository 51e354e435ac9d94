"""`volseg eval`: score a run's outputs against labels (see :mod:`volseg.evaluation.streaming`).

What is scored comes from the config: ``eval.prediction`` (default ``output.probabilities``) and/or
``eval.instances`` (an instance output, scored against instance labels with the MitoEM AP-75), against
``eval.labels``; the JSON report goes to ``eval.report`` (default beside the prediction), never over a
file that is not an earlier report, nor over an input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from volseg.errors import ConfigError, OutputExistsError
from volseg.evaluation.report import EvalReport, default_report_path, is_report
from volseg.evaluation.streaming import EvalInputs, score_volumes
from volseg.io.guard import PathRef, check_outputs

if TYPE_CHECKING:  # volseg.config imports torch (via the model registry); Ray workers need neither
    from volseg.config import Config, VolumeRef


def eval_paths(config: Config) -> tuple[list[PathRef], PathRef]:
    """What `volseg eval` reads (prediction, labels) and the report it writes."""
    assert config.eval is not None
    prediction, instances = prediction_ref(config), config.eval.instances
    inputs = [PathRef("eval.labels.url", config.eval.labels.url)]
    if prediction is not None:
        inputs.append(PathRef("eval.prediction.url" if config.eval.prediction else "output.probabilities",
                              prediction.url))
    if instances is not None:
        inputs.append(PathRef("eval.instances.url", instances.url))
    scored = prediction if prediction is not None else instances
    assert scored is not None
    report = config.eval.report or str(default_report_path(scored.url))
    return inputs, PathRef("eval.report", report, "file")


def check_report_path(report: PathRef, inputs: list[PathRef]) -> None:
    """The report may not touch an input, must be writable, and replaces only an earlier volseg report."""
    check_outputs(inputs, [report])
    path = Path(report.url)
    if path.exists() and not is_report(path):
        raise OutputExistsError(f"{report.field} {report.url!r} exists and is not a volseg eval report; volseg never "
                                "replaces it.", f"choose another path for {report.field}.")


def prediction_ref(config: Config) -> VolumeRef | None:
    """The probabilities to score: ``eval.prediction``, else ``output.probabilities``, else none when
    ``eval.instances`` is scored alone."""
    from volseg.config import VolumeRef

    assert config.eval is not None
    if config.eval.prediction is not None:
        return config.eval.prediction
    if config.output is not None:
        return VolumeRef(url=config.output.probabilities)
    if config.eval.instances is not None:
        return None
    raise ConfigError(
        f"{config.source_path or 'the config'}: `volseg eval` needs something to score, and there is "
        "neither eval.prediction, nor output.probabilities, nor eval.instances.",
        "add `prediction: {url: ...}` (probabilities) or `instances: {url: ...}` under `eval:`.",
    )




def open_inputs(config: Config) -> EvalInputs:
    """The volumes to score, opened read-only and checked against the labels' shape."""
    assert config.eval is not None
    spec = config.eval
    prediction = prediction_ref(config)
    return EvalInputs(spec.labels.open(), None if prediction is None else prediction.open(),
                      None if spec.instances is None else spec.instances.open(), spec.threshold, spec.min_size_vx)


def evaluate(config: Config, progress: bool = True) -> EvalReport:
    """Score ``config.eval``'s prediction and/or instance output against its labels and write the JSON
    report. Raises :class:`ConfigError` without an ``eval`` section or anything to score,
    :class:`VolumeFormatError` if the shapes differ, a volume has several channels or a slice is larger
    than :data:`~volseg.evaluation.streaming.MAX_SLICE_VX`.
    """
    from tqdm.auto import tqdm

    config.require("eval", command="eval")
    inputs, report_ref = eval_paths(config)
    check_report_path(report_ref, inputs)
    volumes = open_inputs(config)
    with tqdm(total=volumes.semantic.shape[0], unit="slice", desc="evaluating", disable=not progress,
              dynamic_ncols=True) as bar:
        report = score_volumes(volumes, report_ref.url, bar.update)
    report.write(Path(report_ref.url))
    return report

