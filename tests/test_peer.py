"""The trackpy peer on tiny blob series with known truth; the bench registry around it."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.core.bench import BenchResult, format_table, method_unavailable
from napari_spine_tracker.core.metrics import evaluate_tracks
from napari_spine_tracker.core.peer import odd_diameter_vox, trackpy_detect_track
from napari_spine_tracker.errors import Cancelled, InputError
from napari_spine_tracker.io.tables import REQUIRED_COLUMNS

VOXEL = np.array([0.5, 0.1, 0.1])


def blob_series(drift_vox: np.ndarray, n_spots: int = 12, shape=(12, 72, 72), seed: int = 0):
    """Gaussian spots (heads ~0.6 µm across) that move with the drift; returns (image, truth)."""
    rng = np.random.default_rng(seed)
    # spots on a jittered grid, about 1.4 µm apart, inside the field in every session
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(3)), -1).reshape(-1, 2)[:n_spots]
    yx = 22 + grid[:, ::-1] * 14 + rng.uniform(-2, 2, size=(n_spots, 2))
    points = np.column_stack([rng.uniform(4, shape[0] - 5, n_spots), yx])
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    images, rows = [], []
    for t, d in enumerate(drift_vox):
        image = np.zeros(shape, np.float32)
        for k, p in enumerate(points + d):
            image += 3000 * np.exp(-(((zz - p[0]) / 1.2) ** 2 + ((yy - p[1]) / 2.5) ** 2
                                     + ((xx - p[2]) / 2.5) ** 2) / 2)
            rows.append((k + 1, t, *p))
        images.append(rng.poisson(image + 100).astype(np.uint16))
    return np.stack(images), pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])


DRIFT = np.array([[0, 0, 0], [1, 9, -8], [0, 16, -2]], dtype=float)  # up to 1.6 µm


@pytest.fixture(scope="module")
def series():
    return blob_series(DRIFT)


def test_finds_and_tracks_blobs_with_drift(series):
    image, truth = series
    table = trackpy_detect_track(image, VOXEL, diameter_um=(2.5, 0.9, 0.9), separation_um=(1.5, 0.5, 0.5),
                                 percentile=64, minmass=5000, search_range_um=1.0)
    assert list(table.columns[:7]) == list(REQUIRED_COLUMNS)
    assert table["score"].between(0, 1).all() and (table["status"] == "predicted").all()
    scores = evaluate_tracks(table, truth, VOXEL, tol_um=0.5)
    assert scores["f1"] > 0.95
    assert scores["idf1"] > 0.95
    # without registration a 1 µm search range cannot follow 1.2 µm steps
    unregistered = trackpy_detect_track(image, VOXEL, diameter_um=(2.5, 0.9, 0.9),
                                        separation_um=(1.5, 0.5, 0.5), percentile=64, minmass=5000, search_range_um=1.0,
                                        register=False)
    assert evaluate_tracks(unregistered, truth, VOXEL, tol_um=0.5)["idf1"] < 0.6


def test_odd_diameters_from_um():
    assert odd_diameter_vox((1.5, 0.9, 0.9), VOXEL) == (3, 9, 9)
    assert odd_diameter_vox(1.0, VOXEL) == (3, 11, 11)  # at least 3, always odd


def test_blank_series_gives_empty_table():
    blank = np.full((2, 8, 32, 32), 100, np.uint16)
    table = trackpy_detect_track(blank, VOXEL, minmass=1e6)
    assert len(table) == 0 and list(table.columns[:7]) == list(REQUIRED_COLUMNS)


def test_progress_cancel_and_voxel_size(series):
    image, _ = series
    calls = []
    trackpy_detect_track(image[:2], VOXEL, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (4, 4) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(Cancelled):
        trackpy_detect_track(image, VOXEL, should_stop=lambda: True)
    with pytest.raises(InputError, match="voxel size"):
        trackpy_detect_track(image)


def test_bench_registry_and_table():
    assert method_unavailable("trackpy") is None
    with pytest.raises(InputError, match="unknown method"):
        method_unavailable("nope")
    ok = BenchResult("trackpy", "default", 1000, 10**6, {"f1": 0.5, "idf1": 0.4, "association_accuracy": 0.9},
                     seconds=0.5, peak_rss_mb=200.0, added_rss_mb=20.0)
    missing = BenchResult("spinenet", "default", 1000, 10**6, note="n/a (no model)")
    assert ok.mvoxel_per_s == pytest.approx(2.0)
    text = format_table([ok, missing])
    lines = text.splitlines()
    assert "0.500" in lines[2] and "2.00" in lines[2]
    assert "n/a (no model)" in lines[3]


@pytest.mark.slow
def test_run_cases_isolated_measures_time_memory_and_scores():
    pytest.importorskip("napari_spine_tracker.core.synth")
    from napari_spine_tracker.core.bench import run_cases

    results = run_cases(("trackpy", "spinenet"), ("tiny",), (1000,), model="no-such-model")
    trackpy_result, spinenet_result = results
    assert trackpy_result.note == "" and trackpy_result.seconds > 0
    assert trackpy_result.voxels == 3 * 12 * 64 * 64
    assert trackpy_result.peak_rss_mb > trackpy_result.added_rss_mb >= 0
    assert 0 <= trackpy_result.scores["f1"] <= 1 and trackpy_result.scores["n_true"] > 0
    assert spinenet_result.note == "n/a (no model)" and not spinenet_result.scores


def test_what_a_method_imports_on_first_use_is_imported_before_the_clock(tiny_checkpoint):
    """The timed call starts with the method's modules loaded, as importing trackpy is outside the
    peer's time (in a fresh interpreter: this one has imported them all)."""
    import subprocess

    code = ("import sys; from napari_spine_tracker.core.bench import _PREPARE; "
            f"_PREPARE['spinenet'](device='cpu', model={str(tiny_checkpoint)!r}); "
            "print(sorted(m for m in ('napari_spine_tracker.core.detect', 'napari_spine_tracker.core.edits', "
            "'napari_spine_tracker.core.infer', 'napari_spine_tracker.core.link') if m not in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_run_cases_with_mirror_views_names_the_row(tiny_checkpoint):
    from napari_spine_tracker.core.bench import format_table, run_cases

    results = run_cases(("spinenet",), ("tiny",), (1000,), model=str(tiny_checkpoint), isolate=False, views=2)
    assert [r.method for r in results] == ["spinenet x2"] and results[0].note == ""
    assert results[0].seconds > 0 and 0 <= results[0].scores["f1"] <= 1
    assert format_table(results).splitlines()[2].startswith("spinenet x2 tiny")
