"""The shipped model, end to end on tiny synthetic series: it loads, finds spines, and tiling
does not change what it finds (including spines that sit on tile seams)."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from napari_spine_tracker.core.detect import detect_series
from napari_spine_tracker.core.infer import InferenceOptions, plan_tiles, predict_series
from napari_spine_tracker.core.metrics import evaluate_tracks
from napari_spine_tracker.core.models import DEFAULT_MODEL, list_models, load_model
from napari_spine_tracker.core.register import estimate_motion
from napari_spine_tracker.core.synth import SynthConfig, synthesize_series


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT_MODEL, device="cpu")


@pytest.fixture(scope="module")
def series():
    return synthesize_series(SynthConfig.preset("default", seed=4242, sessions=3, shape=(16, 144, 144)))


def test_shipped_model_is_listed_with_its_training(model):
    info = {m.name: m for m in list_models()}[DEFAULT_MODEL]
    assert info.shipped and "validation F1" in info.description
    assert model.training["validation"]["f1"] > 0.8
    assert model.voxel_size_um == (0.5, 0.1, 0.1)


def test_the_coarse_voxel_model_is_shipped_after_the_default_and_finds_spines_at_coarse_voxels():
    infos = list_models()
    assert infos[0].name == DEFAULT_MODEL  # the widget's first (default) choice
    coarse = {m.name: m for m in infos}["spinenet-synth-coarse"]
    assert coarse.shipped and "validation F1" in coarse.description
    model = load_model("spinenet-synth-coarse", device="cpu")
    assert "--coarse-fraction 0.4" in model.training["command_line"]
    assert model.voxel_size_um == (0.5, 0.1, 0.1) and model.training["validation"]["f1"] > 0.85
    # 1 µm z steps and 0.2 µm pixels: the sampling it was trained for
    series = synthesize_series(SynthConfig.preset("default", seed=4242, sessions=3, shape=(16, 72, 72),
                                                  voxel_size_um=(1.0, 0.2, 0.2)))
    table = detect_series(series.image, series.voxel_size_um, model=model)
    scores = evaluate_tracks(table, series.truth, series.voxel_size_um)
    assert scores["f1"] > 0.85 and scores["idf1"] > 0.8, scores


def test_the_default_model_on_coarse_voxels_suggests_the_coarse_one(caplog):
    from napari_spine_tracker.core.models import COARSE_MODEL, coarse_model_hint

    assert COARSE_MODEL in coarse_model_hint((1.0, 0.2, 0.2), DEFAULT_MODEL)
    for voxel in ((0.5, 0.1, 0.1), (1.0, 0.1, 0.1), (0.5, 0.2, 0.2)):  # where both models do alike
        assert coarse_model_hint(voxel, DEFAULT_MODEL) is None
    assert coarse_model_hint((1.0, 0.2, 0.2), COARSE_MODEL) is None  # a user's choice is left alone
    tiny = synthesize_series(SynthConfig.preset("default", seed=1, sessions=2, shape=(8, 40, 40),
                                                voxel_size_um=(1.0, 0.2, 0.2)))
    with caplog.at_level("WARNING", logger="napari_spine_tracker"):
        detect_series(tiny.image, tiny.voxel_size_um, model=DEFAULT_MODEL, device="cpu")
    assert any(f"--model {COARSE_MODEL}" in r.getMessage() for r in caplog.records)


def test_detects_spines_on_a_tiny_series(model, series):
    table = detect_series(series.image, series.voxel_size_um, model=model)
    scores = evaluate_tracks(table, series.truth, series.voxel_size_um)
    assert scores["f1"] > 0.75 and scores["idf1"] > 0.7, scores
    assert table["status"].eq("predicted").all() and table["track_id"].min() == 1


def _match_fraction(a: np.ndarray, b: np.ndarray, tol: float) -> float:
    if len(a) == 0:
        return 1.0
    distance, _ = cKDTree(b).query(a)
    return float(np.mean(distance <= tol))


@pytest.fixture(scope="module")
def drifted():
    """A series whose sessions drift by ~1 µm (10 voxels), with the motion registration finds."""
    s = synthesize_series(SynthConfig.preset("default", seed=4243, sessions=3, shape=(16, 144, 144)))
    motion = estimate_motion(s.image, s.voxel_size_um)
    assert np.abs(motion.drift_vox[1:, 1:]).max() > 3  # the sessions did drift
    return s, motion


def test_tiled_inference_equals_untiled(model, drifted):
    """Tiles on the network's grid (plan_tiles' ``align``) find what one tile for the whole field
    finds, registered sessions too: with a halo of 24 the same peaks to float rounding, with the
    default halo 95 % of them within 0.1 voxel. Tiles off that grid moved confident spines by up to
    a z voxel."""
    series, motion = drifted

    def run(**options):
        return predict_series(series.image, series.voxel_size_um, model, motion=motion,
                              options=InferenceOptions(threshold=0.3, **options))

    untiled = run(max_tile=(64, 256, 256))
    assert len(untiled) > 20
    exact = run(max_tile=(64, 96, 96), halo=(4, 24, 24))
    assert len(exact) == len(untiled)
    exact = exact.sort_values(["t", "z", "y", "x"]).reset_index(drop=True)
    ordered = untiled.sort_values(["t", "z", "y", "x"]).reset_index(drop=True)
    np.testing.assert_allclose(exact.to_numpy(float), ordered.to_numpy(float), atol=2e-3, equal_nan=True)
    tiled = run(max_tile=(64, 72, 72))
    for t in range(series.image.shape[0]):
        a = untiled[untiled["t"] == t][["z", "y", "x"]].to_numpy()
        b = tiled[tiled["t"] == t][["z", "y", "x"]].to_numpy()
        assert _match_fraction(a, b, 0.1) >= 0.95 and _match_fraction(b, a, 0.1) >= 0.95
        assert abs(len(a) - len(b)) <= max(1, 0.05 * len(a))


def test_running_out_of_gpu_memory_does_not_change_what_is_found(model, drifted, monkeypatch):
    """A run that runs out of memory starts again with smaller tiles (down to 96 voxels here);
    on the network's grid, with a halo of 24, it finds the very peaks of the run that did not."""
    import torch

    series, motion = drifted
    options = InferenceOptions(threshold=0.3, halo=(4, 24, 24))

    def run():
        table = predict_series(series.image, series.voxel_size_um, model, motion=motion, options=options)
        return table.sort_values(["t", "z", "y", "x"]).reset_index(drop=True)

    whole = run()
    forward, widths = model.net.forward_sessions, []

    def small_memory(x, *args, **kwargs):  # as a GPU that holds tiles up to 100 voxels wide
        widths.append(x.shape[-1])
        if x.shape[-1] > 100:
            raise torch.cuda.OutOfMemoryError("simulated")
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model.net, "forward_sessions", small_memory)
    retried = run()
    assert widths[0] > 100 and max(widths[-3:]) <= 96  # it did run out, and finished on small tiles
    assert len(whole) > 20 and len(retried) == len(whole)
    np.testing.assert_allclose(retried.to_numpy(float), whole.to_numpy(float), atol=2e-3, equal_nan=True)


