"""SAM behind volseg's interfaces, and the SAM-based methods, on tiny randomly initialised SAMs built from
segment-anything's own modules (no weights can be downloaded here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tests.conftest import TINY_PROMPTDAS, write_config
from volseg.cli import main
from volseg.commands.run import run
from volseg.config import parse_config
from volseg.data.synthetic import generate_volume
from volseg.errors import CheckpointError, ConfigError
from volseg.io import open_volume
from volseg.models import ModelSpec, build_model
from volseg.models.checkpoint import load_checkpoint, save_checkpoint
from volseg.models.sam.input import decode_image, encode_image, masks_to_image, points_to_sam
from volseg.models.sam.model import SamSegmenter
from volseg.models.sam.prompt_parts import block_with_prefix
from volseg.training.promptdas.settings import AdaptSettings
from volseg.training.promptdas.trainer import DomainData
from volseg.training.sam.all_in_sam import AllInSamSettings, all_in_sam
from volseg.training.sam.dfg import DfgSettings, dfg_adapt
from volseg.training.sam.dfg_boxes import BoxSearchSettings, box_contains, first_stable, grow_box, mask_iou, search_box
from volseg.training.sam.masks import clean_object_mask, paint_objects
from volseg.training.sam.prompt_learning import learn_sam_prompts
from volseg.training.sam.tuning import SamTuneSettings
from volseg.training.sam.weak_labels import instances_at_points, weak_labels_from_instances

TINY_SAM = ModelSpec("sam", options={"variant": "tiny"})


def tiny_sam(seed: int = 0, **options) -> SamSegmenter:
    torch.manual_seed(seed)
    model = build_model(ModelSpec("sam", options={"variant": "tiny", **options}))
    assert isinstance(model, SamSegmenter)
    return model.eval()


@pytest.fixture(scope="module")
def sam() -> SamSegmenter:
    return tiny_sam()


@pytest.fixture(scope="module")
def synthetic():
    return generate_volume((3, 96, 96), "tem", seed=5)


# --- the model: shapes, prompts, preprocessing -------------------------------------------------------------


@torch.no_grad()
def test_zero_one_and_many_point_prompts_and_boxes_give_one_map_per_window(sam):
    image = torch.rand(3, 1, 40, 56, generator=torch.Generator().manual_seed(0))
    points = torch.tensor([[[10.0, 20.0], [30.0, 40.0], [0.0, 0.0]], [[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]],
                           [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    valid = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    unprompted = sam(image)
    prompted = sam(image, points, valid)
    for out in (unprompted, prompted):
        assert out.logits.shape == out.density.shape == (3, 1, 40, 56)
        assert not out.density.any()                                    # SAM has no density head
    assert torch.equal(prompted.logits[2], unprompted.logits[2])        # zero valid points = unprompted
    assert (prompted.logits[0] - unprompted.logits[0]).abs().max() > 1e-3
    alone = sam(image[1:2], points[1:2, :1])                            # no padding rows, no mask
    assert torch.allclose(alone.logits, prompted.logits[1:2], atol=1e-5)
    many = sam(image[:1], points[:1, :2])                               # max over the two objects
    each = [sam(image[:1], points[:1, i : i + 1]).logits for i in range(2)]
    assert torch.allclose(many.logits, torch.maximum(*each), atol=1e-5)
    boxes = torch.tensor([[[5.0, 10.0, 20.0, 30.0]], [[0.0, 0.0, 9.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]]])
    box_valid = torch.tensor([[True], [True], [False]])
    boxed = sam(image, points, valid, boxes, box_valid)
    assert boxed.logits.shape == (3, 1, 40, 56)
    assert torch.equal(boxed.logits[2], unprompted.logits[2])
    assert (boxed.logits[1] - prompted.logits[1]).abs().max() > 1e-3


@torch.no_grad()
def test_preprocessing_round_trip_and_coordinate_frames(sam):
    y, x = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing="ij")
    rgb = torch.stack([0.2 + 0.6 * y * x, 0.5 + 0.3 * torch.sin(3 * x), 0.3 + 0.4 * y])[None]   # smooth, 40×56
    encoded = encode_image(sam.sam, rgb)
    assert encoded.shape == (1, 3, 64, 64)                         # longest side 56 → 64, then padded
    assert torch.all(encoded[..., 46:, :] == 0)                    # 40·64/56 = 45.7 → 46 rows of image
    back = decode_image(sam.sam, encoded, (40, 56))
    assert back.shape == rgb.shape and (back - rgb).abs().max() < 0.02
    square = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(decode_image(sam.sam, encode_image(sam.sam, square), (64, 64)), square, atol=1e-5)
    assert torch.allclose(points_to_sam(torch.tensor([[7.0, 21.0]]), (40, 56), 64),
                          torch.tensor([[21.0 * 64 / 56, 7.0 * 46 / 40]]))
    constant = torch.full((2, 1, 16, 16), 3.0)                     # low-res logits → original frame
    assert torch.allclose(masks_to_image(sam.sam, constant, (40, 56)), torch.full((2, 1, 40, 56), 3.0))


@torch.no_grad()
def test_untrained_prompt_parts_leave_sam_unchanged_and_zero_prefix_is_sams_block(sam):
    image = torch.rand(2, 1, 48, 48, generator=torch.Generator().manual_seed(2))
    prompted = tiny_sam(head_prompt=True, adapter_dim=4)
    prompted.load_state_dict(sam.state_dict(), strict=False)
    assert torch.allclose(prompted(image).logits, sam(image).logits, atol=1e-5)
    tokens = torch.randn(2, 8, 8, 32, generator=torch.Generator().manual_seed(3))
    for block in sam.sam.image_encoder.blocks:                     # one windowed, one global block
        assert torch.allclose(block_with_prefix(block, tokens, torch.zeros(0, 32)), block(tokens), atol=1e-6)
        assert (block_with_prefix(block, tokens, torch.randn(3, 32)) - block(tokens)).abs().max() > 1e-4


def test_a_sam_predictor_survives_pickling_as_ray_ships_it():
    import pickle

    from volseg.inference.predictor import TorchPredictor
    from volseg.models import input_contract

    model = tiny_sam(head_prompt=True, head_prompt_width=4, prefix_tokens=2, adapter_dim=4)
    predictor = TorchPredictor(model, input_contract(TINY_SAM), (1, 24, 40), 1, batch_size=2)
    windows = np.random.default_rng(4).integers(0, 255, (3, 1, 24, 40), dtype=np.uint8)
    prompts = [np.array([[0, 5, 7]]), np.zeros((0, 3)), np.array([[0, 1, 2], [0, 20, 30]])]
    expected = predictor.predict(windows, prompts)
    again = pickle.loads(pickle.dumps(predictor)).predict(windows, prompts)
    assert expected.shape == (3, 2, 1, 24, 40) and np.array_equal(expected, again)


# --- checkpoints ---------------------------------------------------------------------------------------------


def test_official_checkpoints_load_and_bad_ones_are_refused_with_the_fix(tmp_path, sam):
    pth = tmp_path / "sam_tiny.pth"
    torch.save(sam.sam.state_dict(), pth)
    loaded = load_checkpoint(pth, TINY_SAM)                        # model.checkpoint may be SAM's own .pth
    assert isinstance(loaded, SamSegmenter)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sam.state_dict().values(),
                                                 strict=True))
    with pytest.raises(CheckpointError, match=r"missing\.pth.*does not exist.*sam_vit_b_01ec64\.pth"):
        load_checkpoint(tmp_path / "missing.pth", ModelSpec("sam", options={"variant": "b"}))
    with pytest.raises(CheckpointError, match=r"sam_tiny\.pth.*is SAM tiny.*asks for SAM ViT-B.*variant: tiny"):
        load_checkpoint(pth, ModelSpec("sam", options={"variant": "b"}))
    other = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a SAM checkpoint"):
        load_checkpoint(other, TINY_SAM)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch state dict"):
        load_checkpoint(garbage, TINY_SAM)


# --- SAM as a Predictor in blockwise `volseg run` -------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory, sam):
    return save_checkpoint(tmp_path_factory.mktemp("sam") / "sam.safetensors", sam, TINY_SAM, {"mode": "test"})


def test_sam_run_blockwise_equals_whole_volume_with_and_without_points(run_config, sam_checkpoint, tmp_path):
    points = tmp_path / "points.csv"
    points.write_text("z,y,x\n1,10,12\n1,40,60\n4,30,31\n7,65,5\n")
    outputs = {}
    for block, name in (([4, 32, 48], "blocks"), ([10, 80, 80], "whole")):
        for prompts in (None, {"points": str(points)}):
            config = run_config(model={"name": "sam", "options": dict(TINY_SAM.options),
                                       "checkpoint": str(sam_checkpoint)},
                                output={"probabilities": str(tmp_path / f"{name}{bool(prompts)}.zarr/prob"),
                                        "density": str(tmp_path / f"{name}{bool(prompts)}.zarr/density"),
                                        "chunk": [2, 16, 16]},
                                execution={"block": block, "executor": "serial"},
                                **({"prompts": prompts} if prompts else {}))
            run(parse_config(config), progress=False)
            volume = open_volume(config["output"]["probabilities"])
            outputs[name, bool(prompts)] = volume.read(volume.bounds)
            density = open_volume(config["output"]["density"])
            assert not density.read(density.bounds).any()
    for prompted in (False, True):
        assert np.abs(outputs["blocks", prompted] - outputs["whole", prompted]).max() <= 1e-5
    assert np.abs(outputs["whole", True] - outputs["whole", False]).max() > 1e-3
    official = tmp_path / "sam_tiny.pth"                       # SAM's own .pth works as model.checkpoint too
    torch.save(load_checkpoint(sam_checkpoint, TINY_SAM).sam.state_dict(), official)
    config = run_config(model={"name": "sam", "options": dict(TINY_SAM.options), "checkpoint": str(official)},
                        output={"probabilities": str(tmp_path / "pth.zarr/prob"), "chunk": [2, 16, 16]})
    run(parse_config(config), progress=False)
    volume = open_volume(config["output"]["probabilities"])
    assert np.abs(volume.read(volume.bounds) - outputs["blocks", False]).max() <= 1e-5


def test_auto_prompts_with_sam_are_refused_naming_the_route(run_config, sam_checkpoint):
    config = run_config(model={"name": "sam", "options": dict(TINY_SAM.options), "checkpoint": str(sam_checkpoint)},
                        prompts={"auto": True})
    with pytest.raises(ConfigError, match="volseg peaks"):
        run(parse_config(config), progress=False)


# --- prompt learning ------------------------------------------------------------------------------------------


def test_prompt_learning_trains_only_the_added_parameters(synthetic):
    model = tiny_sam(head_prompt=True, head_prompt_width=4, prefix_tokens=2, adapter_dim=4)
    before_sam = {k: v.clone() for k, v in model.sam.state_dict().items()}
    before_added = [p.detach().clone() for p in model.added_parameters()]
    settings = SamTuneSettings(steps=2, batch_size=2, crop=(1, 48, 48), learning_rate=1e-2)
    history = learn_sam_prompts(model, DomainData(synthetic.raw, synthetic.labels), settings)
    assert len(history.losses) == 2 and all(0 <= loss <= 1 for loss in history.losses)
    assert all(torch.equal(v, before_sam[k]) for k, v in model.sam.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.sam.parameters())
    changed = [not torch.equal(p, q) for p, q in zip(model.added_parameters(), before_added, strict=True)]
    assert len(changed) > 10 and all(changed)
    with pytest.raises(ConfigError, match="nothing to learn"):
        learn_sam_prompts(tiny_sam(), DomainData(synthetic.raw, synthetic.labels), settings)


# --- All-in-SAM -------------------------------------------------------------------------------------------------


def test_weak_labels_boxes_contain_their_objects_and_points_lie_inside():
    labels = np.zeros((40, 40), np.int32)
    labels[3:10, 4:20] = 1
    labels[25:35, 25:30] = 2
    labels[30:33, 2:6] = 1                                     # a second piece of instance 1: its own object
    weak = weak_labels_from_instances(labels)
    assert len(weak) == 3
    components = [(labels == 1) & (ndimage.label(labels == 1)[0] == k) for k in (1, 2)] + [labels == 2]
    for obj in components:
        i = next(i for i, p in enumerate(weak.points_yx) if obj[int(p[0]), int(p[1])])
        assert box_contains(tuple(int(v) for v in weak.boxes_yxyx[i]), obj)
        ys, xs = np.nonzero(obj)
        assert tuple(weak.boxes_yxyx[i]) == (ys.min(), xs.min(), ys.max(), xs.max())   # tight
    sparse = instances_at_points(labels, np.array([[5.0, 10.0]]))
    assert set(np.unique(sparse)) == {0, 1} and sparse[31, 3] == 0 and sparse[5, 10] == 1


def test_masks_are_cleaned_to_the_seed_component_with_holes_filled():
    mask = np.zeros((30, 30), bool)
    mask[2:12, 2:12] = True
    mask[5:8, 5:8] = False                                     # a hole
    mask[18:30, 18:30] = True                                  # a larger stray blob
    cleaned = clean_object_mask(mask, np.array([3.0, 3.0]), min_size_vx=10)
    assert cleaned[2:12, 2:12].all() and cleaned.sum() == 100 and ndimage.label(cleaned)[1] == 1
    assert clean_object_mask(mask, None).sum() == 144          # no seed: the largest component
    assert not clean_object_mask(mask, np.array([3.0, 3.0]), min_size_vx=101).any()
    labels = paint_objects(np.stack([cleaned, mask]))
    assert labels[3, 3] == 1 and labels[25, 25] == 2 and labels[6, 6] == 1


def test_all_in_sam_pseudo_labels_and_adapter_tuning(synthetic):
    model = tiny_sam(adapter_dim=4)
    encoder = {k: v.clone() for k, v in model.sam.image_encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in model.sam.mask_decoder.state_dict().items()}
    weak = [weak_labels_from_instances(labels) for labels in synthetic.labels]
    settings = AllInSamSettings(prompt="boxes", margin_vx=4, min_size_vx=4,
                                tune=SamTuneSettings(steps=2, batch_size=2, crop=(1, 64, 64), train_decoder=True))
    history, pseudo = all_in_sam(model, synthetic.raw, weak, settings)
    assert len(history.losses) == 2
    assert pseudo.prompted == sum(len(w) for w in weak) and 0 < pseudo.kept <= pseudo.prompted
    for k in range(len(pseudo.labels)):
        for value in np.unique(pseudo.labels[k][pseudo.labels[k] > 0]):
            obj = pseudo.labels[k] == value
            assert ndimage.label(obj)[1] == 1 and obj.sum() >= 4      # one component per object, no dust
        near = np.zeros(pseudo.labels.shape[1:], bool)
        for y0, x0, y1, x1 in weak[k].boxes_yxyx.astype(int):
            near[y0 : y1 + 1, x0 : x1 + 1] = True
        near = ndimage.binary_dilation(near | (pseudo.labels[k] > 0), iterations=4)
        assert np.array_equal(pseudo.valid[k] > 0, near)              # supervised only near annotations
    assert all(torch.equal(v, encoder[k]) for k, v in model.sam.image_encoder.state_dict().items())
    assert any(not torch.equal(v, decoder[k]) for k, v in model.sam.mask_decoder.state_dict().items())
    assert all(not torch.equal(a.up.weight, torch.zeros_like(a.up.weight)) for a in model.adapters)


# --- DFG: feature-guided box prompts --------------------------------------------------------------------------


def test_stabilisation_criterion():
    grow = [np.zeros((10, 10), bool) for _ in range(4)]
    for k, r in enumerate((2, 5, 7, 7)):
        grow[k][:r, :r] = True
    assert first_stable(grow, 0.9) == 3                       # 4/25, 25/49 change; 49/49 is stable
    assert first_stable(grow[:3], 0.9) is None
    assert first_stable(grow[:3], 0.5) == 2                   # 25/49 ≥ 0.5
    assert mask_iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_box_search_grows_around_the_object_and_stops_where_the_mask_stabilises():
    obj = np.zeros((64, 64), bool)
    obj[20:41, 12:30] = True                                   # 21×18 object
    similarity = np.where(obj, 0.9, 0.1)
    asked = []

    def segment(box):                                          # SAM that draws the object inside the box
        asked.append(box)
        inside = np.zeros_like(obj)
        inside[box[0] : box[2] + 1, box[1] : box[3] + 1] = True
        return obj & inside

    settings = BoxSearchSettings(initial_half_vx=2, step_vx=3, feature_threshold=0.5, stable_iou=0.95, max_steps=20)
    found = search_box((30.0, 20.0), similarity, segment, settings)
    assert found.stable and box_contains(found.box, obj) and np.array_equal(found.mask, obj)
    margin = np.array([20 - found.box[0], 12 - found.box[1], found.box[2] - 40, found.box[3] - 29])
    assert margin.max() <= 3 * 3                               # stopped near the object, not at the border
    assert grow_box((28, 18, 32, 22), similarity, 3, 0.5) == (25, 15, 35, 25)    # every side looks like it
    assert grow_box((18, 10, 42, 31), similarity, 3, 0.5) == (18, 10, 42, 31)    # no side does

    def restless(box):                                         # a mask that follows the box forever
        inside = np.zeros_like(obj)
        inside[box[0] : box[2] + 1, box[1] : box[3] + 1] = True
        return inside

    assert not search_box((30.0, 20.0), similarity, restless, BoxSearchSettings(max_steps=3)).stable


def test_dfg_pseudo_labels_feed_the_mean_teacher(synthetic):
    torch.manual_seed(0)
    target_model = build_model(TINY_PROMPTDAS)
    before = {k: v.clone() for k, v in target_model.state_dict().items()}
    settings = DfgSettings(slices=2, crop_yx=(64, 64), seed_threshold=0.3, min_seed_vx=8, min_size_vx=4,
                           search=BoxSearchSettings(feature_threshold=0.9, stable_iou=0.6, max_steps=6))
    adapt = AdaptSettings(mode="uda", steps=2, batch_size=1, crop=(1, 32, 32), density_sigma=3.0)
    result, pseudo = dfg_adapt(target_model, tiny_sam(), synthetic.raw, settings, adapt)
    assert pseudo.raw.shape == pseudo.labels.shape == (2, 64, 64)
    assert 0 < pseudo.kept <= pseudo.tried
    kept = [s for slice_searches in pseudo.searches for s in slice_searches if s.stable]
    assert all(0 <= s.box[0] <= s.box[2] < 64 and 0 <= s.box[1] <= s.box[3] < 64 for s in kept)
    for labels in pseudo.labels:
        for value in np.unique(labels[labels > 0]):
            obj = labels == value
            assert ndimage.label(obj)[1] == 1 and np.array_equal(ndimage.binary_fill_holes(obj), obj)
    assert len(result.history.losses) == 2 and "source_seg" in result.history.components   # pseudo-labels used
    assert any(not torch.equal(v, before[k]) for k, v in target_model.state_dict().items())


# --- the command ----------------------------------------------------------------------------------------------


def test_sam_adapt_command_writes_checkpoints_that_volseg_run_uses(small_dataset, promptdas_checkpoint, tmp_path,
                                                                  run_config, capsys):
    raw = {"url": f"{small_dataset}/raw"}
    common = {"steps": 1, "batch_size": 1, "crop": [1, 48, 48], "sam_variant": "tiny", "min_size_vx": 2}
    sam_model = {"name": "sam", "options": {"variant": "tiny", "adapter_dim": 4, "prefix_tokens": 1}}
    mito = {"url": f"{small_dataset}/mito"}
    configs = {
        "sam-prompt": {"model": sam_model, "sam_adapt": {**common, "method": "sam-prompt",
                                                        "labelled": {"raw": raw, "labels": mito}}},
        "all-in-sam": {"model": sam_model, "sam_adapt": {**common, "method": "all-in-sam", "target": {"raw": raw},
                                                        "sparse_labels": mito}},
        "dfg": {"model": {"name": TINY_PROMPTDAS.name, "options": dict(TINY_PROMPTDAS.options)},
                "sam_adapt": {**common, "method": "dfg", "target": {"raw": raw}, "init": str(promptdas_checkpoint),
                              "dfg_seed_threshold": 0.3, "dfg_stable_iou": 0.5}},
    }
    for method, config in configs.items():
        config["sam_adapt"]["checkpoint"] = str(tmp_path / f"{method}.safetensors")
        assert main(["sam-adapt", str(write_config(tmp_path / f"{method}.yaml", config)), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert f"{method}.safetensors (1 steps" in out and "randomly initialised" in out
    run_with = run_config(model={**sam_model, "checkpoint": str(tmp_path / "all-in-sam.safetensors")})
    result = run(parse_config(run_with), progress=False)
    assert "all-in-sam" in result.summary_lines()[2 if len(result.passes) == 1 else 3]
    bad = {"model": sam_model, "sam_adapt": {"method": "dfg", "target": {"raw": raw}, "checkpoint": "x.safetensors"}}
    assert main(["sam-adapt", str(write_config(tmp_path / "bad.yaml", bad))]) == 2
    assert "needs target.raw and init" in capsys.readouterr().err


def test_promptdas_density_peaks_chain_into_sam_prompts(run_config, promptdas_checkpoint, sam_checkpoint, tmp_path,
                                                        capsys):
    promptdas = run_config(model={"name": TINY_PROMPTDAS.name, "options": dict(TINY_PROMPTDAS.options),
                                  "checkpoint": str(promptdas_checkpoint)},
                           prompts={"auto": True, "peak_threshold": 0.02, "min_distance_nm": 40})
    first = run(parse_config(promptdas), progress=False)
    found = first.prompts.read(first.plan.grid.roi)  # the peaks, from the run's point index
    config = write_config(tmp_path / "promptdas.yaml", promptdas)
    points = tmp_path / "peaks.csv"
    assert main(["peaks", str(config), "--out", str(points)]) == 0
    assert f"{len(found)} density peaks" in capsys.readouterr().out
    exported = np.loadtxt(points, delimiter=",", skiprows=1, ndmin=2)
    assert len(found) > 0 and {tuple(p) for p in exported} == {tuple(p) for p in found.zyx}
    chained = run_config(model={"name": "sam", "options": dict(TINY_SAM.options), "checkpoint": str(sam_checkpoint)},
                         output={"probabilities": str(tmp_path / "sam.zarr/prob"), "chunk": [2, 16, 16]},
                         prompts={"points": str(points)})
    result = run(parse_config(chained), progress=False)
    assert len(result.prompts) == len(found)


def test_the_benchmark_says_plainly_when_it_has_no_sam_checkpoint(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sam_methods.py"
    spec = importlib.util.spec_from_file_location("sam_methods_bench", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench                             # dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    assert bench.main([]) == 0
    out = capsys.readouterr().out
    assert "No SAM checkpoint given, so nothing was run" in out and "--sam-checkpoint" in out
    assert all(name in out for name in bench.ROWS)
