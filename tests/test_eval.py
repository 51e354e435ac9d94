"""`volseg eval`: known per-slice scores, the JSON report, streaming == whole arrays, Ray == threads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_config
from volseg.cli import main
from volseg.commands.evaluate import evaluate
from volseg.config import parse_config
from volseg.errors import VolumeFormatError
from volseg.evaluation import streaming as evaluate_module
from volseg.evaluation.metrics import (
    Confusion,
    aggregated_jaccard,
    average_precision,
    connected_instances,
    panoptic_quality,
)
from volseg.evaluation.report import EvalReport, default_report_path
from volseg.evaluation.streaming import slice_instances, volume_as_dask
from volseg.io import create_volume, open_volume

SHAPE = (5, 40, 36)          # no chunk shape below divides it
A = (slice(4, 12), slice(4, 12))            # 8×8 = 64 voxels
A_SHIFTED = (slice(4, 12), slice(6, 14))    # A moved 2 voxels in x: ∩ 48, ∪ 80
B = (slice(20, 30), slice(20, 30))          # 10×10 = 100
C = (slice(32, 36), slice(2, 6))            # 4×4 = 16, nowhere in the labels


def known_volumes() -> tuple[np.ndarray, np.ndarray]:
    """Labels A, B in slices 0, 1, 3, 4; prediction: z0 exact, z1 A shifted, z2 both empty,
    z3 nothing predicted, z4 an extra object C."""
    labels = np.zeros(SHAPE, np.uint8)
    for z in (0, 1, 3, 4):
        labels[(z, *A)] = labels[(z, *B)] = 1
    foreground = np.zeros(SHAPE, bool)
    foreground[(0, *A)] = foreground[(0, *B)] = True
    foreground[(1, *A_SHIFTED)] = foreground[(1, *B)] = True
    foreground[(4, *A)] = foreground[(4, *B)] = foreground[(4, *C)] = True
    return foreground, labels


# (Dice, IoU, AJI, PQ) by hand, per slice
EXPECTED = [
    (1.0, 1.0, 1.0, 1.0),
    (296 / 328, 148 / 180, 148 / 180, 0.8),    # TP 148, FP 16, FN 16; PQ: IoUs 0.6 and 1 → SQ 0.8, RQ 1
    (1.0, 1.0, 1.0, 1.0),                      # empty in both
    (0.0, 0.0, 0.0, 0.0),
    (328 / 344, 164 / 180, 164 / 180, 0.8),    # FP 16 (C); PQ: SQ 1, RQ 2 / 2.5
]


def write(url: str, array: np.ndarray, chunk: tuple[int, int, int]) -> str:
    vol = create_volume(url, shape=array.shape, dtype=array.dtype, voxel_size_nm=(40, 4, 4), chunk_shape=chunk)
    vol.write(vol.bounds, array)
    return url


def eval_config(prediction: str, labels: str, **fields) -> object:
    return parse_config({"eval": {"labels": {"url": labels}, "prediction": {"url": prediction}, **fields}})


@pytest.fixture
def known(tmp_path) -> tuple[str, str]:
    foreground, labels = known_volumes()
    probabilities = np.where(foreground, 0.9, 0.1).astype(np.float32)
    probabilities[2, 0, :] = 0.5                              # not above the threshold
    return (write(f"{tmp_path}/vols.zarr/prob", probabilities, (2, 16, 16)),
            write(f"{tmp_path}/vols.zarr/labels", labels, (3, 16, 8)))


def values(report: EvalReport) -> list[tuple[float, ...]]:
    return [tuple(s.values[n] for n in ("dice", "iou", "aji", "pq")) for s in report.slices]


def test_known_scores_and_report(known, tmp_path):
    prediction, labels = known
    report = evaluate(eval_config(prediction, labels), progress=False)
    assert values(report) == [pytest.approx(row) for row in EXPECTED]
    assert [s.empty for s in report.slices] == [False, False, True, False, False]
    scored = [EXPECTED[z] for z in (0, 1, 3, 4)]              # slice 2 is left out of the means
    mean = report.mean
    for i, name in enumerate(("dice", "iou", "aji", "pq")):
        assert mean[name] == pytest.approx(np.mean([row[i] for row in scored]))
    assert report.volume == Confusion(476, 32, 180, int(np.prod(SHAPE)) - 476 - 32 - 180)
    # 3D: 4 true instances (A, B in z0-1 and z3-4); predicted: A∪A_shifted (IoU 112/144 ≥ 0.75) and B
    # in z0-1 match, z4's A, B (IoU 0.5) and C do not. By size: [TP, TP, FP, FP, FP] → AP 51/101.
    assert report.ap75 is not None and report.ap75.ap == pytest.approx(51 / 101)
    assert (report.ap75.tp, report.ap75.fp, report.ap75.fn) == (2, 3, 2)
    assert report.scheduler == "dask threads"

    saved = json.loads((tmp_path / "vols_prob_eval.json").read_text())    # default: beside the container
    assert report.report_path == str(tmp_path / "vols_prob_eval.json")
    assert saved["prediction"] == prediction and saved["labels"] == labels
    assert saved["threshold"] == 0.5 and saved["foreground_above"] == 0.5 and saved["min_size_vx"] == 0
    assert saved["scheduler"] == "dask threads" and saved["shape_zyx"] == list(SHAPE)
    assert saved["mean"]["slices"] == 4 and saved["mean"]["pq"] == pytest.approx(0.65)
    assert saved["volume"]["tp"] == 476 and saved["volume"]["dice"] == pytest.approx(2 * 476 / (952 + 212))
    assert saved["slices"][1]["dice"] == pytest.approx(296 / 328)
    assert saved["slices"][1]["voxels"] == {"tp": 148, "fp": 16, "fn": 16, "tn": 40 * 36 - 180}
    assert saved["slices"][4]["instances"] == {"tp": 2, "fp": 1, "fn": 0}
    assert saved["ap75"]["ap"] == pytest.approx(51 / 101)

    table = "\n".join(report.table_lines())
    assert "0.9024" in table and "(empty in both)" in table and "over 4 of 5 slices" in table


def test_uint8_probabilities_are_scaled(known, tmp_path):
    foreground, _ = known_volumes()
    stored = np.where(foreground, 128, 127).astype(np.uint8)   # 0.5 × 255 = 127.5 lies between
    prediction = write(f"{tmp_path}/u8.zarr/prob", stored, (3, 7, 36))
    report_path = tmp_path / "reports" / "u8.json"
    report = evaluate(eval_config(prediction, known[1], report=str(report_path)), progress=False)
    assert values(report) == [pytest.approx(row) for row in EXPECTED]
    assert report.foreground_above == pytest.approx(127.5)
    assert json.loads(report_path.read_text())["foreground_above"] == pytest.approx(127.5)


def test_min_size_removes_small_predicted_components(known):
    report = evaluate(eval_config(*known, min_size_vx=20), progress=False)
    dice, _, aji, pq = values(report)[4]
    assert dice == pytest.approx(328 / 344)                   # Dice/IoU score the thresholded map
    assert (aji, pq) == (pytest.approx(1.0), pytest.approx(1.0))  # C (16 voxels) is gone


def blobs(shape: tuple[int, int, int], seed: int, fraction: float) -> np.ndarray:
    """Seeded random blobs: box-filtered noise, thresholded."""
    from scipy.ndimage import uniform_filter

    noise = uniform_filter(np.random.default_rng(seed).random(shape), size=(1, 5, 5))
    return noise > np.quantile(noise, 1 - fraction)


@pytest.mark.parametrize("slab_target_vx, memory_budget", [
    (2**24, 2**32),        # one shared slab of all 7 slices
    (6 * 45 * 39, 1),      # shared slabs of 6 (lcm of the z chunks), one slab per compute
    (2 * 45 * 39, 1),      # direct slab reads of 2 slices
])
def test_streaming_equals_whole_arrays(tmp_path, monkeypatch, slab_target_vx, memory_budget):
    monkeypatch.setattr(evaluate_module, "SLAB_TARGET_VX", slab_target_vx)
    monkeypatch.setattr(evaluate_module, "MEMORY_BUDGET_BYTES", memory_budget)
    shape = (7, 45, 39)
    truth = blobs(shape, 1, 0.3)
    probabilities = np.where(blobs(shape, 2, 0.3) | (truth & blobs(shape, 3, 0.5)), 0.8, 0.2).astype(np.float32)
    prediction = write(f"{tmp_path}/r.zarr/prob", probabilities, (3, 16, 16))
    labels = write(f"{tmp_path}/r.zarr/labels", truth.astype(np.uint8), (2, 20, 13))
    report = evaluate(eval_config(prediction, labels, min_size_vx=4), progress=False)

    predicted = probabilities > 0.5
    for z, s in enumerate(report.slices):
        p, t = connected_instances(predicted[z], 4), connected_instances(truth[z])
        assert s.confusion == Confusion.of(predicted[z], truth[z])
        assert s.aji == pytest.approx(aggregated_jaccard(p, t))
        assert s.panoptic == panoptic_quality(p, t)
    assert 0.0 < report.mean["aji"] < 1.0                      # a non-trivial case
    assert report.ap75 == average_precision(predicted, truth)


@pytest.mark.parametrize("slab_target_vx, memory_budget", [
    (2**24, 2**32),        # one shared slab of all 7 slices
    (6 * 45 * 39, 1),      # shared slabs of 6 (lcm of the z chunks), one slab per compute
    (2 * 45 * 39, 1),      # direct slab reads of 2 slices
])
def test_an_instance_output_streams_the_ap_of_the_whole_volume(tmp_path, monkeypatch, slab_target_vx, memory_budget):
    """AP-75 of an instance output against instance labels, summed over slabs, equals the whole-volume
    AP; AJI / PQ use both volumes' ids (touching objects stay apart); alone, ``id > 0`` is the foreground."""
    monkeypatch.setattr(evaluate_module, "SLAB_TARGET_VX", slab_target_vx)
    monkeypatch.setattr(evaluate_module, "MEMORY_BUDGET_BYTES", memory_budget)
    shape = (7, 45, 39)
    truth = connected_instances(blobs(shape, 1, 0.3)).astype(np.uint32) * 7  # ids not 1..n
    truth[:, :, 20:][truth[:, :, 20:] > 0] += 1  # objects cut at x = 20: touching, two ids
    found = connected_instances((truth > 0) | blobs(shape, 2, 0.02)).astype(np.uint64)  # merges and extras
    found[found > 0] += 2**40  # a volseg-sized id
    instances = write(f"{tmp_path}/r.zarr/instances", found, (3, 16, 16))
    labels = write(f"{tmp_path}/r.zarr/labels", truth, (2, 20, 13))
    probabilities = write(f"{tmp_path}/r.zarr/prob", np.where(found > 0, 0.9, 0.1).astype(np.float32), (3, 16, 16))
    both = evaluate(eval_config(probabilities, labels, instances={"url": instances}, min_size_vx=3,
                                report=str(tmp_path / "both.json")), progress=False)
    alone = evaluate(parse_config({"eval": {"labels": {"url": labels}, "instances": {"url": instances},
                                            "min_size_vx": 3, "report": str(tmp_path / "alone.json")}}),
                     progress=False)

    whole = average_precision(found, truth)
    assert both.ap75 == alone.ap75 == whole and 0 < whole.ap < 1 and whole.tp > 3
    assert "instance output" in alone.ap75_note and alone.instances_url == open_volume(instances).url
    for z, (a, b) in enumerate(zip(alone.slices, both.slices, strict=True)):
        assert a == b  # the same foreground, from probabilities > 0.5 or from ids > 0
        p = slice_instances(found[z], 3)
        t = slice_instances(truth[z])
        assert a.confusion == Confusion.of(found[z] > 0, truth[z] > 0)
        assert a.aji == pytest.approx(aggregated_jaccard(p, t)) and a.panoptic == panoptic_quality(p, t)
    json_report = json.loads((tmp_path / "alone.json").read_text())
    assert json_report["ap75"]["ap"] == whole.ap and json_report["instances"] == alone.instances_url


