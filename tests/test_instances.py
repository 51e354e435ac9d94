"""Blockwise instances: connected components equal the whole-volume ones exactly, the watershed matches
its whole-volume pass (ARI ≥ 0.999), outputs read back in every format, resumes reuse done-marks."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts

from volseg.config import InstancesConfig
from volseg.engine.ledger import BlockLedger
from volseg.engine.serial import SerialExecutor
from volseg.engine.stage import Executor, run_block
from volseg.errors import ConfigError, GeometryMismatchError, OutputExistsError
from volseg.evaluation.metrics import connected_instances
from volseg.geometry import BlockGrid, Box
from volseg.inference.job import to_storage
from volseg.instances.labels import label_box, unit_range
from volseg.instances.merge import MergeInputs, MergeTree, merge
from volseg.instances.run import (
    InstancePlan,
    InstanceResult,
    min_size_voxels,
    open_instances,
    plan_instances,
    run_instances,
)
from volseg.instances.stages import FaceContactStage, HaloOverlapStage, LabelStage, RelabelStage
from volseg.instances.stitching import RelabelTable, contact_pairs, overlap_pairs, owner_blocks, piece_ids
from volseg.io import create_volume, open_volume

SHAPE = (16, 64, 72)
VOXEL_NM = (30.0, 8.0, 8.0)  # anisotropic z


def _scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probability and density maps (float32, z, y, x) of ellipsoids — some in touching pairs that only
    the density separates — two tubes along x crossing most of the volume, and one-voxel specks.
    Densities are Gaussian bumps at each object's centre (the tubes' stretched along x)."""
    rng = np.random.default_rng(seed)
    extent = np.asarray(SHAPE) * np.asarray(VOXEL_NM)
    axes = np.meshgrid(*(np.arange(n) * v for n, v in zip(SHAPE, VOXEL_NM, strict=True)), indexing="ij")
    probability = np.zeros(SHAPE, np.float32)
    density = np.zeros(SHAPE, np.float32)

    def add(centre: np.ndarray, radii: np.ndarray, peak: float) -> None:
        d2 = sum(((a - c) / r) ** 2 for a, c, r in zip(axes, centre, radii, strict=True))
        np.maximum(probability, 1 / (1 + np.exp(-8 * (1 - np.sqrt(d2)))), out=probability)
        np.maximum(density, peak * np.exp(-d2 / 0.32), out=density)

    for _ in range(14):
        centre, radii = rng.uniform(0.1, 0.9, 3) * extent, rng.uniform(40, 80, 3)
        add(centre, radii, rng.uniform(0.6, 1.0))
        if rng.random() < 0.4:
            direction = rng.normal(size=3)
            add(centre + direction / np.linalg.norm(direction) * radii * 1.7, radii, rng.uniform(0.6, 1.0))
    for _ in range(2):
        centre = rng.uniform(0.2, 0.8, 3) * extent
        centre[2] = extent[2] / 2
        add(centre, np.array([45.0, 35.0, extent[2] * 0.42]), 1.0)
    for _ in range(10):
        voxel = tuple(int(rng.integers(0, s)) for s in SHAPE)
        if probability[voxel] < 0.3:
            probability[voxel] = 0.9
    return probability, density


@pytest.fixture(scope="module")
def scenes() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    return {seed: _scene(seed) for seed in (0, 1, 2, 7)}


def _semantic_outputs(root: Path, probability: np.ndarray, density: np.ndarray, chunk: tuple[int, int, int],
                      dtype: str = "float32", shard: tuple[int, int, int] | None = None) -> tuple[str, str]:
    """Write the maps as a semantic run would (probabilities in ``dtype``, density float32); their URLs."""
    urls = []
    for name, values, stored in (("probabilities", probability, dtype), ("density", density, "float32")):
        volume = create_volume(f"{root}/{name}.zarr", shape=SHAPE, dtype=stored, voxel_size_nm=VOXEL_NM,
                               voxel_offset=(3, 0, 5), chunk_shape=chunk, shard_shape=shard)
        volume.write(volume.bounds, to_storage(values, np.dtype(stored)))
        urls.append(volume.url)
    return urls[0], urls[1]


