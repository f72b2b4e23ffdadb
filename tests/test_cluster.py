"""Batch detection (core/cluster.py): Dask local cluster, existing scheduler, resume, failures, CLI."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from napari_spine_tracker.cli import main
from napari_spine_tracker.core.cluster import SERIES_UNITS, detect_many
from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
from napari_spine_tracker.errors import Cancelled, InputError
from napari_spine_tracker.io.series import write_series_tiff
from napari_spine_tracker.io.tables import read_spine_table, read_suggestions, write_spine_table


def _good_series(folder: Path, count: int, seed: int = 0) -> list[Path]:
    paths = []
    for k in range(count):
        synth = synthesize_series(SynthConfig.preset("tiny", seed=seed + k))
        paths.append(write_series_tiff(folder / f"mouse{k}.tif", synth.image, synth.voxel_size_um))
    return paths


def _corrupt(folder: Path) -> Path:
    path = folder / "corrupt.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 200)  # a TIFF signature, then nothing valid
    return path


def _without_voxel_size(folder: Path) -> Path:
    path = folder / "no-voxel-size.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 32, 32), np.uint16))
    return path


def _check_table(path: Path, image_path: Path, rows: int) -> None:
    table = read_spine_table(path)
    shape = tifffile.imread(image_path).shape  # (T, Z, Y, X)
    assert len(table) == rows > 0
    assert set(table["t"]) <= set(range(shape[0]))
    for axis, size in zip("zyx", shape[1:]):
        assert table[axis].between(-0.5, size - 0.5).all()


@pytest.mark.slow
def test_local_cluster_runs_good_inputs_reports_bad_ones_and_resumes(tmp_path, tiny_checkpoint):
    good = _good_series(tmp_path, 3)
    bad = [_corrupt(tmp_path), _without_voxel_size(tmp_path)]
    inputs = [good[0], bad[0], good[1], bad[1], good[2]]
    out = tmp_path / "tables"
    calls = []
    report = detect_many(inputs, out, scheduler="local", workers=2, model=str(tiny_checkpoint), device="cpu",
                         progress=lambda done, total: calls.append((done, total)))

    assert report.scheduler == "LocalCluster (2 workers)"
    assert [r.input for r in report.results] == [str(p) for p in inputs]
    assert [r.input for r in report.done] == [str(p) for p in good]
    for result, image in zip(report.done, good):
        assert Path(result.output) == out / f"{image.stem}.spines.csv"
        _check_table(Path(result.output), image, result.spine_sessions)
    failed = {Path(r.input).name: r.message for r in report.failed}
    assert set(failed) == {"corrupt.tif", "no-voxel-size.tif"}
    assert "corrupt" in failed["corrupt.tif"] or "not a TIFF" in failed["corrupt.tif"]
    assert "voxel size" in failed["no-voxel-size.tif"] and "--voxel-size" in failed["no-voxel-size.tif"]
    assert sorted(p.name for p in out.iterdir()) == [f"mouse{k}.spines.csv" for k in range(3)]  # no temp files
    assert calls[-1] == (5 * SERIES_UNITS, 5 * SERIES_UNITS)
    # each worker process loaded the model once, however many series it ran
    workers = {r.worker for r in report.results if r.status == "done"}
    assert 1 <= len(workers) <= 2 and all(not w.endswith(f":{os.getpid()}") for w in workers)
    loads = Counter(r.worker for r in report.results if r.model_loaded)
    assert set(loads) == workers and set(loads.values()) == {1}
    assert "3 done, 0 skipped, 2 failed" in report.format()

    # a rerun skips what is done (no cluster is started for nothing) and keeps the tables as they are
    stamps = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = detect_many(good, out, scheduler="local", workers=2, model=str(tiny_checkpoint))
    assert [r.status for r in again.results] == ["skipped"] * 3 and again.scheduler == "this process"
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    again = detect_many(inputs, out, scheduler=None, model=str(tiny_checkpoint), device="cpu")
    assert [r.status for r in again.results] == ["skipped", "failed", "skipped", "failed", "skipped"]


def test_existing_scheduler_by_address_loads_the_model_once_per_process(tmp_path, tiny_checkpoint):
    distributed = pytest.importorskip("distributed")
    good = _good_series(tmp_path, 3, seed=10)
    # threads in this process: fast to start; the model cache is per process, so one load in all
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        report = detect_many(good, tmp_path / "out", scheduler=cluster.scheduler_address,
                             model=str(tiny_checkpoint), device="cpu")
        # a cluster object (as dask-jobqueue's SLURMCluster) or a client the caller keeps
        by_cluster = detect_many(good[:1], tmp_path / "by-cluster", scheduler=cluster, model=str(tiny_checkpoint))
        with distributed.Client(cluster) as client:
            by_client = detect_many(good[1:2], tmp_path / "by-client", scheduler=client, model=str(tiny_checkpoint))
            assert client.status == "running"  # detect_many leaves the caller's client open
    assert report.scheduler == cluster.scheduler_address and report.workers == 2
    assert [r.status for r in report.results] == ["done"] * 3
    assert sum(r.model_loaded for r in report.results) == 1
    for result, image in zip(report.results, good):
        _check_table(Path(result.output), image, result.spine_sessions)
    for batch, image in ((by_cluster, good[0]), (by_client, good[1])):
        (result,) = batch.done
        assert batch.scheduler == cluster.scheduler_address and not result.model_loaded  # cached in this process
        _check_table(Path(result.output), image, result.spine_sessions)


def test_sequential_resume_skips_valid_tables_and_replaces_invalid_ones(tmp_path, tiny_checkpoint):
    a, b, c = _good_series(tmp_path, 3, seed=20)
    valid = pd.DataFrame({"track_id": [1], "t": [0], "z": [1.0], "y": [2.0], "x": [3.0], "score": [0.5],
                          "status": ["predicted"]})
    write_spine_table(valid, tmp_path / "mouse0.spines.csv")
    (tmp_path / "mouse1.spines.csv").write_text("not,a\nspine,table\n")
    report = detect_many([a, b, c], scheduler=None, model=str(tiny_checkpoint), device="cpu")
    assert [r.status for r in report.results] == ["skipped", "done", "done"]
    assert len(read_spine_table(tmp_path / "mouse0.spines.csv")) == 1  # left alone
    assert "replaced an invalid table" in report.results[1].message
    _check_table(tmp_path / "mouse1.spines.csv", b, report.results[1].spine_sessions)
    assert sum(r.model_loaded for r in report.results) == 1


def test_hand_corrections_are_never_overwritten(tmp_path, tiny_checkpoint):
    (image,) = _good_series(tmp_path, 1, seed=30)
    corrected = pd.DataFrame({"track_id": [1, 2], "t": [0, 0], "z": [1.0, 2.0], "y": [2.0, 3.0], "x": [3.0, 4.0],
                              "score": [1.0, 0.7], "status": ["added", "predicted"]})
    table_path = write_spine_table(corrected, tmp_path / "mouse0.spines.csv")
    before = table_path.read_bytes()
    report = detect_many([image], scheduler=None, skip_done=False, model=str(tiny_checkpoint), device="cpu")
    (result,) = report.failed
    assert "1 hand-corrected points" in result.message and "never overwrites" in result.message
    assert table_path.read_bytes() == before


def test_bad_arguments_are_refused_before_anything_runs(tmp_path, tiny_checkpoint):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(InputError, match="would both write"):
        detect_many([tmp_path / "a" / "s.tif", tmp_path / "b" / "s.tif"], tmp_path / "out", scheduler=None,
                    model=str(tiny_checkpoint))
    with pytest.raises(InputError, match="scheduler 'local'"):
        detect_many([tmp_path / "a.tif"], scheduler="tcp://127.0.0.1:8786", workers=2, model=str(tiny_checkpoint))
    with pytest.raises(InputError, match="voxel size"):
        detect_many([tmp_path / "a.tif"], voxel_size_um=(0.5, -1, 0.1), model=str(tiny_checkpoint))
    with pytest.raises(InputError, match="no model checkpoint"):
        detect_many([tmp_path / "a.tif", tmp_path / "b.tif"], model=str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="views must be 1, 2 or 4"):
        detect_many([tmp_path / "a.tif"], views=3, model=str(tiny_checkpoint))
    with pytest.raises(InputError, match="max_rotation_deg must be an angle"):
        detect_many([tmp_path / "a.tif"], max_rotation_deg=90, model=str(tiny_checkpoint))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_suggestions_are_written_beside_the_table_and_go_with_it(tmp_path, tiny_checkpoint, capsys):
    (image,) = _good_series(tmp_path, 1, seed=70)
    beside = tmp_path / "mouse0.suggestions.csv"
    args = ["detect", str(image), "--device", "cpu", "-q"]  # the shipped model: real scores below its threshold
    assert main([*args, "--suggestions"]) == 0
    suggestions = read_suggestions(beside)
    table = read_spine_table(tmp_path / "mouse0.spines.csv")
    assert f"{len(suggestions)} suggestions of missed spines -> {beside}" in capsys.readouterr().out
    assert len(suggestions) and suggestions["score"].between(0.2, table["score"].min()).all()
    assert set(suggestions["t"]) <= set(range(3)) and (suggestions["track_id"] >= 0).all()
    # a run without them replaces the table, and the suggestions that went with the old one go
    assert main(args) == 0
    assert not beside.exists() and "removed mouse0.suggestions.csv" in capsys.readouterr().out
    # a table may not take a suggestions file's name
    with pytest.raises(InputError, match="are for suggestions of missed spines"):
        detect_many([image], outputs=[beside], scheduler=None, model=str(tiny_checkpoint))


def test_without_dask_the_error_names_the_extra(tmp_path, tiny_checkpoint, monkeypatch):
    inputs = _good_series(tmp_path, 2, seed=40)
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(InputError, match=r"napari-spine-tracker\[cluster\]"):
        detect_many(inputs, scheduler="local", workers=2, model=str(tiny_checkpoint))


def test_cancel_stops_the_batch_and_writes_nothing(tmp_path, tiny_checkpoint):
    inputs = _good_series(tmp_path, 2, seed=50)
    with pytest.raises(Cancelled):
        detect_many(inputs, scheduler=None, model=str(tiny_checkpoint), device="cpu", should_stop=lambda: True)
    assert not list(tmp_path.glob("*.csv"))


def test_cli_goes_past_a_failed_input_and_exits_2(tmp_path, tiny_checkpoint, capsys):
    (good,) = _good_series(tmp_path, 1, seed=60)
    bad = _corrupt(tmp_path)
    out = tmp_path / "out"  # several inputs: --out is a folder, made when the first table is written
    code = main(["detect", str(bad), str(good), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--device", "cpu", "-q"])
    captured = capsys.readouterr()
    assert code == 2
    assert read_spine_table(out / "mouse0.spines.csv").shape[0] > 0
    assert "1 done, 0 skipped, 1 failed" in captured.out and "corrupt.tif" in captured.out
    assert "1 of 2 inputs failed" in captured.err
    # one input, --out naming a file; then --workers without a local scheduler is a usage error
    assert main(["detect", str(good), "--out", str(tmp_path / "one.csv"), "--model", str(tiny_checkpoint),
                 "--device", "cpu", "-q"]) == 0
    assert (tmp_path / "one.csv").is_file()
    assert main(["detect", str(good), "--workers", "2", "--model", str(tiny_checkpoint)]) == 2
    assert "--scheduler local" in capsys.readouterr().err


class _RecordingLibc:
    """Stands in for glibc: records the allocator settings and each time the heap is given back."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim",))
        return 1


def test_a_batch_gives_memory_back_once_after_its_last_series(tmp_path, tiny_checkpoint, monkeypatch):
    """The series of a batch share one heap: the memory one freed is reused by the next, not given
    back to the system and paged in again (11-16 % of a batch of six one-tile series' time on 2 cores); after the
    batch the allocator is set back and the heap given back once."""
    from napari_spine_tracker.core import devices

    libc = _RecordingLibc()
    monkeypatch.setattr(devices, "_glibc", lambda: libc)
    report = detect_many(_good_series(tmp_path, 3), tmp_path / "tables", scheduler=None, model=str(tiny_checkpoint),
                         device="cpu")
    assert len(report.done) == 3
    assert libc.calls.count(("trim",)) == 1 and libc.calls[-1] == ("trim",)
    settings = [call[1:] for call in libc.calls if call[0] == "mallopt"]
    assert settings[:2] == [(devices._M_MMAP_MAX, 0), (devices._M_TRIM_THRESHOLD, 2**30)]
    assert settings[2:] == list(devices._GLIBC_AFTER.items())  # set once, set back once
    assert devices._heap_users == 0
