"""The benchmark scripts still run against the library they measure (they are not imported by it,
so nothing else would notice when an interface they use changes)."""

import logging
import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py"))


def _run(script: str, *args: str, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    logger = logging.getLogger("napari_spine_tracker")
    level = logger.level
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    finally:  # several scripts quiet the package's log, which later tests read
        logger.setLevel(level)


def test_the_benchmark_folder_is_found():
    assert "compare.py" in SCRIPTS and "batches.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_parses_its_options(script, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run(script, "--help", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.slow
def test_batch_preparation_benchmark_runs(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("batches.py", "--workers", "0", "--batches", "1", "--batch-size", "2", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "0 workers:" in out and "patches/s" in out


def _table(rows):
    import pandas as pd

    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])


def test_identity_errors_tells_the_kinds_apart():
    identity_errors = runpy.run_path(str(BENCHMARKS / "identity_errors.py"))["identity_errors"]
    # true spine 1 lives in sessions 0-3; spine 2 is lost after session 1; spine 3 is gained in session 2
    # next to where spine 2 was; spine 4 lives in sessions 0-3 far away
    truth = _table([(1, t, 5, 10, 10) for t in range(4)] + [(2, t, 5, 30, 30) for t in (0, 1)]
                   + [(3, t, 5, 30, 34) for t in (2, 3)] + [(4, t, 5, 60, 60) for t in range(4)])
    # predicted: spine 1 kept throughout; spines 2 and 3 read as one track (a gain and a loss merged);
    # spine 4's track broken in session 2 and restarted (a fragment)
    pred = _table([(1, t, 5, 10, 10) for t in range(4)] + [(7, 0, 5, 30, 30), (7, 1, 5, 30, 30),
                   (7, 2, 5, 30, 34), (7, 3, 5, 30, 34)] + [(9, 0, 5, 60, 60), (9, 1, 5, 60, 60),
                                                            (11, 2, 5, 60, 60), (11, 3, 5, 60, 60)])
    # the tracker's link distances: the merging link (track 7, session 2) reached 0.4 µm, the others 0-0.05
    pred["link_um"] = [float("nan"), 0.0, 0.05, 0.0, float("nan"), 0.0, 0.4, 0.0, float("nan"), 0.0,
                       float("nan"), 0.0]
    counts = identity_errors(pred, truth, (0.5, 0.1, 0.1))
    assert counts["tp"] == 12 and counts["idtp"] == 4 + 2 + 2  # one of 2 or 3; one fragment of 4
    # 8 links; the farthest tenth (one link) is the wrong one
    assert counts["wrong links"] == 1 and counts["top 10%"] == 1 and counts["in top 10%"] == 1
    assert counts["kept"] == 3 + 1 + 1 + 2 and counts["fragment"] == 1 and counts["switch"] == 0
    assert counts["gains"] == 1 and counts["gain merged"] == 1
    assert counts["losses"] == 1 and counts["loss merged"] == 1
    # the same spines linked right: nothing merged
    pred.loc[pred["track_id"].eq(7) & pred["t"].ge(2), "track_id"] = 8
    pred.loc[pred["track_id"].eq(11), "track_id"] = 9
    counts = identity_errors(pred, truth, (0.5, 0.1, 0.1))
    assert counts["idtp"] == 12 and counts["gain merged"] == 0 and counts["loss merged"] == 0
    assert counts["wrong links"] == 0 and counts["in top 10%"] == 0
    assert counts["fragment"] == 0 and counts["kept"] == 3 + 1 + 1 + 3


def test_an_ensemble_of_a_model_with_itself_finds_what_the_model_finds():
    import numpy as np
    import pandas as pd
    import torch

    from napari_spine_tracker.core.decode import DEFAULT_DECODE
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION
    from napari_spine_tracker.core.model import SpineNet, build_config
    from napari_spine_tracker.core.models import LoadedModel

    ensemble_model = runpy.run_path(str(BENCHMARKS / "weight_average.py"))["ensemble_model"]
    torch.manual_seed(0)
    net = SpineNet(build_config("tiny")).eval()
    with torch.no_grad():
        net.heads["heatmap"].bias.fill_(0.0)
        net.heads["heatmap"].weight.mul_(300.0)  # scores spread over 0.05-0.9
    model = LoadedModel(net, torch.device("cpu"), (0.5, 0.1, 0.1), dict(DEFAULT_NORMALIZATION),
                        dict(DEFAULT_DECODE, threshold=0.5))
    series = np.random.default_rng(3).poisson(5, (2, 8, 48, 48)).astype(np.uint16)
    alone = detect_series(series, (0.5, 0.1, 0.1), model=model, threshold=0.5)
    pair = ensemble_model([model, model])
    assert pair.name == "model+model" and len(pair.net.nets) == 2
    together = detect_series(series, (0.5, 0.1, 0.1), model=pair, threshold=0.5)
    assert len(alone) > 0
    pd.testing.assert_frame_equal(together, alone, atol=1e-5)


@pytest.mark.slow
def test_review_effort_benchmark_ends_every_review_at_the_truth(monkeypatch, capsys):
    # it exits with an error if a corrected table does not score 1.0
    with pytest.raises(SystemExit) as exit_:
        _run("review_effort.py", "--quick", "--seeds", "2000", "--cases", "default", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    second = lines.index(next(line for line in lines if line.startswith("quick pass")))
    rows = {line.split()[1]: line.split() for line in lines[:second] if line.startswith("default ")}
    assert set(rows) == {"spinenet", "sn-p5", "sn-none", "trackpy"}
    for row in rows.values():
        assert float(row[-1]) > 0 and int(row[4]) > 0  # a ratio, and the truth's spines counted
    # the quick pass: one row per patience; deleting false detections and accepting suggestions
    # never lowers F1 (on so small a series it can take longer than the full review: it also walks
    # the suggestions and the links)
    quick = [line.split() for line in lines[second:] if line.startswith("default ")]
    assert [int(row[1]) for row in quick] == [5, 10, 20]
    for row in quick:
        assert float(row[3]) >= float(row[2])
        assert float(row[-2].rstrip("%")) > 0 and float(row[-1].rstrip("%")) > 0


@pytest.mark.slow
def test_linking_speed_links_what_detection_links(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("linking_speed.py", "--repeat-xy", "1", "--runs", "1", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    detections = int(out.split(" detections to link")[0].split()[-1])
    tracks = [int(line.split("; ")[-1].split()[0]) for line in out.splitlines() if line.startswith("link_detections")]
    # every way of running (threads kept, threads started per call, one thread) gives the same
    # tracks, and there are fewer tracks than detections
    assert detections > 0 and len(tracks) == 3 and len(set(tracks)) == 1 and 0 < tracks[0] < detections
    assert "a pool of threads started for each call" in out


@pytest.mark.slow
def test_tiling_benchmark_compares_small_tiles_with_one(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run("tiling.py", "--cases", "sample", "--sessions", "2", "--tile", "96", "--halo", "24",
             monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("sample"))
    # tiles on the network's grid with a halo of 24 find one tile's peaks, and read more voxels
    assert "halo 24:" in line and "same place 1.000" in line
    assert float(line.split("read ")[1].rstrip("x")) > 1


def test_scales_benchmark_scores_the_series_as_read_like_detection(monkeypatch, capsys):
    from napari_spine_tracker.core.bench import QUICK_OVERRIDES
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    with pytest.raises(SystemExit) as exit_:
        _run("scales.py", "--quick", "--cases", "default", "--seeds", "2000", "--factors", "1", "1.25",
             monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    as_read, magnified = (next(row for row in lines if row.startswith("default") and f" x{f} " in row)
                          for f in ("1", "1.25"))
    series = synthesize_series(SynthConfig.preset("default", seed=2000, **QUICK_OVERRIDES))
    expected = evaluate_tracks(detect_series(series.image, series.voxel_size_um), series.truth,
                               series.voxel_size_um, tol_um=1.0)
    assert f"F1 {expected['f1']:.3f}" in as_read
    assert "F1 " in magnified and lines[-2].split()[0] == "1.00" and lines[-1].split()[0] == "1.25"


def test_symmetries_benchmark_views_are_the_shipped_four_and_their_turns():
    """Its four views average as ``detect --views 4`` does; its sixteen give a heatmap that turns and
    flips exactly with the input (it would not if a view were turned back wrong)."""
    import torch

    from napari_spine_tracker.core.infer import _forward_views
    from napari_spine_tracker.core.model import SpineNet, build_config

    module = runpy.run_path(str(BENCHMARKS / "symmetries.py"), run_name="symmetries")
    transforms = module["view_transforms"]("16")
    assert len(set(transforms)) == 16 and transforms[0] == ((), False)
    torch.manual_seed(0)
    net = SpineNet(build_config("tiny")).eval()
    x = torch.randn(1, 2, 1, 8, 32, 32)
    with torch.inference_mode():
        shipped = _forward_views(net, x, None, [None] * 4)[0]["heatmap"]
        four = module["forward_views"](module["view_transforms"]("4"))(net, x, None, [None] * 4)[0]["heatmap"]
        torch.testing.assert_close(four, shipped, atol=1e-5, rtol=1e-5)
        sixteen = module["forward_views"](transforms)
        averaged = sixteen(net, x, None, [None] * 16)[0]["heatmap"]
        turned = sixteen(net, x.transpose(-2, -1), None, [None] * 16)[0]["heatmap"]
        torch.testing.assert_close(turned, averaged.transpose(-2, -1), atol=1e-5, rtol=1e-5)
        upside_down = sixteen(net, x.flip((-3,)), None, [None] * 16)[0]["heatmap"]
        torch.testing.assert_close(upside_down, averaged.flip((-3,)), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(four, averaged, atol=1e-4), "sixteen views average more than four"


def test_symmetries_benchmark_scores_one_view_like_detection_and_restores_it(monkeypatch, capsys):
    from napari_spine_tracker.core import infer
    from napari_spine_tracker.core.bench import QUICK_OVERRIDES
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.model import SpineNet
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    before = infer._forward_views, infer.check_views, SpineNet.forward_sessions
    with pytest.raises(SystemExit) as exit_:
        _run("symmetries.py", "--quick", "--cases", "default", "--seeds", "2000", "--variants", "1", "8t",
             "nomemory", "--thresholds", "0.3", "0.4", monkeypatch=monkeypatch)
    assert exit_.value.code == 0
    assert (infer._forward_views, infer.check_views, SpineNet.forward_sessions) == before
    out = capsys.readouterr().out
    plain = next(row for row in out.splitlines() if row.startswith("default") and " 1  F1" in row)
    series = synthesize_series(SynthConfig.preset("default", seed=2000, **QUICK_OVERRIDES))
    expected = evaluate_tracks(detect_series(series.image, series.voxel_size_um), series.truth,
                               series.voxel_size_um, tol_um=1.0)
    assert f"F1 {expected['f1']:.3f}  IDF1 {expected['idf1']:.3f}" in plain
    assert "F1 at 0.3" in out and "8t" in out and "nomemory" in out