def _plan(settings: InstancesConfig, probabilities_url: str, density_url: str, core: tuple[int, int, int],
          **options) -> InstancePlan:
    geometry = open_volume(probabilities_url).geometry
    grid = BlockGrid.aligned(Box.from_shape(SHAPE), core, 0, Box.from_shape(SHAPE), geometry.write_chunk)
    return plan_instances(settings, grid, geometry, probabilities_url, density_url, **options)


#: A merge tree of many levels on the tests' grids (tens of blocks): leaves of 3 blocks, 2 children a node.
DEEP = {"leaf_blocks": 3, "fan_in": 2}


def _run(plan: InstancePlan, executor: Executor | None = None, ledger: BlockLedger | None = None,
         tree: dict[str, int] | None = DEEP) -> tuple[InstanceResult, np.ndarray]:
    merge_tree = None if tree is None else MergeTree(plan.grid.num_blocks, **tree)
    result = run_instances(plan, executor or SerialExecutor(), ledger, merge_tree=merge_tree)
    output = open_volume(plan.url)
    return result, output.read(output.bounds)


def _assert_same_partition(found: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to renaming: background matches and labels correspond one to one."""
    np.testing.assert_array_equal(found == 0, expected == 0)
    pairs = np.unique(found.astype(np.uint64) * np.uint64(expected.max() + 1) + expected.astype(np.uint64))
    assert len(pairs) == len(np.unique(found)) == len(np.unique(expected))


def _adjusted_rand_index(found: np.ndarray, expected: np.ndarray) -> float:
    """ARI over the voxels that are foreground in either labelling (background is a label of its own)."""
    keep = (found > 0) | (expected > 0)
    _, a = np.unique(found[keep], return_inverse=True)
    _, b = np.unique(expected[keep], return_inverse=True)
    _, joint = np.unique(a.astype(np.int64) * (b.max() + 1) + b, return_counts=True)

    def pairs(counts: np.ndarray) -> float:
        return float((counts * (counts - 1) / 2).sum())

    index, rows, cols = pairs(joint), pairs(np.bincount(a)), pairs(np.bincount(b))
    expected_index = rows * cols / pairs(np.array([keep.sum()]))
    return (index - expected_index) / ((rows + cols) / 2 - expected_index)


def _consecutive(labels: np.ndarray, count: int) -> bool:
    return np.array_equal(np.unique(labels), np.arange(count + 1))


def _most_blocks_spanned(labels: np.ndarray, grid: BlockGrid) -> int:
    owners = owner_blocks(grid, grid.roi)[labels > 0]
    objects = labels[labels > 0].astype(np.int64)
    spanned = np.unique(objects * grid.num_blocks + owners) // grid.num_blocks
    return int(np.bincount(spanned).max())


# --- connected components: exact ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("core", "connectivity", "dtype", "shard", "output"),
    [
        ((5, 13, 17), 6, "float32", None, "instances.zarr"),
        ((3, 11, 7), 26, "uint8", None, "instances.n5"),
        ((5, 26, 34), 18, "float32", (5, 26, 34), "instances.zarr"),  # chunks (5, 13, 17) in shards
    ],
)
def test_connected_components_blockwise_equal_whole_volume(tmp_path, scenes, core, connectivity, dtype, shard,
                                                           output) -> None:
    probability, density = scenes[0]
    chunk = (5, 13, 17) if shard else core
    urls = _semantic_outputs(tmp_path, probability, density, chunk, dtype, shard)
    settings = InstancesConfig(url=f"{tmp_path}/{output}", method="connected_components", threshold=0.5)
    plan = _plan(settings, *urls, core, connectivity=connectivity)
    result, labels = _run(plan)

    stored = unit_range(to_storage(probability, np.dtype(dtype)))
    expected = connected_instances(stored > 0.5, connectivity=connectivity)
    _assert_same_partition(labels, expected)
    assert _most_blocks_spanned(expected, plan.grid) >= 3
    assert result.instances == expected.max() and _consecutive(labels, result.instances)
    assert result.pieces > result.instances  # objects really were cut by the blocks
    volume = open_volume(plan.url)
    assert volume.dtype == np.uint64 and volume.voxel_offset == (3, 0, 5) and volume.shard_shape == shard
    assert volume.attributes["volseg"]["instances"] == result.instances
    properties = json.loads((Path(volume.url) / "segment_properties" / "info").read_text())  # Neuroglancer's
    assert properties["inline"]["ids"] == [str(i) for i in range(1, result.instances + 1)]
    voxels = next(p for p in properties["inline"]["properties"] if p["id"] == "voxels")["values"]
    assert voxels == np.bincount(labels.ravel().astype(np.int64))[1:].tolist()


@pytest.mark.parametrize(("connectivity", "objects"), [(6, 24), (18, 13), (26, 2)])
def test_connected_components_join_across_block_edges_and_corners(tmp_path, connectivity, objects) -> None:
    """Lines that cross block borders only where blocks meet at an edge or a corner."""
    shape, core = (12, 12, 12), (4, 4, 4)
    probability = np.zeros(shape, np.float32)
    steps = np.arange(12)
    probability[steps, steps, steps] = 1  # voxels touching at corners, through the corners of 3 blocks
    probability[2, steps, 11 - steps] = 1  # voxels touching at edges, through block edges
    volume = create_volume(f"{tmp_path}/p.zarr", shape=shape, dtype="float32", voxel_size_nm=(8, 8, 8),
                           chunk_shape=core)
    volume.write(volume.bounds, probability)
    grid = BlockGrid.aligned(volume.bounds, core, 0, volume.bounds, core)
    settings = InstancesConfig(url=f"{tmp_path}/i.zarr", method="connected_components")
    result, labels = _run(plan_instances(settings, grid, volume.geometry, volume.url, connectivity=connectivity))
    _assert_same_partition(labels, connected_instances(probability > 0.5, connectivity=connectivity))
    assert result.instances == objects


def test_min_size_counts_every_piece_of_an_object(tmp_path, scenes) -> None:
    """An object larger than min_size_vx survives even when each of its block pieces is smaller."""
    probability, density = scenes[1]
    core = (5, 13, 17)
    settings = InstancesConfig(url=f"{tmp_path}/instances.zarr", method="connected_components", threshold=0.5,
                               min_size_vx=300)
    plan = _plan(settings, *_semantic_outputs(tmp_path, probability, density, core), core)
    result, labels = _run(plan)

    expected = connected_instances(probability > 0.5, min_size_vx=300, connectivity=6)
    _assert_same_partition(labels, expected)
    assert result.dropped > 0 and result.instances == expected.max()
    piece_sizes = [np.bincount(connected_instances(expected[block.core.slices] > 0, connectivity=6).ravel())[1:]
                   for block in plan.grid]
    assert np.concatenate(piece_sizes).min() < 300  # a kept object has a piece smaller than min_size_vx

    # the same bound in cubic nanometres drops the same objects
    nm3 = 300 * float(np.prod(VOXEL_NM))
    by_volume = InstancesConfig(url=f"{tmp_path}/nm3.zarr", method="connected_components", threshold=0.5,
                                min_size_nm3=nm3 - 1)
    plan = _plan(by_volume, plan.probabilities_url, plan.density_url, core)
    assert plan.min_size_vx == 300
    _assert_same_partition(_run(plan)[1], expected)
    assert min_size_voxels(by_volume.model_copy(update={"min_size_nm3": nm3 + 1}), VOXEL_NM) == 301


# --- watershed: ARI against the whole-volume pass ---------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "core", "dtype"),
    # seeds 7 and 2 merge two objects on these grids unless both blocks must agree on a stitch
    [(7, (5, 13, 17), "float32"), (2, (7, 20, 9), "uint8"), (0, (4, 32, 24), "float32")],
)
def test_watershed_blockwise_matches_whole_volume(tmp_path, scenes, seed, core, dtype) -> None:
    probability, density = scenes[seed]
    urls = _semantic_outputs(tmp_path, probability, density, core, dtype)
    settings = InstancesConfig(url=f"{tmp_path}/instances.zarr", method="watershed", threshold=0.5,
                               seed_threshold=0.3, min_distance_nm=40)
    plan = _plan(settings, *urls, core)
    result, labels = _run(plan)

    stored = to_storage(probability, np.dtype(dtype))
    whole = label_box(plan.params, stored, density)  # one block covering the whole volume
    assert _adjusted_rand_index(labels, whole) >= 0.999
    assert result.instances == whole.max() and _consecutive(labels, result.instances)
    assert whole.max() > connected_instances(unit_range(stored) > 0.5, connectivity=6).max()  # touching split
    assert _most_blocks_spanned(whole, plan.grid) >= 3


# --- output formats, planning, resuming --------------------------------------------------------------------


def test_precomputed_segmentation_reads_back_with_tensorstore(tmp_path, scenes) -> None:
    """The Neuroglancer output is a uint64 ``compressed_segmentation`` volume that plain tensorstore
    reads (x, y, z, channel) as the same labels as a zarr output of the same run."""
    probability, density = scenes[0]
    core = (8, 16, 24)
    urls = _semantic_outputs(tmp_path, probability, density, core)
    outputs = {}
    for url in (f"precomputed://{tmp_path}/seg", f"{tmp_path}/seg.zarr"):
        settings = InstancesConfig(url=url, method="watershed", min_distance_nm=40)
        result, outputs[url] = _run(_plan(settings, *urls, core))

    store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/seg/"}).result()
    labels = store.read().result()[..., 0].transpose(2, 1, 0)
    np.testing.assert_array_equal(labels, outputs[f"{tmp_path}/seg.zarr"])
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert (info["type"], info["data_type"]) == ("segmentation", "uint64")
    assert info["scales"][0]["encoding"] == "compressed_segmentation"
    assert info["scales"][0]["voxel_offset"] == [5, 0, 3] and info["scales"][0]["resolution"] == [8, 8, 30]
    assert _consecutive(labels, result.instances) and result.instances > 5


def test_plan_refuses_bad_outputs_and_writes_nothing(tmp_path, scenes) -> None:
    probability, density = scenes[0]
    core = (5, 13, 17)
    probabilities_url, density_url = _semantic_outputs(tmp_path, probability, density, core)
    other = create_volume(f"{tmp_path}/other.zarr", shape=SHAPE, dtype="uint64", voxel_size_nm=VOXEL_NM,
                          voxel_offset=(3, 0, 5), chunk_shape=(5, 13, 34))
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(other.url))

    with pytest.raises(GeometryMismatchError, match="chunk_shape"):
        _plan(InstancesConfig(url=other.url), probabilities_url, density_url, core)
    with pytest.raises(ConfigError, match="density"):
        _plan(InstancesConfig(url=f"{tmp_path}/new.zarr"), probabilities_url, None, core)
    with pytest.raises(ConfigError, match="own path"):
        _plan(InstancesConfig(url=probabilities_url), probabilities_url, density_url, core)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(other.url))) == before

    settings = InstancesConfig(url=f"{tmp_path}/signed.zarr", method="connected_components")
    open_instances(_plan(settings, probabilities_url, density_url, core, signature="run-1"))
    with pytest.raises(OutputExistsError, match="another volseg run"):
        _plan(settings, probabilities_url, density_url, core, signature="run-2")
    assert _plan(settings, probabilities_url, density_url, core, signature="run-2", overwrite=True)


class RecordingExecutor(SerialExecutor):
    """The serial executor, remembering which blocks each stage was given."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: dict[str, list[int]] = {}

    def run(self, stage, blocks, on_done=None, ledger=None):  # type: ignore[override]
        blocks = list(blocks)
        self.ran[stage.name] = sorted(block.id for block in blocks)
        return super().run(stage, blocks, on_done, ledger)


def test_resume_skips_done_blocks_and_stitches_with_their_marks(tmp_path, scenes) -> None:
    probability, density = scenes[1]
    core = (5, 13, 17)
    probabilities_url, density_url = _semantic_outputs(tmp_path, probability, density, core)
    settings = InstancesConfig(url=f"{tmp_path}/instances.zarr", method="connected_components", min_size_vx=300)
    plan = _plan(settings, probabilities_url, density_url, core)
    ledger = BlockLedger.beside(plan.url, "signature-1")
    interrupted = [block for block in plan.grid if block.id % 3 != 1]  # a run killed after these blocks
    label = LabelStage(plan.params, plan.grid, open_volume(probabilities_url), None, open_instances(plan))
    SerialExecutor().run(label, interrupted, ledger=ledger)

    executor = RecordingExecutor()
    result, labels = _run(plan, executor, ledger)
    every = list(range(plan.grid.num_blocks))
    merged = {name: ids for name, ids in executor.ran.items() if name.startswith("instances-merge")}
    assert {name: ids for name, ids in executor.ran.items() if name not in merged} == {
        "instances-label": [b for b in every if b % 3 == 1], "instances-stitch": every, "instances-relabel": every,
        "instances-properties": [0]}
    tree = MergeTree(plan.grid.num_blocks, **DEEP)
    assert merged == {f"instances-merge-{way}-{level}": list(range(tree.nodes(level)))
                      for way in ("up", "down") for level in range(tree.top + 1)} and tree.top >= 3
    _assert_same_partition(labels, connected_instances(probability > 0.5, min_size_vx=300, connectivity=6))
    assert sorted(ledger.done("instances-label")) == every

    again = RecordingExecutor()
    rerun, relabelled = _run(plan, again, ledger)
    assert set(map(tuple, again.ran.values())) == {()} and rerun.instances == result.instances
    np.testing.assert_array_equal(relabelled, labels)


def test_stages_pickle_small_and_compute_the_same_after(tmp_path, scenes) -> None:
    """Ray ships stages to actors: they pickle as specs and parameters, not voxels."""
    probability, density = scenes[0]
    core = (8, 32, 24)
    probabilities_url, density_url = _semantic_outputs(tmp_path, probability, density, core)
    plan = _plan(InstancesConfig(url=f"{tmp_path}/i.zarr", min_distance_nm=40), probabilities_url, density_url, core)
    inputs = open_volume(probabilities_url), open_volume(density_url)
    instances = open_instances(plan)
    block = plan.grid.block(4)
    label = LabelStage(plan.params, plan.grid, *inputs, instances)
    stitch = HaloOverlapStage(plan.params, plan.grid, *inputs, instances)
    contact = FaceContactStage(plan.params, plan.grid, instances)
    outcomes = {stage.name: run_block(stage, block) for stage in (label, stitch)}
    for stage in (label, stitch, contact):
        payload = pickle.dumps(stage)
        assert len(payload) < 4096
        copy = pickle.loads(payload)
        if stage.name in outcomes:
            assert run_block(copy, block) == outcomes[stage.name]
    relabel = RelabelStage(BlockLedger.beside(plan.url, "s").run_folder("merge"), 1024, instances)
    assert len(pickle.dumps(relabel)) < 4096


@pytest.mark.ray
def test_ray_executor_writes_the_same_instances_as_serial(ray_cluster, tmp_path, scenes) -> None:
    from volseg.engine.ray import RayExecutor

    probability, density = scenes[0]
    core = (8, 32, 24)
    urls = _semantic_outputs(tmp_path, probability, density, core)
    with RayExecutor(2, 1, 0) as executor:
        for method in ("connected_components", "watershed"):
            runs = {}
            for name, runner in (("serial", SerialExecutor()), ("ray", executor)):
                settings = InstancesConfig(url=f"{tmp_path}/{name}-{method}.zarr", method=method, min_distance_nm=40,
                                           min_size_vx=20)
                runs[name] = _run(_plan(settings, *urls, core), runner)
            assert runs["ray"][0].instances == runs["serial"][0].instances > 2
            assert runs["ray"][1].tobytes() == runs["serial"][1].tobytes(), method


# --- stitching pieces ---------------------------------------------------------------------------------------


def pid(block: int, local: int) -> int:
    """The documented piece id: block id + 1 in the high 32 bits, the local id in the low ones."""
    return (block + 1) << 32 | local


def test_piece_ids_put_the_block_in_the_high_bits_and_keep_background() -> None:
    np.testing.assert_array_equal(piece_ids(6, np.array([0, 1, 7], np.uint32)), [0, pid(6, 1), pid(6, 7)])


def _merged(tmp_path: Path, counts: list[int], sizes: list[int], half_edges: dict[int, list[tuple[int, int]]],
            min_size_vx: int, **tree: int) -> tuple[dict[int, int], object]:
    """Merge blocks' outcomes given as the label and stitch passes would mark them; piece id → final id."""
    ledger = BlockLedger.beside(f"{tmp_path}/out-{len(list(tmp_path.iterdir()))}.zarr", "signature")
    offsets = np.cumsum([0, *counts])
    for block, count in enumerate(counts):
        ledger.mark("label", block, {"sizes": sizes[offsets[block]:offsets[block] + count]})
        ledger.mark("stitch", block, {"pairs": [list(map(int, e)) for e in half_edges.get(block, [])]})
    ledger.flush()
    inputs = MergeInputs(MergeTree(len(counts), **tree), ledger.run_folder("merge"), ledger, "label", "stitch",
                         min_size_vx)
    result = merge(SerialExecutor(), inputs, ledger)
    stage = RelabelStage(inputs.folder, inputs.tree.leaf_blocks, None)
    grid = BlockGrid(Box.from_shape((1, 1, len(counts))), (1, 1, 1), 0, Box.from_shape((1, 1, len(counts))))
    mapping: dict[int, int] = {}
    for block in range(len(counts)):
        mapping.update(stage.table(grid.block(block)).mapping(block))
    return mapping, result


def test_merge_joins_pieces_both_blocks_report_drops_small_objects_and_numbers_consecutively(tmp_path) -> None:
    counts = [3, 2, 1]
    sizes = [5, 1, 7, 4, 2, 9]  # block 0: pieces 1..3, block 1: 1..2, block 2: 1
    edges = {0: [(pid(0, 2), pid(1, 1))], 1: [(pid(1, 1), pid(0, 2)), (pid(1, 1), pid(2, 1)), (pid(1, 2), pid(2, 1))],
             2: [(pid(2, 1), pid(1, 1))]}  # (1:2, 2:1) is reported by one side only: not joined
    mapping, result = _merged(tmp_path, counts, sizes, edges, 5)
    # objects: {0:1} 5 vx, {0:2, 1:1, 2:1} 14 vx, {0:3} 7 vx, {1:2} 2 vx (dropped); numbered by smallest piece
    assert (result.pieces, result.objects, result.dropped, result.instances) == (6, 4, 1, 3)
    assert mapping == {pid(0, 1): 1, pid(0, 2): 2, pid(0, 3): 3, pid(1, 1): 2, pid(1, 2): 0, pid(2, 1): 2}
    for tree in ({"leaf_blocks": 1, "fan_in": 2}, {"leaf_blocks": 2, "fan_in": 3}):
        deep, again = _merged(tmp_path, counts, sizes, edges, 5, **tree)
        assert again.instances == 3 and sorted(set(deep.values())) == [0, 1, 2, 3]
        assert [deep[pid(0, 2)]] * 2 == [deep[pid(1, 1)], deep[pid(2, 1)]] and deep[pid(1, 2)] == 0
    empty, nothing = _merged(tmp_path, [0, 0], [], {}, 0)
    assert empty == {} and nothing.instances == 0


@pytest.mark.parametrize("tree", [{"leaf_blocks": 1, "fan_in": 2}, {"leaf_blocks": 4, "fan_in": 3},
                                  {"leaf_blocks": 1024, "fan_in": 16}])
def test_merge_tree_equals_one_union_find_over_every_pair(tmp_path, tree) -> None:
    """Random pieces in 37 blocks, random contacts between blocks (most reported by both, some by one):
    whatever the tree, the objects are the connected components of the pairs both blocks reported."""
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 6, 37).tolist()
    pieces = [pid(b, i) for b, c in enumerate(counts) for i in range(1, c + 1)]
    sizes = rng.integers(1, 30, len(pieces)).tolist()
    block_of = {p: (p >> 32) - 1 for p in pieces}
    edges: dict[int, list[tuple[int, int]]] = {}
    both = set()
    for _ in range(60):
        p, q = rng.choice(pieces, 2)
        p, q = int(p), int(q)
        if block_of[p] == block_of[q]:
            continue
        edges.setdefault(block_of[p], []).append((p, q))
        if rng.random() < 0.8:
            edges.setdefault(block_of[q], []).append((q, p))
            both.add((p, q))
    mapping, result = _merged(tmp_path, counts, sizes, edges, 25, **tree)

    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    index = {p: i for i, p in enumerate(pieces)}
    rows = [index[p] for p, _ in both]
    cols = [index[q] for _, q in both]
    n, component = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(pieces),) * 2))
    size = np.bincount(component, weights=sizes, minlength=n)
    kept = size >= 25
    assert result.instances == kept.sum() and result.dropped == n - kept.sum() and result.pieces == len(pieces)
    finals = np.array([mapping[p] for p in pieces])
    assert (finals == 0).tolist() == (~kept[component]).tolist()
    pairs = set(zip(component[finals > 0].tolist(), finals[finals > 0].tolist(), strict=True))
    assert len(pairs) == kept.sum() and sorted({f for _, f in pairs}) == list(range(1, kept.sum() + 1))
    if tree["leaf_blocks"] >= len(counts):  # one leaf: numbered by smallest piece, as one whole-volume pass
        roots = sorted(min(p for p, c in zip(pieces, component, strict=True) if c == k) for k in np.flatnonzero(kept))
        assert [mapping[r] for r in roots] == list(range(1, kept.sum() + 1))


