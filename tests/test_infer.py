"""Tiled inference engine: tile geometry, resampling, cancel, out-of-memory retry, devices."""

import copy
import dataclasses
import itertools
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial import cKDTree

from napari_spine_tracker.core.decode import DEFAULT_DECODE
from napari_spine_tracker.core.detect import detect_series
from napari_spine_tracker.core.devices import get_device
from napari_spine_tracker.core.infer import (
    InferenceOptions,
    plan_tiles,
    predict_series,
    session_chunks,
    session_cuts,
)
from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION, grid_scale, read_resampled
from napari_spine_tracker.core.model import SpineNet, build_config
from napari_spine_tracker.core.models import LoadedModel
from napari_spine_tracker.errors import Cancelled, InputError


@pytest.fixture
def random_model():
    """A tiny untrained network with a threshold low enough that it reports peaks."""
    torch.manual_seed(0)
    net = SpineNet(build_config("tiny")).eval()
    with torch.no_grad():
        net.heads["heatmap"].bias.fill_(0.0)
    return LoadedModel(net, torch.device("cpu"), (0.5, 0.1, 0.1), dict(DEFAULT_NORMALIZATION),
                       dict(DEFAULT_DECODE, threshold=0.3))


def _assert_cores_partition(plan, shape, halo=None):
    """Every voxel of ``shape`` in exactly one tile's core; with ``halo``, each core has at least
    that much context on every side of a cut axis (or the volume's edge)."""
    covered = np.zeros(shape, int)
    for tile in plan.tiles:
        covered[tuple(slice(o + k.start, o + k.stop) for o, k in zip(tile.origin, tile.keep))] += 1
        if halo is not None:
            for n, o, k, h, size in zip(shape, tile.origin, tile.keep, halo, plan.input_shape):
                assert (k.start >= h or o + k.start == 0) and (size - k.stop >= h or o + k.stop == n), tile
    assert (covered == 1).all()


@pytest.mark.parametrize(("shape", "max_input"), [((20, 100, 70), (64, 48, 48)), ((10, 30, 200), (8, 64, 64))])
def test_tile_cores_partition_the_volume(shape, max_input):
    plan = plan_tiles(shape, max_input, halo=(2, 8, 8), multiple=(4, 16, 16))
    assert all(n % m == 0 for n, m in zip(plan.input_shape, (4, 16, 16)))
    assert all(k.stop <= n for tile in plan.tiles for k, n in zip(tile.keep, plan.input_shape))
    _assert_cores_partition(plan, shape)


@pytest.mark.parametrize("shape", [(20, 100, 70), (33, 530, 517), (10, 30, 200)])
def test_tiles_are_aligned_to_the_networks_grid(shape):
    """With ``align``, every tile origin is a multiple of it (the network's total stride), each
    core has at least ``halo`` context on both sides, and the cores still partition the volume."""
    align, halo = (4, 16, 16), (4, 24, 24)
    plan = plan_tiles(shape, (16, 128, 128), halo, align=align)
    assert all(o % a == 0 for tile in plan.tiles for o, a in zip(tile.origin, align))
    _assert_cores_partition(plan, shape, halo)
    assert max(plan.input_shape) <= 128


@pytest.mark.parametrize("shape", [(33, 268, 273), (34, 530, 517), (10, 30, 200)])
def test_mirrored_tiles_leave_the_whole_volumes_remainder(shape):
    """For mirror views, a cut axis's tiles leave the remainder (by the stride) of one tile for the
    whole volume, stay within the budget, and still partition the volume with their halos."""
    align, halo, multiple = (4, 16, 16), (4, 16, 16), (1, 2, 2)
    budget = (16, 128, 128)
    whole = plan_tiles(shape, (64, 4096, 4096), halo, multiple, align, mirrored=True)
    plan = plan_tiles(shape, budget, halo, multiple, align, mirrored=True)
    assert len(plan.tiles) > 1
    for n, size, one, limit, a, m in zip(shape, plan.input_shape, whole.input_shape, budget, align, multiple):
        if n > limit:  # a cut axis
            assert size % m == 0 and (size - one) % a == 0 and size <= limit
        else:
            assert size == one
    _assert_cores_partition(plan, shape, halo)


def test_tiles_too_small_for_an_aligned_halo_are_refused_with_the_size_that_works():
    with pytest.raises(InputError, match="at least 72 voxels"):
        plan_tiles((32, 300, 300), (64, 64, 64), (4, 24, 24), align=(4, 16, 16))
    assert plan_tiles((32, 300, 300), (64, 72, 72), (4, 24, 24), align=(4, 16, 16)).input_shape == (32, 72, 72)


def test_peaks_next_to_tile_cores_fill_in_only_what_no_core_holds():
    """Near a seam two tiles may each put a spine's peak in the other's core; the peaks they find
    next to their cores come along, and only where no other tile's peak has its output voxel
    within the suppression window does one stay (the higher of two such)."""
    from napari_spine_tracker.core.infer import _join_seams

    table = pd.DataFrame({"t": [0, 0, 0, 0, 0, 1, 0, 0], "score": [0.5, 0.6, 0.7, 0.7, 0.4, 0.5, 0.6, 0.45]})
    # output voxels (model voxels, on a 1 x 2 x 2 grid); the window: 1 x 4 x 4
    places = np.array([[5, 32, 10], [5, 30, 10], [10, 50, 10], [10, 50, 10], [20, 70, 10], [5, 32, 10],
                       [10, 54, 10], [5, 36, 10]], float)
    tile = np.array([1, 0, 0, 1, 0, 1, 1, 0])
    own = np.array([False, False, True, False, False, False, True, False])  # in its tile's core
    joined = _join_seams(table, tile, own, places, (1, 4, 4))
    # dropped: the lower of the pair each put in the other's core (row 0) and the twin of tile 0's
    # core peak (row 3); kept: both core peaks (rows 2, 6: cores never overrule each other), a lone
    # peak next to a core (row 4), the same place in another session (row 5), and tile 0's second
    # peak beside row 1 (row 7: within the window of row 0 only, which a higher peak dropped)
    expected = table.iloc[[1, 2, 4, 5, 6, 7]].reset_index(drop=True)
    pd.testing.assert_frame_equal(joined, expected)
    cores = table.iloc[[2, 6]].reset_index(drop=True)  # core peaks only: nothing to join
    pd.testing.assert_frame_equal(_join_seams(cores, np.array([0, 1]), np.array([True, True]), places[[2, 6]],
                                              (1, 4, 4)), cores)


def test_a_volume_slightly_larger_than_a_tile_costs_little_more():
    """268 x 273 (a 256 x 256 field that drifted) with 256-voxel tiles: 2 x 2 tiles, but small ones."""
    plan = plan_tiles((33, 268, 273), (64, 256, 256), halo=(4, 24, 24), multiple=(4, 16, 16))
    assert len(plan.tiles) == 4 and plan.input_shape == (36, 192, 192)
    read = len(plan.tiles) * np.prod(plan.input_shape)
    assert read < 2.2 * 33 * 268 * 273  # 2.2x the volume; the old plan read 4 tiles of 256 x 256: 3.9x
    assert plan_tiles((33, 268, 273), (64, 384, 384), (4, 24, 24), (4, 16, 16)).input_shape == (36, 272, 288)
    # inference rounds nothing up (the network takes any size): one tile of exactly the volume
    assert plan_tiles((33, 268, 273), (64, 384, 384), (4, 24, 24)).input_shape == (33, 268, 273)