def test_instances_against_a_mask_say_so(tmp_path):
    truth = blobs((4, 30, 30), 1, 0.3).astype(np.uint8)
    found = connected_instances(truth > 0).astype(np.uint32)
    report = evaluate(parse_config({"eval": {"labels": {"url": write(f"{tmp_path}/m.zarr/l", truth, (4, 30, 30))},
                                             "instances": {"url": write(f"{tmp_path}/m.zarr/i", found, (4, 30, 30))},
                                             "report": str(tmp_path / "m.json")}}), progress=False)
    assert "labels hold one id only" in report.ap75_note


def test_volume_as_dask_reads_chunks_and_pickles(tmp_path):
    array = np.arange(5 * 7 * 9, dtype=np.uint16).reshape(5, 7, 9)
    vol = open_volume(write(f"{tmp_path}/a.zarr/x", array, (2, 3, 4)))
    lazy = volume_as_dask(vol)
    assert lazy.chunks == ((2, 2, 1), (3, 3, 1), (4, 4, 1))
    assert np.array_equal(lazy.compute(scheduler="sync"), array)
    again = pickle.loads(pickle.dumps(lazy))                  # what crosses to Ray workers
    assert np.array_equal(again[1:4, 2:6, 3:8].compute(scheduler="sync"), array[1:4, 2:6, 3:8])