def test_relabel_table_encodes_and_names_blocks_it_lacks() -> None:
    table = RelabelTable(np.array([2, 1]), np.array([4, 5]), np.array([pid(7, 2)], np.uint64),
                         np.array([9], np.uint64), 2, first_block=7)
    again = RelabelTable.decode(table.encode())
    assert again.mapping(7) == table.mapping(7) == {pid(7, 1): 5, pid(7, 2): 9}
    assert again.mapping(8) == {pid(8, 1): 6}
    with pytest.raises(IndexError, match="block 9"):
        again.mapping(9)


def test_contact_pairs_follow_connectivity_and_skip_pieces_of_one_block() -> None:
    slab = np.zeros((2, 4, 4), np.uint64)
    slab[0, 0, 0], slab[1, 1, 1] = pid(0, 1), pid(1, 1)  # touch at a corner only
    slab[0, 3, 3], slab[1, 3, 3] = pid(2, 5), pid(2, 6)  # one block's pieces touching at a face
    assert contact_pairs(slab, 6).shape == (0, 2)
    assert contact_pairs(slab, 18).shape == (0, 2)
    np.testing.assert_array_equal(contact_pairs(slab, 26), [[pid(0, 1), pid(1, 1)]])


def test_overlap_pairs_need_a_majority_both_ways_and_both_blocks() -> None:
    a, b, c = pid(0, 1), pid(1, 1), pid(1, 2)
    owners = np.ones(10, np.int64)
    mine = np.array([a] * 10, np.uint64)
    written = np.array([b] * 6 + [c] * 4, np.uint64)
    np.testing.assert_array_equal(overlap_pairs(mine, written, owners), [[a, b]])
    written = np.array([b] * 4 + [c] * 3 + [0] * 3, np.uint64)  # no majority of mine
    assert overlap_pairs(mine, written, owners).shape == (0, 2)


