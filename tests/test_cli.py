"""The command line as a user's script meets it: subcommands, exit codes, outputs."""

import json

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.cli import build_parser, main
from napari_spine_tracker.io.series import write_series_tiff
from napari_spine_tracker.io.tables import read_spine_table, write_spine_table


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(out), "--seed", "3", "--preset", "tiny"]) == 0
    return out


def test_help_lists_every_subcommand():
    text = build_parser().format_help()
    for command in ("detect", "synth", "evaluate", "train", "dynamics", "bench", "gui"):
        assert command in text


def test_python_dash_m_runs_the_command_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "napari_spine_tracker", "evaluate", "missing.csv", "missing.csv",
                           "--voxel-size", "1", "1", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "missing.csv" in done.stderr  # the same exit codes as the entry point


def test_synth_writes_series_truth_and_metadata(synth_dir):
    from napari_spine_tracker.io.series import load_series

    series = load_series(synth_dir / "series.tif")
    truth = read_spine_table(synth_dir / "truth.csv")
    meta = json.loads((synth_dir / "synth.json").read_text())
    assert series.data.shape[0] == 3 and series.voxel_size_um == pytest.approx((0.5, 0.1, 0.1))
    assert len(truth) > 0 and truth["t"].max() <= 2
    assert meta["config"]["seed"] == 3