def test_read_resampled_identity_and_linear():
    rng = np.random.default_rng(1)
    volume = rng.random((6, 20, 30)).astype(np.float32)
    block = read_resampled(volume, (-1, 5, 25), (4, 8, 8), (1.0, 1.0, 1.0), fill=-7)
    assert block[0].min() == -7 and (block[1:, :, :5] == volume[0:3, 5:13, 25:30]).all()
    assert (block[1:, :, 5:] == -7).all()
    # a linear ramp along x stays linear when resampled to a twice finer grid
    ramp = np.broadcast_to(np.arange(30, dtype=np.float32), (6, 20, 30))
    fine = read_resampled(ramp, (0, 0, 10), (6, 20, 20), (1.0, 1.0, 2.0), fill=0)
    expected = (np.arange(10, 30) + 0.5) / 2 - 0.5
    np.testing.assert_allclose(fine[3, 4], expected, atol=1e-5)


def test_grid_scale_tolerance():
    assert grid_scale((0.5, 0.094, 0.094), (0.5, 0.1, 0.1)) == (1.0, 1.0, 1.0)
    assert grid_scale((1.0, 0.2, 0.2), (0.5, 0.1, 0.1)) == (2.0, 2.0, 2.0)


def test_one_session_input(random_model):
    volume = np.random.default_rng(2).poisson(5, (8, 48, 48)).astype(np.uint16)
    table = detect_series(volume, (0.5, 0.1, 0.1), model=random_model)
    assert len(table) > 0 and (table["t"] == 0).all()
    assert list(table.columns[:7]) == ["track_id", "t", "z", "y", "x", "score", "status"]
    assert ((table[["z", "y", "x"]] > -1).all(axis=None)) and (table["y"] < 48).all() and (table["x"] < 48).all()


def test_gpu_memory_is_released_when_a_run_ends_cancelled_too(random_model, monkeypatch):
    from napari_spine_tracker.core import devices

    released = []
    monkeypatch.setattr(devices, "free_memory", lambda device: released.append(device.type))
    series = np.random.default_rng(3).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    detect_series(series, (0.5, 0.1, 0.1), model=random_model)
    assert released == ["cpu"]  # on the CPU it frees nothing (devices.free_memory)
    with pytest.raises(Cancelled):
        detect_series(series, (0.5, 0.1, 0.1), model=random_model, should_stop=lambda: True)
    assert released == ["cpu", "cpu"]


def test_cancel_mid_run(random_model):
    series = np.random.default_rng(3).poisson(5, (3, 8, 48, 48)).astype(np.uint16)
    calls = []

    def should_stop():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        detect_series(series, (0.5, 0.1, 0.1), model=random_model, should_stop=should_stop)
    assert len(calls) == 3  # it stopped at the first poll that asked it to


def test_progress_reaches_total(random_model):
    series = np.random.default_rng(3).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    seen = []
    detect_series(series, (0.5, 0.1, 0.1), model=random_model, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and all(b >= a for (a, _), (b, _) in itertools.pairwise(seen))


def test_out_of_memory_retries_smaller(random_model, monkeypatch):
    series = np.random.default_rng(4).poisson(5, (2, 8, 64, 64)).astype(np.uint16)
    options = InferenceOptions(max_tile=(16, 48, 48), halo=(0, 8, 8), batch_size=1)
    expected = predict_series(series, (0.5, 0.1, 0.1), random_model, options=options)
    forward = random_model.net.forward_sessions
    batches = []

    def flaky_forward(x, previous, state, **kwargs):
        batches.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(x, previous, state, **kwargs)

    monkeypatch.setattr(random_model.net, "forward_sessions", flaky_forward)
    got = predict_series(series, (0.5, 0.1, 0.1), random_model,
                         options=InferenceOptions(max_tile=(16, 48, 48), halo=(0, 8, 8), batch_size=2))
    assert batches[0] == 2 and batches[-1] == 1  # tried a batch of 2, finished with batches of 1
    assert len(got) > 0
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("views", [1, 4])
def test_reduced_precision_that_overflows_runs_again_in_float32(random_model, monkeypatch, views):
    from napari_spine_tracker.core import infer

    series = np.random.default_rng(4).poisson(5, (2, 8, 64, 64)).astype(np.uint16)
    expected = predict_series(series, (0.5, 0.1, 0.1), random_model, options=InferenceOptions(views=views))
    forward = random_model.net.forward_sessions
    calls = []

    def overflowing_forward(x, previous, state, **kwargs):  # as fp16 would on extreme input, the first time
        outputs, state = forward(x, previous, state, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            outputs = {**outputs, "heatmap": outputs["heatmap"] * float("inf")}
        return outputs, state

    # the check runs only where reduced precision does (CUDA); here it stands in for it
    monkeypatch.setattr(infer, "_reduced_precision", lambda device, options: options.precision != "float32")
    monkeypatch.setattr(random_model.net, "forward_sessions", overflowing_forward)
    got = predict_series(series, (0.5, 0.1, 0.1), random_model, options=InferenceOptions(views=views))
    assert len(calls) > 1 and len(got) > 0
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), atol=1e-4, equal_nan=True)


def test_inference_precision_choices():
    from types import SimpleNamespace

    from napari_spine_tracker.core.devices import inference_autocast

    with inference_autocast(torch.device("cpu"), "float16"):  # no autocast off CUDA
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(InputError, match="precision"):
        inference_autocast(SimpleNamespace(type="cuda"), "float8")


def test_session_chunks_carry_state(random_model):
    """Running sessions one by one or four at a time gives the same detections."""
    series = np.random.default_rng(7).poisson(5, (5, 8, 32, 32)).astype(np.uint16)
    one = predict_series(series, (0.5, 0.1, 0.1), random_model, options=InferenceOptions(session_chunk=1))
    four = predict_series(series, (0.5, 0.1, 0.1), random_model, options=InferenceOptions(session_chunk=4))
    assert len(one) > 0 and set(one["t"]) == set(range(5))
    np.testing.assert_allclose(one.to_numpy(float), four.to_numpy(float), atol=1e-4, equal_nan=True)
    default = predict_series(series, (0.5, 0.1, 0.1), random_model)  # on the CPU: 3 + 2
    np.testing.assert_allclose(one.to_numpy(float), default.to_numpy(float), atol=1e-4, equal_nan=True)