def test_volseg_run_writes_instances_of_its_own_probabilities(run_config, tmp_path) -> None:
    """`volseg run` with an instances section: the stitched labels equal whole-volume connected components
    of its thresholded probability output, and a rerun resumes every pass without writing anything."""
    import cc3d

    from volseg.commands.run import run
    from volseg.config import parse_config

    config = run_config(instances={"url": str(tmp_path / "out.zarr/instances"), "method": "connected_components"},
                        inference={"window": [1, 32, 32], "stride": [1, 20, 24], "batch_size": 4, "device": "cpu",
                                   "threshold": 0.5})
    result = run(parse_config(config), progress=False)
    assert [p.name for p in result.passes] == ["segment", "instances"] and result.instances.complete
    probabilities = open_volume(config["output"]["probabilities"])
    foreground = probabilities.read(probabilities.bounds) > 0.5
    labels = open_volume(config["instances"]["url"]).read(probabilities.bounds)
    reference = cc3d.connected_components(foreground, connectivity=6)
    assert 0 < result.instances.instances == int(reference.max()) and labels.max() == reference.max()
    assert np.array_equal(labels > 0, foreground)
    pairs = np.unique(np.stack([labels[foreground], reference[foreground]]), axis=1)
    assert pairs.shape[1] == reference.max()                   # a bijection between the two labellings
    again = run(parse_config(config), progress=False)
    assert again.passes[0].resumed == again.plan.grid.num_blocks and again.passes[0].stats.blocks_done == 0
    assert np.array_equal(open_volume(config["instances"]["url"]).read(probabilities.bounds), labels)