def test_tiled_mirrored_views_equal_untiled(model, drifted):
    """With mirror views (test-time augmentation), a tile's size leaves the same remainder by the
    network's stride as one tile's, so that its mirror image lies on the grids as the whole
    field's does: the same peaks within 0.1 voxel but for one at the field's edge (0.87 with tile
    sizes that ignored it)."""
    series, motion = drifted

    def run(**options):
        table = predict_series(series.image, series.voxel_size_um, model, motion=motion,
                               options=InferenceOptions(threshold=0.3, views=2, **options))
        return table[["t", "z", "y", "x"]].to_numpy() * [1e6, 1, 1, 1]  # sessions apart

    untiled, tiled = run(max_tile=(64, 256, 256)), run(max_tile=(64, 72, 72))
    assert len(untiled) > 20 and abs(len(untiled) - len(tiled)) <= 1
    assert _match_fraction(untiled, tiled, 0.1) >= 0.95 and _match_fraction(tiled, untiled, 0.1) >= 0.95


def test_spines_on_tile_seams_are_found_once(model, series):
    """Cores 32 voxels wide put seams every 32 voxels in y and x; every spine is reported at most
    once, and spines within two voxels of a seam are found as often as without tiles (a spine of
    score 0.44 on the seam at y = 32 was lost by both its tiles before _join_seams)."""
    options = InferenceOptions(max_tile=(64, 72, 72))
    plan = plan_tiles(series.image.shape[1:], options.max_tile, options.halo, align=model.net.total_stride)
    seams = sorted({t.origin[1] + t.keep[1].start for t in plan.tiles} - {0})
    assert seams == [32, 64, 96, 128]  # (no registration: the tiles start at the field's corner)
    tiled = predict_series(series.image, series.voxel_size_um, model, options=options)
    untiled = predict_series(series.image, series.voxel_size_um, model,
                             options=InferenceOptions(max_tile=(64, 256, 256)))
    vox = np.asarray(series.voxel_size_um)
    near_seam = 0
    for t in range(series.image.shape[0]):
        pts = tiled[tiled["t"] == t][["z", "y", "x"]].to_numpy() * vox
        pairs = cKDTree(pts).query_pairs(0.3)  # two reports of one spine would sit this close
        assert not pairs
        truth = series.truth[series.truth["t"] == t]
        seam = np.minimum(np.abs(truth["y"].to_numpy()[:, None] - np.subtract(seams, 0.5)).min(1),
                          np.abs(truth["x"].to_numpy()[:, None] - np.subtract(seams, 0.5)).min(1)) <= 2
        near_seam += int(seam.sum())
        for row in truth[seam][["z", "y", "x"]].to_numpy() * vox:
            found = [len(cKDTree(table[table["t"] == t][["z", "y", "x"]].to_numpy() * vox)
                         .query_ball_point(row, 1.0)) for table in (tiled, untiled)]
            assert found[0] == found[1]  # (2 where a neighbour sits within 1 µm, tiled or not)
    assert near_seam > 0  # the series does put spines on the seams