def test_session_chunks_by_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def sizes(t_count, chunk, device):
        groups = session_chunks(t_count, chunk, device)
        assert [t for g in groups for t in g] == list(range(t_count))  # every session once, in order
        return [len(g) for g in groups]

    # CPU: pairs, one group of three for an odd count, never a lone session after the first
    assert [sizes(n, None, cpu) for n in range(1, 9)] == [[1], [2], [3], [2, 2], [3, 2], [2, 2, 2], [3, 2, 2],
                                                           [2, 2, 2, 2]]
    # GPU: up to 8 in equal groups
    assert sizes(6, None, cuda) == [6] and sizes(10, None, cuda) == [5, 5] and sizes(17, None, cuda) == [6, 6, 5]
    # an explicit size: at most that many, as equal as possible, on any device
    assert sizes(6, 4, cpu) == [3, 3] and sizes(7, 4, cuda) == [4, 3] and sizes(5, 1, cpu) == [1] * 5
    assert sizes(0, None, cpu) == []


def test_batchnorm_folding_keeps_outputs(random_model):
    from napari_spine_tracker.core.model import fuse_for_inference

    net = SpineNet(build_config("tiny"))
    for module in net.modules():  # give BatchNorm non-trivial statistics
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = torch.randn(1, 2, 1, 8, 32, 32)
    with torch.no_grad():
        before = net(x)
        after = fuse_for_inference(net)(x)
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-4, rtol=1e-4)


def test_content_that_drifted_into_a_session_is_analysed(random_model):
    """Session 1's field moved +24 voxels in x: its first 24 columns (not in session 0's field)
    are tiled and searched too."""
    series = np.random.default_rng(8).poisson(5, (2, 8, 48, 64)).astype(np.uint16)
    drift = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -24.0]])  # a point at p in session 0 is at p - 24 in session 1
    table = predict_series(series, (0.5, 0.1, 0.1), random_model, drift_vox=drift)
    second = table[table["t"] == 1]
    assert (second["x"] > 40).any() and (second["x"] < 20).any()
    assert (second["x"] > -0.5).all() and (second["x"] < 63.5).all()


