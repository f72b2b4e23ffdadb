"""Autosave: atomic sidecar files, fallback to the user data folder, debounce, crash safety."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from napari_spine_tracker.io import autosave


@pytest.fixture(autouse=True)
def user_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SPINE_TRACKER_DATA_DIR", str(tmp_path / "user"))
    return tmp_path / "user"


def _table(n):
    return pd.DataFrame(dict(track_id=range(1, n + 1), t=[0] * n, z=[1.0] * n, y=[2.0] * n, x=[3.0] * n,
                             score=[1.0] * n, status=["added"] * n))


def test_sidecar_round_trip_and_find(tmp_path):
    image = tmp_path / "mouse1.tif"
    image.touch()
    saver = autosave.Autosaver(image, "mouse1", (2, 3, 4, 5), delay_s=10)
    assert saver.path == tmp_path / "mouse1.spines.autosave.csv"
    saver.submit(_table(3), reviewed_sessions=[1, 0])
    assert not saver.path.exists(), "the write waits for the debounce delay"
    assert saver.flush() == saver.path
    record = autosave.find_autosave(image, "mouse1", (2, 3, 4, 5))
    assert record.path == saver.path and record.reviewed_sessions == (0, 1)
    assert record.table["track_id"].tolist() == [1, 2, 3] and record.image == str(image)
    assert autosave.find_autosave(tmp_path / "other.tif", "other", (2, 3, 4, 5)) is None


def test_image_without_file_or_unwritable_folder_goes_to_user_folder(tmp_path, user_data):
    saver = autosave.Autosaver(None, "synthetic series", (2, 3, 4, 5), delay_s=10)
    saver.submit(_table(1))
    path = saver.flush()
    assert path.parent == user_data / "autosave"
    assert path.name.startswith("synthetic_series-")
    assert autosave.find_autosave(None, "synthetic series", (2, 3, 4, 5)).path == path
    assert autosave.find_autosave(None, "synthetic series", (9, 3, 4, 5)) is None
    # a folder that cannot be written (here: a file where the folder should be, which defeats root too)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    image = blocker / "img.tif"
    saver = autosave.Autosaver(image, "img", (1, 2, 3, 4), delay_s=10)
    errors = []
    saver.on_error = errors.append
    saver.submit(_table(2))
    path = saver.flush()
    assert path.parent == user_data / "autosave" and not errors
    assert autosave.find_autosave(image, "img", (1, 2, 3, 4)).table.shape[0] == 2


def test_debounce_saves_during_continuous_edits(tmp_path):
    saver = autosave.Autosaver(tmp_path / "a.tif", "a", (1,), delay_s=0.2)
    start = time.monotonic()
    n = 0
    while time.monotonic() - start < 0.7:
        n += 1
        saver.submit(_table(n))
        time.sleep(0.02)
    # still editing, yet a save happened within the delay of the first edit
    saved = autosave.read_autosave(saver.path).table
    assert 1 <= len(saved) < n
    saver.close()
    assert len(autosave.read_autosave(saver.path).table) == n


def test_invalid_table_reports_error(tmp_path):
    errors = []
    saver = autosave.Autosaver(tmp_path / "a.tif", "a", (1,), delay_s=10, on_error=errors.append)
    bad = pd.concat([_table(1), _table(1)])  # spine 1 twice in session 0
    saver.submit(bad)
    assert saver.flush() is None and "appears twice" in errors[0]


CHILD = textwrap.dedent("""
    import sys, time
    import pandas as pd
    from napari_spine_tracker.io.autosave import Autosaver
    saver = Autosaver(sys.argv[1], "img", (1,), delay_s=1.0)
    n = 0
    while True:
        n += 1
        table = pd.DataFrame(dict(track_id=range(1, n + 1), t=0, z=1.0, y=2.0, x=3.0, score=1.0,
                                  status="added"))
        saver.submit(table, reviewed_sessions=[0])
        print(n, flush=True)
        time.sleep(0.05)
""")


def test_killed_process_loses_at_most_two_seconds(tmp_path):
    image = tmp_path / "img.tif"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(image)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    printed = []  # (time the parent read it, edit count)
    try:
        for line in proc.stdout:
            printed.append((time.monotonic(), int(line)))
            if printed[-1][0] - printed[0][0] > 3.3:
                break
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        proc.kill()
        proc.wait()
    saved = len(autosave.read_autosave(tmp_path / "img.spines.autosave.csv").table)
    must_have = max((n for t, n in printed if t <= killed_at - 2.0), default=0)
    assert must_have > 10, "the child made too few edits to measure anything"
    assert saved >= must_have, f"saved {saved} edits; had made {must_have} more than 2 s before the kill"