def test_shape_mismatch_names_both_volumes(known, tmp_path):
    other = write(f"{tmp_path}/o.zarr/labels", np.zeros((5, 40, 35), np.uint8), (5, 40, 35))
    with pytest.raises(VolumeFormatError) as caught:
        evaluate(eval_config(known[0], other), progress=False)
    message = str(caught.value)
    assert known[0] in message and other in message and "(5, 40, 36)" in message and "(5, 40, 35)" in message


def test_a_slice_over_the_memory_cap_is_refused(tmp_path):
    shape = (1, 2**14 + 1, 2**14)                             # metadata only: nothing is written or read
    urls = [create_volume(f"{tmp_path}/big.zarr/{name}", shape=shape, dtype="uint8", voxel_size_nm=(1, 1, 1),
                          chunk_shape=(1, 1024, 1024)).url for name in ("prob", "labels")]
    with pytest.raises(VolumeFormatError, match=r"more than the 268435456 \(2\^28\)"):
        evaluate(eval_config(*urls), progress=False)


def test_default_report_path():
    assert default_report_path("/d/out.zarr/prob") == Path("/d/out_prob_eval.json")
    assert default_report_path("zarr3:///d/o.n5/a/b") == Path("/d/o_a_b_eval.json")
    assert default_report_path("/d/prob") == Path("/d/prob_eval.json")
    assert default_report_path("gs://bucket/x.zarr/prob") == Path.cwd() / "prob_eval.json"