def test_each_session_is_cut_to_its_own_field():
    stride = (4, 16, 16)
    # three sessions drifted in y and x within a tile of 34 x 300 x 290 that covers their union
    fields = [((1, 0, 30), (33, 256, 286)), ((0, 40, 0), (32, 296, 256)), ((2, 20, 17), (34, 276, 273))]
    shape, at = session_cuts(fields, (34, 300, 290), stride)
    assert shape[0] == 34  # z: no cut would be smaller than the tile
    assert shape[1] < 300 and shape[2] < 290
    assert (at % np.array(stride) == 0).all()
    for (low, high), start in zip(fields, at, strict=True):
        assert (start <= low).all() and (start + shape >= high).all()  # the cut holds the field
    # past the tile's last voxel, never past its last coarsest-level voxel (the state's field)
    assert (at + shape <= -(-np.array([34, 300, 290]) // stride) * stride).all()
    # one field: nothing to gain; a session without data in the tile takes any cut
    assert session_cuts([((0, 0, 0), (34, 300, 290))], (34, 300, 290), stride) is None
    shape2, at2 = session_cuts([*fields, ((0, 0, 0), (0, 0, 0))], (34, 300, 290), stride)
    assert shape2 == shape and (at2[-1] == 0).all()
    assert session_cuts([((0, 0, 0), (0, 0, 0))], (34, 300, 290), stride) is None


def test_cutting_sessions_to_their_fields_finds_the_same_spines():
    """A drifting series: each session run on its own field (the default) or all on the union of
    the fields give the same detections (they differ only in the padding outside a field)."""
    from napari_spine_tracker.core import infer
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.register import estimate_motion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model("spinenet-synth", device="cpu")
    series = synthesize_series(SynthConfig.preset("large_drift", seed=3, sessions=4, shape=(16, 128, 128)))
    voxel = np.array(series.voxel_size_um)
    motion = estimate_motion(series.image, voxel)
    cuts = []
    real_cuts = infer.session_cuts

    def spy(fields, input_shape, stride):
        cuts.append((real_cuts(fields, input_shape, stride), input_shape))
        return cuts[-1][0]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(infer, "session_cuts", spy)
        cut = predict_series(series.image, voxel, model, motion=motion)
    union = predict_series(series.image, voxel, model, motion=motion, options=InferenceOptions(cut_sessions=False))
    (cut_shape, _), union_shape = cuts[0]
    assert np.prod(cut_shape) < 0.9 * np.prod(union_shape)  # the network ran on less than the union
    assert len(union) > 20 and abs(len(cut) - len(union)) <= 0.05 * len(union)
    matched = 0
    for t in range(4):
        a = cut.loc[cut.t == t, ["z", "y", "x"]].to_numpy() * voxel
        b = union.loc[union.t == t, ["z", "y", "x"]].to_numpy() * voxel
        if len(a) and len(b):
            distance, _ = cKDTree(b).query(a)
            matched += int((distance < 0.1).sum())
    assert matched >= 0.95 * len(union)


def test_padded_sessions_drop_detections_outside(random_model):
    series = np.random.default_rng(5).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    table = predict_series(series, (0.5, 0.1, 0.1), random_model, session_shapes=[(8, 48, 48), (8, 24, 24)])
    second = table[table["t"] == 1]
    assert len(table[table["t"] == 0]) > 0
    assert (second["y"] <= 23.5).all() and (second["x"] <= 23.5).all()


def test_bad_inputs_are_explained(random_model):
    with pytest.raises(InputError, match="voxel size is unknown"):
        detect_series(np.zeros((2, 8, 32, 32), np.uint16), None, model=random_model)
    with pytest.raises(InputError, match="dimensions"):
        detect_series(np.zeros((32, 32), np.uint16), (0.5, 0.1, 0.1), model=random_model)
    with pytest.raises(InputError, match="positive"):
        detect_series(np.zeros((1, 8, 32, 32), np.uint16), (0.5, 0, 0.1), model=random_model)
    with pytest.raises(InputError, match="max_rotation_deg must be an angle"):
        detect_series(np.zeros((1, 8, 32, 32), np.uint16), (0.5, 0.1, 0.1), model=random_model,
                      max_rotation_deg=float("nan"))
    # linking choices are refused before the network runs, not after
    for bad in (dict(gate_um=0.0), dict(gate_um="far"), dict(max_gap=-1), dict(max_gap=1.5)):
        with pytest.raises(InputError, match=r"gate_um must be 'auto' or a positive|max_gap must be a whole"):
            detect_series(np.zeros((2, 8, 32, 32), np.uint16), (0.5, 0.1, 0.1), model=random_model,
                          should_stop=lambda: pytest.fail("detection started"), **bad)


def test_device_choice():
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="unknown device"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            get_device("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(random_model):
    series = np.random.default_rng(6).poisson(5, (2, 8, 64, 64)).astype(np.uint16)
    cpu = predict_series(series, (0.5, 0.1, 0.1), random_model)
    gpu_model = LoadedModel(random_model.net.to("cuda"), torch.device("cuda"), random_model.voxel_size_um,
                            random_model.normalization, random_model.decode)
    gpu = predict_series(series, (0.5, 0.1, 0.1), gpu_model)
    assert abs(len(gpu) - len(cpu)) <= max(2, 0.1 * len(cpu))  # bf16 autocast moves a few borderline peaks


def _turn_yx(degrees: float, zoom: float = 1.0) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * zoom


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_turned_planes_are_sampled_alike_on_cuda():
    from napari_spine_tracker.core.intensity import affine_grid_yx, sample_planes_yx

    planes = np.random.default_rng(7).random((5, 40, 50)).astype(np.float32)
    args = (_turn_yx(2.0, 0.5), np.array([3.0, -2.0]), (70, 90), planes.shape[1:])
    cpu = sample_planes_yx(planes, affine_grid_yx(*args), padding="border")
    gpu = sample_planes_yx(planes, affine_grid_yx(*args, device="cuda"), padding="border")
    np.testing.assert_allclose(gpu, cpu, atol=1e-4)


def test_the_sampling_grid_puts_each_output_pixel_where_its_map_says():
    """affine_grid_yx's grid, read back in source pixels, is ``matrix @ u + offset`` for every output
    pixel u (y, x), for one map and for several, sources of one pixel included; grid_inside tells
    which points lie within bounds."""
    from napari_spine_tracker.core.intensity import affine_grid_yx, grid_inside

    matrices = np.stack([_turn_yx(-3.0, 1.3), _turn_yx(20.0, 0.7), np.array([[1.0, 0.0], [0.0, 2.0]])])
    offsets = np.array([[4.0, -1.5], [-2.0, 30.0], [0.5, 0.25]])
    shape, source = (23, 31), (40, 1)
    u = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1).astype(float)
    expected = np.einsum("nij,hwj->nhwi", matrices, u) + offsets[:, None, None]  # (N, h, w, y x)
    grid = affine_grid_yx(matrices, offsets, shape, source).numpy()
    assert grid.shape == (3, *shape, 2)
    in_pixels = (grid[..., ::-1] + 1) * np.maximum(np.array(source) - 1, 1) / 2
    np.testing.assert_allclose(in_pixels, expected, atol=1e-4)
    one = affine_grid_yx(matrices[1], offsets[1], shape, source).numpy()
    np.testing.assert_allclose(one[0], grid[1], atol=1e-6)
    inside = grid_inside(torch.from_numpy(grid), source, (0.0, -5.0), (20.0, 5.0)).numpy()
    truth = (expected[..., 0] >= 0) & (expected[..., 0] <= 20) & (np.abs(expected[..., 1]) <= 5)
    assert 0 < truth.sum() < truth.size
    # points within 1e-4 pixel of a bound may go either way in float32
    y, x = expected[..., 0], expected[..., 1]
    near = np.minimum.reduce([np.abs(y), np.abs(y - 20), np.abs(np.abs(x) - 5)])
    np.testing.assert_array_equal(inside[near > 1e-4], truth[near > 1e-4])


def test_sets_of_points_are_sampled_in_one_call_as_one_by_one():
    """Planes sampled at N sets of points at once (registration's turn search tries its angles so)
    give each set's own samples, as NumPy arrays or as tensors."""
    from napari_spine_tracker.core.intensity import affine_grid_yx, sample_planes_yx

    planes = np.random.default_rng(8).random((2, 30, 40)).astype(np.float32)
    matrices = np.stack([_turn_yx(a) for a in (-3.0, 0.0, 1.5)])
    offsets = np.array([[1.0, -2.0]] * 3)
    one_by_one = np.concatenate([sample_planes_yx(planes, affine_grid_yx(m, o, (25, 35), planes.shape[1:]))
                                 for m, o in zip(matrices, offsets)])
    grid = affine_grid_yx(matrices, offsets, (25, 35), planes.shape[1:])
    at_once = sample_planes_yx(planes, grid)
    assert at_once.shape == (3, 2, 25, 35)
    np.testing.assert_array_equal(at_once, one_by_one)
    np.testing.assert_array_equal(sample_planes_yx(torch.from_numpy(planes), grid).numpy(), one_by_one)
    assert not np.array_equal(one_by_one[0], one_by_one[2])


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_percentiles_by_counting_equal_numpy(dtype):
    from napari_spine_tracker.core.intensity import percentiles

    values = np.random.default_rng(2).integers(0, 3000, (5, 40, 41)).astype(dtype)
    q = [0, 25, 50, 99.8, 100]
    np.testing.assert_allclose(percentiles(values, q), np.percentile(values.astype(np.float64), q))


def test_large_buffers_are_reused_during_detection_and_given_back_after():
    """Under glibc, a large buffer freed inside ``reuse_freed_memory`` stays in the heap for the
    next tile (no fresh memory map, so no page faults), and the heap is trimmed on exit."""
    import ctypes

    from napari_spine_tracker.core.devices import _glibc, reuse_freed_memory

    libc = _glibc()
    if libc is None:
        pytest.skip("not glibc: reuse_freed_memory does nothing (see the test below)")
    # mallinfo2 (glibc >= 2.33) has size_t fields; the older mallinfo has int ones (enough for 64 MB)
    field = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
    stats = libc.mallinfo2 if hasattr(libc, "mallinfo2") else libc.mallinfo

    class MallInfo(ctypes.Structure):
        _fields_ = [(name, field) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    stats.restype = MallInfo
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:  # bytes of this process in RAM
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    size = 64 << 20
    before = resident()
    with reuse_freed_memory(), reuse_freed_memory():  # nested uses share the setting
        buffer = np.ones(size // 8)
        assert stats().hblkhd < size  # not a memory map
        del buffer
        assert stats().fordblks >= size  # kept, free, for the next allocation ...
        assert resident() - before > 0.9 * size  # ... and still in RAM
    # given back on exit (measured in RAM: free memory left in the heap by earlier tests can sit
    # below the top of the heap, where trimming returns its pages but the heap keeps counting it)
    assert resident() - before < 0.25 * size
    # large blocks are mapped again. glibc carves a block from a free chunk of the heap that fits
    # before it maps one, and a free chunk below a live allocation stays in the heap after the trim
    # (how many there are depends on the tests before this one), so ask for more than all of them
    larger = stats().fordblks + size
    buffer = np.empty(larger // 8)  # not written: address space, no RAM
    assert stats().hblkhd >= larger
    del buffer


def test_without_glibc_heap_reuse_does_nothing(random_model, monkeypatch):
    """Where the C library is not glibc (macOS, Windows, musl) detection runs the same, with the
    allocator left alone."""
    from napari_spine_tracker.core import devices

    series = np.random.default_rng(4).poisson(5, (2, 8, 64, 64)).astype(np.uint16)
    expected = predict_series(series, (0.5, 0.1, 0.1), random_model)
    monkeypatch.setattr(devices, "_glibc", lambda: None)
    got = predict_series(series, (0.5, 0.1, 0.1), random_model)
    np.testing.assert_allclose(got.to_numpy(float), expected.to_numpy(float), equal_nan=True)
    assert devices._heap_users == 0


def test_mirror_views_make_the_heatmap_mirror_equivariant(random_model):
    """Averaging over the four xy mirror images (each with its own ConvLSTM state) gives a
    heatmap that mirrors exactly with the input; it would not if a view were flipped back wrong."""
    from napari_spine_tracker.core.infer import VIEW_FLIPS, _forward_views

    net = random_model.net
    x = torch.randn(1, 3, 1, 8, 32, 48)
    plain = net.forward_sessions(x, point_heads=True)[0]["heatmap"]
    with torch.inference_mode():
        averaged = _forward_views(net, x, None, [None] * 4)[0]["heatmap"]
        for flip in VIEW_FLIPS[1:]:
            of_mirror = _forward_views(net, x.flip(flip), None, [None] * 4)[0]["heatmap"]
            torch.testing.assert_close(of_mirror, averaged.flip(flip), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(net.forward_sessions(x.flip((-1,)), point_heads=True)[0]["heatmap"],
                                  plain.flip((-1,)), atol=1e-3), "the network alone is not equivariant"
        # and the state after the views goes on: sessions one at a time give the same heatmap
        states, previous, parts = [None] * 4, None, []
        for t in range(3):
            out, states = _forward_views(net, x[:, t : t + 1], previous, states)
            parts.append(out["heatmap"])
            previous = x[:, t]
        torch.testing.assert_close(torch.cat(parts, dim=1), averaged, atol=1e-5, rtol=1e-5)


def test_views_run_on_odd_sizes_and_are_checked(random_model):
    series = np.random.default_rng(3).poisson(5, (2, 7, 33, 45)).astype(np.uint16)
    plain = predict_series(series, (0.5, 0.1, 0.1), random_model)
    mirrored = predict_series(series, (0.5, 0.1, 0.1), random_model, options=InferenceOptions(views=4))
    assert len(plain) > 0 and len(mirrored) > 0
    for table in (plain, mirrored):  # every point inside its session, though tiles were rounded up to even
        assert table[["z", "y", "x"]].min().min() >= -0.5
        assert (table[["z", "y", "x"]].max().to_numpy() <= np.array(series.shape[1:]) - 0.5).all()
    for bad in (3, 0, True, "4"):
        with pytest.raises(InputError, match="views must be 1, 2 or 4"):
            InferenceOptions(views=bad)
    with pytest.raises(InputError, match="views must be"):
        detect_series(series, (0.5, 0.1, 0.1), model=random_model, views=8)


def test_a_turned_session_is_read_and_mapped_back_through_its_motion():
    from scipy import ndimage

    from napari_spine_tracker.core.infer import _Frames, read_turned
    from napari_spine_tracker.core.intensity import read_resampled
    from napari_spine_tracker.core.register import RigidMotion

    rng = np.random.default_rng(0)
    volume = ndimage.gaussian_filter(rng.random((14, 80, 100)).astype(np.float32), 1.5)
    voxel, scale = np.array([0.5, 0.2, 0.2]), np.array([1.0, 2.0, 2.0])
    centre = np.array([6.5, 39.5, 49.5])
    # no turn: the same block as the plain reader at the rounded shift
    still = RigidMotion(np.array([[0, 0, 0], [1.0, 2.0, -3.0]]), np.zeros(2), centre, voxel)
    np.testing.assert_allclose(read_turned(volume, still, 1, (2, 10, -6), (8, 60, 70), scale, fill=-1),
                               read_resampled(volume, (3, 14, -12), (8, 60, 70), (1.0, 2.0, 2.0), fill=-1),
                               atol=1e-6)
    # a turn: the same values as scipy's affine map, where both are inside the volume
    motion = RigidMotion(np.array([[0, 0, 0], [0.3, 2.2, -3.1]]), np.radians([0.0, 2.0]), centre, voxel)
    origin, shape = np.array([2, 10, -6]), (8, 60, 70)
    linear = motion.linear_vox(1)
    matrix = linear / scale[None]
    offset = linear @ ((origin + 0.5) / scale - 0.5 - centre) + centre + motion.drift_vox[1]
    expected = ndimage.affine_transform(volume, matrix, offset=offset, output_shape=shape, order=1, cval=-1)
    turned = read_turned(volume, motion, 1, origin, shape, scale, fill=-1)
    both = ndimage.binary_erosion((turned != -1) & (expected > -0.01), iterations=2)
    assert both.mean() > 0.3
    np.testing.assert_allclose(turned[both], expected[both], atol=1e-5)
    # a bright point read through the motion and mapped back lands where it is in the session
    point = np.zeros((14, 80, 100), np.float32)
    at = np.array([7.0, 31.0, 62.0])
    point[tuple(at.astype(int))] = 1.0
    frames = _Frames(motion, scale, point.shape)
    low, high = frames.box(1)
    block = frames.read(ndimage.gaussian_filter(point, 1.0), 1, low, tuple(high - low), 0.0)
    peak = np.array(np.unravel_index(np.argmax(block), block.shape), float)
    window = tuple(slice(int(p) - 2, int(p) + 3) for p in peak)
    weights = block[window]
    centroid = np.array([(weights * g).sum() / weights.sum() for g in np.meshgrid(
        *[np.arange(s.start, s.stop) for s in window], indexing="ij")])
    np.testing.assert_allclose(frames.to_native(centroid + low, 1), at, atol=0.3)


def test_a_turned_session_gives_the_same_spines_through_the_whole_detection():
    from scipy import ndimage
    from scipy.spatial import cKDTree

    from napari_spine_tracker.core.infer import predict_series
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.register import RigidMotion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model("spinenet-synth", device="cpu")
    series = synthesize_series(SynthConfig.preset("default", seed=5, sessions=1, shape=(16, 160, 160)))
    volume, voxel = series.image[0].astype(np.float32), np.array(series.voxel_size_um)
    centre = 0.5 * (np.array(volume.shape) - 1)
    motion = RigidMotion(np.zeros((2, 3)), np.radians([0.0, 4.0]), centre, voxel)
    # session 1 shows the same tissue turned by 4 degrees (at q it shows what the reference shows
    # at motion.to_reference(q))
    back = np.linalg.inv(motion.linear_vox(1))
    turned = ndimage.affine_transform(volume, back, offset=centre - back @ centre, order=3, mode="nearest")
    still = predict_series(np.stack([volume, volume]), voxel, model)
    moved = predict_series(np.stack([volume, turned]), voxel, model, motion=motion)
    expected = still.loc[still.t == 1, ["z", "y", "x"]].to_numpy()
    found = motion.to_reference(moved.loc[moved.t == 1, ["z", "y", "x"]].to_numpy(), 1)
    assert len(expected) > 10 and abs(len(found) - len(expected)) <= 0.15 * len(expected)
    distance_um, _ = cKDTree(expected * voxel).query(found * voxel)
    assert np.median(distance_um) < 0.2 and (distance_um < 0.5).mean() > 0.85, distance_um


def _turned_motion(shape, voxel):
    from napari_spine_tracker.core.register import RigidMotion

    centre = 0.5 * (np.array(shape[1:], float) - 1)
    return RigidMotion(np.array([[0, 0, 0], [0.4, 3.2, -2.6], [-0.2, -4.1, 1.7]]), np.radians([0.0, 0.0, 2.5]),
                       centre, np.asarray(voxel))


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8, np.float32, np.float64])
@pytest.mark.parametrize(("voxel", "turned"), [((0.5, 0.1, 0.1), False), ((0.7, 0.13, 0.085), False),
                                                 ((0.5, 0.1, 0.1), True)])
def test_a_series_held_on_the_device_gives_the_same_detections(random_model, dtype, voxel, turned):
    """Tiles cut, resampled and normalised from the series held as a tensor (on a GPU: in its
    memory) are those read on the CPU: the same detections, to the bit; 16-bit data above 32767
    (held as int16 bits) included."""
    rng = np.random.default_rng(11)
    top = 255 if dtype == np.uint8 else 60000
    series = (rng.random((3, 10, 70, 80)) * top).astype(dtype)
    motion = _turned_motion(series.shape, voxel) if turned else None
    options = InferenceOptions(max_tile=(16, 48, 48), halo=(2, 8, 8))
    on_cpu = predict_series(series, voxel, random_model, motion=motion,
                            options=dataclasses.replace(options, resident=False))
    held = predict_series(series, voxel, random_model, motion=motion,
                          options=dataclasses.replace(options, resident=True))
    assert len(on_cpu) > 20
    np.testing.assert_array_equal(held.to_numpy(float), on_cpu.to_numpy(float))


def test_device_sessions_hold_the_stored_form_and_read_like_numpy():
    from napari_spine_tracker.core.infer import DeviceSessions, _SessionView
    from napari_spine_tracker.core.intensity import read_resampled_tensor

    data = np.array([[[[0, 1], [32767, 32768]], [[40000, 65535], [7, 8]]]], np.uint16)
    held = DeviceSessions([_SessionView(data, 0)], torch.device("cpu"))
    assert held.volumes[0].dtype == torch.int16 and held.volumes[0].element_size() == 2
    block = held.read(0, (0, 0, 0), (2, 2, 2), (1.0, 1.0, 1.0), fill=-1)
    np.testing.assert_array_equal(block.numpy(), data[0].astype(np.float32))
    # a block reaching past the volume, resampled: the NumPy reader's values
    volume = np.random.default_rng(3).random((6, 20, 30)).astype(np.float32)
    for origin, shape, scale in [((-2, 5, 25), (8, 8, 12), (1.0, 1.0, 1.0)),
                                 ((1, -3, 10), (5, 30, 40), (1.2, 1.7, 1.3)),
                                 ((50, 0, 0), (2, 2, 2), (1.0, 2.0, 2.0))]:
        held = read_resampled_tensor(torch.from_numpy(volume), origin, shape, scale, -3.0)
        np.testing.assert_array_equal(held.numpy(), read_resampled(volume, origin, shape, scale, fill=-3.0))
    # stored size: what decides whether a series is held on a GPU (never on a CPU)
    assert DeviceSessions.stored_bytes(data, [(2, 2, 2)]) == 16
    assert DeviceSessions.stored_bytes(np.zeros((1, 2, 2, 2)), [(2, 2, 2)] * 3) == 96  # float64 as float32
    assert not DeviceSessions.worth_it(data, [(2, 2, 2)], torch.device("cpu"))


def test_staging_is_for_cuda_and_copies_as_they_are_without_page_locked_memory(monkeypatch, caplog):
    """Off CUDA sessions are copied as they are; where page-locked memory is refused, the staging
    says so once and copies each array as it is, with the same values."""
    from napari_spine_tracker.core.devices import PinnedStaging, as_stored_on

    assert PinnedStaging.for_device(torch.device("cpu")) is None and PinnedStaging.for_device(None) is None
    real_empty = torch.empty

    def refused(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("page-locked memory refused (simulated)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", refused)
    uint16 = np.array([[[0, 40000], [65535, 7]]], np.uint16)
    with PinnedStaging(torch.device("cpu")) as staging:
        for data in (uint16, uint16, uint16.astype(np.float64) / 7):  # float64 travels as float32
            held, to_float = as_stored_on(data, torch.device("cpu"), staging)
            assert held.shape == data.shape
            np.testing.assert_array_equal(to_float(held).numpy(), data.astype(np.float32))
    assert staging.refused and caplog.text.count("copying from pageable memory") == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [np.uint16, np.int8, np.float64])
def test_staged_copies_to_cuda_hold_what_was_read(dtype):
    """Arrays of many chunks through a ring of few buffers, and arrays smaller than one: each
    staged copy holds its own array (a buffer is not written again while its copy runs), as the
    copy from pageable memory does, and a series held this way is the series."""
    from napari_spine_tracker.core.devices import PinnedStaging, as_stored_on
    from napari_spine_tracker.core.infer import DeviceSessions, _SessionView

    rng = np.random.default_rng(5)
    sessions = [(rng.random((4 + t, 64, 64)) * 120).astype(dtype) for t in range(5)]
    for chunk in (4096, 8 << 20):  # 8-40 chunks per array through 4 buffers; one chunk each
        with PinnedStaging(torch.device("cuda"), chunk_bytes=chunk) as staging:
            staged = [as_stored_on(s, torch.device("cuda"), staging) for s in sessions]
        for session, (held, to_float) in zip(sessions, staged, strict=True):
            plain, plain_float = as_stored_on(session, torch.device("cuda"))
            assert held.is_cuda and held.dtype == plain.dtype and held.shape == plain.shape
            assert torch.equal(to_float(held), plain_float(plain))
        assert not staging.refused and staging.buffers == [None] * 4
    series = np.stack([s[:4] for s in sessions])
    held = DeviceSessions([_SessionView(series, t) for t in range(5)], torch.device("cuda"))
    for t in range(5):
        np.testing.assert_array_equal(held[t].cpu().numpy(), series[t].astype(np.float32))


@pytest.mark.parametrize(("dtype", "low", "top"), [(np.uint16, 100, 60000), (np.uint8, 0, 255), (np.int16, -900, 3000),
                                                  (np.uint32, 0, 2**25), (np.float32, -1.5, 9.5)])
def test_device_sessions_count_the_intensity_range_of_the_cpu(dtype, low, top):
    """Each session's (background, bright) taken on the device is the NumPy one: the same planes of a
    volume too large to read whole (a z stride of 2), the same percentiles (counted for whole numbers
    from 0 to 2**24, sorted otherwise)."""
    from napari_spine_tracker.core.infer import DeviceSessions, _SessionView
    from napari_spine_tracker.core.intensity import sample_step, session_range

    rng = np.random.default_rng(5)
    series = (low + rng.gamma(2.0, 0.05, (1, 40, 400, 300)) * (top - low)).clip(low, top).astype(dtype)
    assert sample_step(series.shape[1:]) == 2
    held = DeviceSessions([_SessionView(series, 0)], torch.device("cpu"))
    expected = session_range(series[0], DEFAULT_NORMALIZATION)
    assert held.range(0, DEFAULT_NORMALIZATION) == expected
    assert expected[1] > expected[0] > low


def test_out_of_memory_with_the_series_held_reads_it_from_where_it_is_first(random_model):
    from napari_spine_tracker.core.infer import _smaller

    options = InferenceOptions(max_tile=(16, 32, 32), batch_size=2, resident=True)
    gpu = LoadedModel(random_model.net, torch.device("meta"), random_model.voxel_size_um,
                      random_model.normalization, random_model.decode)
    first = _smaller(options, gpu)
    assert first.resident is False and first.batch_size == 2
    assert _smaller(first, gpu).batch_size == 1


def test_a_series_is_held_for_a_whole_run_only_where_it_can_be():
    from napari_spine_tracker.core.infer import DeviceSessions

    data, cpu = np.zeros((2, 4, 8, 8), np.uint16), torch.device("cpu")
    assert DeviceSessions.for_run(data, None, cpu, resident=None) is None  # auto: never on a CPU
    assert DeviceSessions.for_run(data, None, cpu, resident=False) is None
    # sessions of shapes of their own: registration reads the padded series, so it is not shared
    assert DeviceSessions.for_run(data, [(4, 8, 8), (4, 6, 8)], cpu, resident=True) is None
    held = DeviceSessions.for_run(data, [(4, 8, 8)] * 2, cpu, resident=True)
    assert held.shape == data.shape and held[1].dtype == torch.float32
    held.release()
    assert held.volumes == []


def test_a_series_that_does_not_fit_on_the_device_is_read_from_where_it_is(monkeypatch, caplog):
    from napari_spine_tracker.core.infer import DeviceSessions

    def out_of_memory(self, raw, staging=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DeviceSessions, "hold_on_device", out_of_memory)
    assert DeviceSessions.for_run(np.zeros((2, 4, 8, 8), np.uint16), None, torch.device("cpu"), resident=True) is None
    assert "reading it from where it is" in caplog.text


def test_out_of_memory_with_a_series_held_by_the_caller_lets_go_of_it(random_model, monkeypatch):
    """The first retry after running out of GPU memory reads the series from where it is, and the
    copy the caller held (for registration too) is let go of, not kept beside the smaller run."""
    from napari_spine_tracker.core import infer
    from napari_spine_tracker.core.infer import DeviceSessions
    from napari_spine_tracker.core.register import as_motion

    series = (np.random.default_rng(4).random((2, 10, 60, 60)) * 4000).astype(np.uint16)
    held = DeviceSessions.for_run(series, None, torch.device("cpu"), resident=True)
    given, real = [], infer._predict

    def runs_out_of_memory_once(*args, held=None, **kwargs):
        given.append(held)
        if len(given) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, held=held, **kwargs)

    monkeypatch.setattr(infer, "_predict", runs_out_of_memory_once)
    options = InferenceOptions(max_tile=(16, 48, 48), halo=(2, 8, 8), batch_size=2)
    table = predict_series(series, (0.5, 0.1, 0.1), random_model, options=options, held=held)
    assert given[0] is held and given[1] is None and held.volumes == []
    expected = real(series, (0.5, 0.1, 0.1), random_model, as_motion(None, None, 2, (0.5, 0.1, 0.1)), None,
                    dataclasses.replace(options, resident=False), None, None)
    pd.testing.assert_frame_equal(table, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_series_held_on_cuda_gives_the_cpu_tiles(random_model):
    from napari_spine_tracker.core.infer import DeviceSessions, _Frames, _SessionView
    from napari_spine_tracker.core.intensity import session_range
    from napari_spine_tracker.core.register import as_motion

    series = (np.random.default_rng(12).random((3, 10, 70, 80)) * 60000).astype(np.uint16)
    voxel = (0.5, 0.1, 0.1)
    assert DeviceSessions.worth_it(series, [series.shape[1:]] * 3, torch.device("cuda"))
    for motion in (as_motion(None, None, 3, voxel), _turned_motion(series.shape, voxel)):
        sessions = [_SessionView(series, t) for t in range(3)]
        on_cuda = DeviceSessions(sessions, torch.device("cuda"))
        assert [on_cuda.range(t, DEFAULT_NORMALIZATION) for t in range(3)] == \
            [session_range(s, DEFAULT_NORMALIZATION) for s in sessions]
        held = _Frames(motion, np.ones(3), series.shape[1:], device=torch.device("cuda"), resident=on_cuda)
        plain = _Frames(motion, np.ones(3), series.shape[1:])
        for t in range(3):
            block = held.read(sessions[t], t, (-1, -5, 7), (12, 60, 64), fill=3.0)
            assert block.is_cuda
            np.testing.assert_allclose(block.cpu().numpy(), plain.read(sessions[t], t, (-1, -5, 7), (12, 60, 64), 3.0),
                                       atol=1e-3)


def test_the_threshold_adapts_to_a_series_whose_spines_score_lower():
    from napari_spine_tracker.core.decode import ADAPT_LOWEST, series_threshold

    rng = np.random.default_rng(0)
    background = 0.1 + rng.exponential(0.04, 600)  # many bumps just above the decoding floor
    # spines scoring like on the training data: the split lies above the model's 0.40, which is kept
    bright = np.concatenate([background, rng.uniform(0.6, 0.95, 150)])
    assert series_threshold(bright, 0.4) == 0.4
    # the same spines on a dimmer microscope (around 0.35): lowered to between the two groups
    dim = np.concatenate([background, rng.uniform(0.27, 0.45, 150)])
    lowered = series_threshold(dim, 0.4, lowest=0.0)
    assert 0.2 < lowered < 0.3
    assert (dim >= lowered).sum() >= 150 and (background >= lowered).mean() < 0.1
    assert series_threshold(dim, 0.4) == ADAPT_LOWEST == 0.3  # by default not below 0.3
    # never below the lowest, nor adapted on too few peaks or on one value
    assert series_threshold(np.concatenate([background, rng.uniform(0.12, 0.2, 150)]), 0.4) == ADAPT_LOWEST
    assert series_threshold(dim[::20], 0.4) == 0.4  # 38 peaks
    assert series_threshold(np.full(100, 0.3), 0.4) == 0.4
    assert series_threshold(dim, 0.4, lowest=0.1) == lowered


def test_the_threshold_choices_reach_the_peaks_kept(random_model):
    from napari_spine_tracker.core.decode import series_threshold

    series = np.random.default_rng(3).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    voxel = (0.5, 0.1, 0.1)

    def peaks(threshold):
        return predict_series(series, voxel, random_model, options=InferenceOptions(threshold=threshold))

    floor = peaks(0.1)
    assert floor.attrs == {"threshold": 0.1, "threshold_adapted": False} and floor["score"].min() >= 0.1
    fixed = peaks("model")
    assert fixed.attrs == {"threshold": 0.3, "threshold_adapted": False}
    assert len(fixed) == (floor["score"] >= 0.3).sum() > 0
    auto = peaks("auto")
    assert auto.attrs == {"threshold": series_threshold(floor["score"], 0.3), "threshold_adapted": True}
    assert len(auto) == (floor["score"] >= auto.attrs["threshold"]).sum()
    table = detect_series(series, voxel, model=random_model)  # auto by default; the table says so
    assert table.attrs["threshold_adapted"] and table.attrs["model_threshold"] == 0.3
    assert table["score"].min() >= table.attrs["threshold"]
    assert table.attrs["gate_auto"] and 0.8 <= table.attrs["gate_um"] <= 1.4  # the linking gate, likewise
    fixed_gate = detect_series(series, voxel, model=random_model, gate_um=1.1)
    assert fixed_gate.attrs["gate_um"] == 1.1 and not fixed_gate.attrs["gate_auto"]
    for bad in (0.0, 1.0, "low", True, float("nan")):
        with pytest.raises(InputError, match="threshold must be a peak probability"):
            detect_series(series, voxel, model=random_model, threshold=bad,
                          should_stop=lambda: pytest.fail("detection started"))


def test_suggestions_are_the_peaks_below_the_threshold_apart_from_the_spines(random_model):
    from napari_spine_tracker.core.decode import SUGGEST_APART_UM, SUGGEST_FLOOR

    # the random network's scores spread over 0.05-0.9, its threshold in the middle
    net = copy.deepcopy(random_model.net)
    with torch.no_grad():
        net.heads["heatmap"].weight.mul_(300.0)
    random_model = dataclasses.replace(random_model, net=net, decode=dict(random_model.decode, threshold=0.5))
    series = np.random.default_rng(3).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    voxel = np.array([0.5, 0.1, 0.1])
    every = predict_series(series, voxel, random_model, options=InferenceOptions(threshold=SUGGEST_FLOOR))
    for threshold in (None, 0.45):
        # unregistered, so that the peaks are where predict_series put them
        plain = detect_series(series, voxel, model=random_model, threshold=threshold, register=False)
        table, suggestions = detect_series(series, voxel, model=random_model, threshold=threshold,
                                           register=False, return_suggestions=True)
        pd.testing.assert_frame_equal(table, plain)  # asking for suggestions changes nothing else
        assert table.attrs == plain.attrs
        cut = table.attrs["threshold"]
        assert list(suggestions.columns) == ["t", "z", "y", "x", "score", "track_id"] and len(suggestions) > 0
        assert suggestions["track_id"].dtype.kind == "i" and (suggestions["track_id"] >= 0).all()
        assert suggestions["score"].between(SUGGEST_FLOOR, cut, inclusive="left").all()
        assert suggestions["score"].is_monotonic_decreasing
        # each one apart from every spine of its session; the peaks left out are near one
        below = every[(every["score"] < cut)]
        for t in range(2):
            spines = table.loc[table["t"] == t, ["z", "y", "x"]].to_numpy() * voxel
            mine = suggestions.loc[suggestions["t"] == t, ["z", "y", "x"]].to_numpy() * voxel
            assert (cKDTree(spines).query(mine)[0] >= SUGGEST_APART_UM).all()
            left_out = below.loc[below["t"] == t, ["z", "y", "x"]].to_numpy() * voxel
            distance = cKDTree(spines).query(left_out)[0]
            assert (distance >= SUGGEST_APART_UM).sum() == len(mine)
    # a threshold at or below the floor leaves nothing to suggest
    _, none = detect_series(series, voxel, model=random_model, threshold=SUGGEST_FLOOR, return_suggestions=True)
    assert len(none) == 0 and list(none.columns) == ["t", "z", "y", "x", "score", "track_id"]
    with pytest.raises(InputError, match="suggest_floor"):
        InferenceOptions(suggest_floor=1.5)


def test_a_confident_track_keeps_its_dim_sessions_and_nothing_else_changes(random_model):
    from napari_spine_tracker.core.decode import VOUCH_BELOW, VOUCH_MEAN_ABOVE

    net = copy.deepcopy(random_model.net)  # scores spread over 0.05-0.9, as above
    with torch.no_grad():
        net.heads["heatmap"].weight.mul_(300.0)
    random_model = dataclasses.replace(random_model, net=net, decode=dict(random_model.decode, threshold=0.5))
    series = np.random.default_rng(3).poisson(5, (4, 8, 48, 48)).astype(np.uint16)
    voxel = (0.5, 0.1, 0.1)
    plain = detect_series(series, voxel, model=random_model, threshold=0.5, register=False, track_evidence=False)
    vouched = detect_series(series, voxel, model=random_model, threshold=0.5, register=False)
    assert (plain["score"] >= 0.5).all()
    dim = vouched["score"] < 0.5
    assert dim.any() and (vouched.loc[dim, "score"] >= 0.5 - VOUCH_BELOW).all()
    track_mean = vouched.groupby("track_id")["score"].transform("mean")
    assert (track_mean[dim] >= 0.5 + VOUCH_MEAN_ABOVE - 1e-9).all()
    # the peaks above the threshold are the same ones; ids run 1..N
    points = lambda table: sorted(map(tuple, table[["t", "z", "y", "x"]].round(6).to_numpy()))  # noqa: E731
    assert points(vouched[~dim]) == points(plain)
    assert sorted(vouched["track_id"].unique()) == list(range(1, vouched["track_id"].nunique() + 1))
    assert vouched.attrs["threshold"] == plain.attrs["threshold"] == 0.5 and "gate_um" in vouched.attrs


def test_a_lowered_threshold_is_told_to_the_user():
    from napari_spine_tracker.core.detect import threshold_note

    table = pd.DataFrame({"track_id": [1]})
    table.attrs.update(threshold=0.23, threshold_adapted=True, model_threshold=0.4)
    assert threshold_note(table) == "peak threshold 0.23, lowered from the model's 0.40 to this series' own split"
    table.attrs.update(threshold=0.4)
    assert threshold_note(table) == ""  # kept
    table.attrs.update(threshold=0.3, threshold_adapted=False)
    assert threshold_note(table) == ""  # the user's own choice


def test_the_heap_is_given_back_between_tiles_and_once_at_the_end(random_model, monkeypatch):
    """Between tiles the heap's free memory goes back to the system (so that blocks no later buffer
    fits do not pile up), after the last tile only once, when the run ends."""
    from napari_spine_tracker.core import devices, infer

    trims = []
    monkeypatch.setattr(devices, "_glibc", lambda: None)  # the end of the run: none without glibc
    monkeypatch.setattr(infer, "give_back_free_memory", lambda: trims.append(1))
    series = np.random.default_rng(4).poisson(5, (2, 8, 64, 160)).astype(np.uint16)
    options = InferenceOptions(max_tile=(8, 64, 64), halo=(0, 16, 16))
    plan = plan_tiles((8, 64, 160), options.max_tile, options.halo, align=random_model.net.total_stride)
    predict_series(series, (0.5, 0.1, 0.1), random_model, options=options)
    assert len(plan.tiles) >= 2 and len(trims) == len(plan.tiles) - 1