def _area(vertices: np.ndarray, faces: np.ndarray) -> float:
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    return float(np.linalg.norm(np.cross(b - a, c - a), axis=1).sum() / 2)


def test_meshes_are_the_whole_volume_surface_cut_into_block_fragments(tmp_path, scenes) -> None:
    """`instances.meshes`: every object's fragments (one per block it lies in, listed by its manifest) add
    up to the surface zmesh finds on the whole volume, neither caps at block faces nor gaps; cloud-volume
    reads them from a precomputed output, whose info points at them."""
    import zmesh
    from cloudvolume import CloudVolume

    probability, density = scenes[0]
    core = (5, 13, 17)
    urls = _semantic_outputs(tmp_path, probability, density, core)
    settings = InstancesConfig(url=f"precomputed://{tmp_path}/seg", method="connected_components", meshes=True)
    plan = _plan(settings, *urls, core)
    result, labels = _run(plan)
    voxel = open_volume(plan.url).voxel_size_nm
    offset = np.asarray(open_volume(plan.url).voxel_offset)
    whole = zmesh.Mesher(voxel[::-1])
    whole.mesh(np.asfortranarray(labels.transpose(2, 1, 0)), close=False)
    info = json.loads((tmp_path / "seg" / "info").read_text())
    assert info["mesh"] == "mesh" and json.loads((tmp_path / "seg" / "mesh" / "info").read_text())["@type"] == (
        "neuroglancer_legacy_mesh")
    cloud = CloudVolume(f"file://{tmp_path}/seg")
    spanned = 0
    for label in range(1, result.instances + 1):
        manifest = json.loads((tmp_path / "seg" / "mesh" / f"{label}:0").read_text())["fragments"]
        widened = [b.id for b in plan.grid
                   if (labels[b.core.grow(0, 1).intersect(plan.grid.roi).slices] == label).any()]
        assert manifest == [f"{label}:0:{b}" for b in widened]  # every block whose widened core holds it
        blocks = np.unique(owner_blocks(plan.grid, plan.grid.roi)[labels == label])
        spanned = max(spanned, len(blocks))
        expected = whole.get(label, normals=False, voxel_centered=True)
        mesh = cloud.mesh.get(label, remove_duplicate_vertices=False)
        assert _area(mesh.vertices, mesh.faces) == pytest.approx(_area(expected.vertices, expected.faces), rel=1e-5)
        np.testing.assert_allclose(mesh.vertices.min(0), expected.vertices.min(0) + offset[::-1] * voxel[::-1])
    assert spanned >= 3