def test_evaluate_truth_against_itself_is_perfect(synth_dir, capsys):
    truth = str(synth_dir / "truth.csv")
    assert main(["evaluate", truth, truth, "--voxel-size", "0.5", "0.1", "0.1"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["f1"] == 1.0 and scores["idf1"] == 1.0


def test_evaluate_perturbed_predictions(synth_dir, tmp_path, capsys):
    """Shifting half the points by 2 µm in x makes them misses and false positives."""
    truth = read_spine_table(synth_dir / "truth.csv")
    pred = truth.copy()
    moved = pred.index % 2 == 0
    pred.loc[moved, "x"] += 20  # 20 voxels of 0.1 µm
    write_spine_table(pred, tmp_path / "pred.csv")
    assert main(["evaluate", str(tmp_path / "pred.csv"), str(synth_dir / "truth.csv"),
                 "--voxel-size", "0.5", "0.1", "0.1"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kept = int((~moved).sum())
    assert scores["tp"] == kept
    assert scores["precision"] == pytest.approx(kept / len(pred))
    assert scores["recall"] == pytest.approx(kept / len(truth))


def test_evaluate_rejects_a_table_without_required_columns(synth_dir, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    code = main(["evaluate", str(bad), str(synth_dir / "truth.csv"), "--voxel-size", "0.5", "0.1", "0.1"])
    assert code == 2 and "track_id" in capsys.readouterr().err


def test_detect_on_a_non_tiff_exits_2(synth_dir, tmp_path, tiny_checkpoint, capsys):
    code = main(["detect", str(synth_dir / "truth.csv"), "--out", str(tmp_path / "x.csv"),
                 "--model", str(tiny_checkpoint)])
    assert code == 2 and "error" in capsys.readouterr().err.lower()
    assert not (tmp_path / "x.csv").exists()


def test_detect_4d_3d_and_folder_inputs(synth_dir, tmp_path, tiny_checkpoint):
    from napari_spine_tracker.io.series import load_series

    series = load_series(synth_dir / "series.tif")
    image = np.asarray(series.data)
    write_series_tiff(tmp_path / "one.tif", image[0], series.voxel_size_um)
    folder = tmp_path / "sessions"
    for t in range(image.shape[0]):
        write_series_tiff(folder / f"day{t + 1}.tif", image[t], series.voxel_size_um)
    for name, source in (("4d", synth_dir / "series.tif"), ("3d", tmp_path / "one.tif"), ("folder", folder)):
        out = tmp_path / f"{name}.csv"
        assert main(["detect", str(source), "--out", str(out), "--model", str(tiny_checkpoint), "-q"]) == 0
        table = read_spine_table(out)
        assert len(table) > 0
        assert table["t"].max() == (0 if name == "3d" else image.shape[0] - 1)



def test_detect_with_mirror_views(synth_dir, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from napari_spine_tracker.core import infer

    seen = []
    forward = infer._forward_views
    monkeypatch.setattr(infer, "_forward_views", lambda net, x, previous, states: seen.append(len(states))
                        or forward(net, x, previous, states))
    out = tmp_path / "views.csv"
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--views", "4", "-q"]) == 0
    assert set(seen) == {4} and len(read_spine_table(out)) > 0
    with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
        main(["detect", str(synth_dir / "series.tif"), "--views", "3"])
    assert exc.value.code == 2 and "invalid choice: 3" in capsys.readouterr().err


def test_detect_passes_the_rotation_search_limit(synth_dir, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from napari_spine_tracker.core import register

    seen = []
    estimate = register.estimate_motion
    monkeypatch.setattr(register, "estimate_motion", lambda *a, **k: seen.append(k["max_rotation_deg"])
                        or estimate(*a, **k))
    out = tmp_path / "turns.csv"
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--max-rotation", "0", "-q"]) == 0
    assert seen == [0.0] and len(read_spine_table(out)) > 0
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--max-rotation", "-2", "-q"]) == 2
    assert "max_rotation_deg must be an angle" in capsys.readouterr().err


def test_detect_passes_the_linking_gate_and_gap(synth_dir, tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from napari_spine_tracker.core import detect

    seen = []
    linker = detect.link_detections
    monkeypatch.setattr(detect, "link_detections", lambda *a, **k: seen.append((k["gate_um"], k["max_gap"]))
                        or linker(*a, **k))
    out = tmp_path / "gated.csv"
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--gate-um", "0.9", "--max-gap", "1", "-q"]) == 0
    assert seen == [(0.9, 1)] and len(read_spine_table(out)) > 0
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "-q"]) == 0
    assert seen[1] == ("auto", 2)  # the defaults
    assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                 "--gate-um", "auto", "-q"]) == 0
    assert seen[2] == ("auto", 2)
    # refused before any detection runs
    monkeypatch.setattr(detect, "predict_series", lambda *a, **k: pytest.fail("detection ran"))
    command = ["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint), "-q"]
    for value in ("0", "far"):
        with pytest.raises(SystemExit) as exc:  # argparse: usage error, exit code 2
            main([*command, "--gate-um", value])
        assert exc.value.code == 2
        assert f"gate_um must be 'auto' or a positive distance in µm, got '{value}'" in capsys.readouterr().err
    assert main([*command, "--max-gap", "-1"]) == 2
    assert "max_gap must be a whole number" in capsys.readouterr().err


def test_detect_lets_tracks_vouch_unless_told_not_to(synth_dir, tmp_path, tiny_checkpoint, monkeypatch):
    from napari_spine_tracker.core import detect

    seen = []
    vouch = detect.keep_vouched
    monkeypatch.setattr(detect, "keep_vouched", lambda *a, **k: seen.append(a[1]) or vouch(*a, **k))
    out = tmp_path / "vouched.csv"
    command = ["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
               "--threshold", "0.5", "-q"]
    assert main(command) == 0 and seen == [0.5]
    assert main([*command, "--no-track-evidence"]) == 0 and seen == [0.5]  # not asked again
    assert (read_spine_table(out)["score"] >= 0.5).all()


def test_detect_passes_the_threshold_and_says_when_it_was_lowered(synth_dir, tmp_path, tiny_checkpoint, capsys,
                                                                    monkeypatch):
    from napari_spine_tracker.core import detect

    seen = []
    detector = detect.detect_series

    def lowered(*args, **kwargs):
        seen.append(kwargs["threshold"])
        table = detector(*args, **kwargs)
        table.attrs.update(threshold=0.21, threshold_adapted=kwargs["threshold"] == "auto")
        return table

    monkeypatch.setattr(detect, "detect_series", lowered)
    out = tmp_path / "thresholds.csv"
    for flag in ([], ["--threshold", "model"], ["--threshold", "0.25"]):
        assert main(["detect", str(synth_dir / "series.tif"), "--out", str(out), "--model", str(tiny_checkpoint),
                     *flag, "-q"]) == 0
        report = capsys.readouterr().out
        said = "peak threshold 0.21, lowered from the model's 0.30 to this series' own split" in report
        assert said == (not flag) and ("--threshold model keeps it" in report) == (not flag)
    assert seen == ["auto", "model", 0.25]
    for bad in ("high", "1.5"):
        with pytest.raises(SystemExit) as exc:
            main(["detect", str(synth_dir / "series.tif"), "--threshold", bad])
        assert exc.value.code == 2 and "--threshold" in capsys.readouterr().err


def test_train_passes_the_preset_mix_and_refuses_unknown_presets(tmp_path, capsys, monkeypatch):
    from napari_spine_tracker.core import train

    seen = []
    monkeypatch.setattr(train, "train_model", lambda options, progress=None: seen.append(options) or options.out)
    out = str(tmp_path / "m.pt")
    assert main(["train", "--out", out, "--presets", "low_snr:2", "faint:2", "crowded", "-q"]) == 0
    assert seen[0].presets == (("low_snr", 2.0), ("faint", 2.0), ("crowded", 1.0))
    assert main(["train", "--out", out, "-q"]) == 0
    assert seen[1].presets == train.DEFAULT_PRESETS
    assert main(["train", "--out", out, "--presets", "lowsnr", "-q"]) == 2
    assert "unknown synthetic preset 'lowsnr'" in capsys.readouterr().err
    assert seen[1].validation == train.SYNTHETIC_VALIDATION
    assert main(["train", "--out", out, "--val-series", "12", "-q"]) == 0
    assert seen[2].validation == train.validation_cases(12) and len(seen[2].validation) == 12
    assert main(["train", "--out", out, "--val-series", "0", "-q"]) == 2
    assert "--val-series must be a whole number" in capsys.readouterr().err
    assert main(["train", "--out", out, "--coarse-fraction", "0.3", "-q"]) == 0
    assert seen[-1].coarse_fraction == 0.3 and seen[1].coarse_fraction == 0.0
    assert main(["train", "--out", out, "--hard-negative-weight", "5", "-q"]) == 0
    assert seen[-1].hard_negative_weight == 5.0 and seen[1].hard_negative_weight == 1.0


def test_detect_without_voxel_size_says_how_to_fix(tmp_path, tiny_checkpoint, capsys):
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((6, 32, 32), np.uint16))
    assert main(["detect", str(tmp_path / "plain.tif"), "--model", str(tiny_checkpoint)]) == 2
    captured = capsys.readouterr()
    assert "--voxel-size" in captured.err
    # the file is named once per line, not twice ("plain.tif: plain.tif: ...")
    assert f"{tmp_path / 'plain.tif'}: the voxel size is not in the file's metadata" in captured.out
    assert f"{tmp_path / 'plain.tif'}: {tmp_path / 'plain.tif'}" not in captured.out + captured.err


def test_unknown_model_and_device_are_input_errors(synth_dir, capsys):
    assert main(["detect", str(synth_dir / "series.tif"), "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_dynamics_report(synth_dir, tmp_path):
    assert main(["dynamics", str(synth_dir / "truth.csv"), "--out", str(tmp_path / "dyn"), "-q"]) == 0
    sessions = pd.read_csv(tmp_path / "dyn" / "sessions.csv")
    assert len(sessions) == 3 and (tmp_path / "dyn" / "dynamics.png").exists()