def test_cli_eval_prints_the_table(known, tmp_path, capsys):
    config = write_config(tmp_path / "eval.yaml", {
        "output": {"probabilities": known[0]},                   # the prediction defaults to it
        "eval": {"labels": {"url": known[1]}, "report": str(tmp_path / "r.json")}})
    assert main(["eval", str(config), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and "AP-75" in out and (tmp_path / "r.json").is_file()


@pytest.fixture
def threads_report(known, monkeypatch) -> EvalReport:
    """The threaded run, made as if no Ray cluster were connected."""
    import ray

    with monkeypatch.context() as patch:
        patch.setattr(ray, "is_initialized", lambda: False)
        patch.delenv("RAY_ADDRESS", raising=False)
        return evaluate(eval_config(*known, report=str(Path(known[0]).parent.parent / "t.json")), progress=False)


@pytest.mark.ray
def test_ray_gives_the_same_numbers(known, threads_report, ray_cluster):
    on_ray = evaluate(eval_config(*known), progress=False)
    assert on_ray.scheduler.startswith("dask on ray") and threads_report.scheduler == "dask threads"
    assert on_ray.slices == threads_report.slices and on_ray.ap75 == threads_report.ap75
    assert values(on_ray) == [pytest.approx(row) for row in EXPECTED]


def test_a_roi_scores_only_its_slices(known, tmp_path):
    """``roi`` on both volumes: held-out slices scored alone, as if the volumes held nothing else."""
    prediction, labels = known
    roi = {"roi": {"start": [3, 0, 0], "stop": [5, 40, 36]}}
    config = parse_config({"eval": {"labels": {"url": labels, **roi}, "prediction": {"url": prediction, **roi},
                                    "report": str(tmp_path / "held_out.json")}})
    report = evaluate(config, progress=False)
    assert [s.z for s in report.slices] == [0, 1]
    assert values(report) == [pytest.approx(EXPECTED[3]), pytest.approx(EXPECTED[4])]
