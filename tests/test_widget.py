"""The Spine Tracker dock widget, driven like a user would: detect, correct, cancel, autosave, export."""

import threading
import time

import numpy as np
import pandas as pd
import pytest
from napari.utils.key_bindings import coerce_keybinding
from qtpy.QtCore import Qt

from napari_spine_tracker.core import edits
from napari_spine_tracker.errors import Cancelled, InputError
from napari_spine_tracker.io import autosave
from napari_spine_tracker.widgets import _dialogs, detect
from napari_spine_tracker.widgets.main import SpineTrackerWidget

pytestmark = pytest.mark.gui

VOXEL = (0.5, 0.1, 0.1)


def _predictions():
    """Three spines over three sessions; spine 3 appears in session 1."""
    rows = [(1, 0, 3, 10, 10, 0.9), (1, 1, 3, 10, 11, 0.8), (1, 2, 3, 11, 11, 0.95),
            (2, 0, 4, 20, 20, 0.3), (2, 1, 4, 20, 21, 0.5), (2, 2, 4, 21, 21, 0.4),
            (3, 1, 2, 5, 25, 0.6), (3, 2, 2, 5, 26, 0.7)]
    table = pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x", "score"])
    table[["z", "y", "x"]] = table[["z", "y", "x"]].astype(float)
    table["status"] = "predicted"
    return table


class FakeDetect:
    """Stands in for run_detection: reports progress, honours should_stop, records its call."""

    def __init__(self, table=None, wait_for_stop=False, error=None, suggestions=None):
        self.table = _predictions() if table is None else table
        self.suggestions = (pd.DataFrame({c: pd.Series(dtype=float) for c in ("t", "z", "y", "x", "score")})
                            if suggestions is None else suggestions)
        self.wait_for_stop, self.error = wait_for_stop, error
        self.calls = []
        self.started = threading.Event()

    def __call__(self, image, voxel_size_um, *, model, device, threshold, views, max_rotation_deg, gate_um,
                 max_gap, track_evidence, progress, should_stop):
        self.calls.append(dict(shape=image.shape, voxel_size_um=voxel_size_um, model=model, device=device,
                               threshold=threshold, views=views, max_rotation_deg=max_rotation_deg,
                               gate_um=gate_um, max_gap=max_gap, track_evidence=track_evidence))
        self.started.set()
        deadline = time.monotonic() + 10
        for t in range(image.shape[0]):
            progress(t, image.shape[0])
        while self.wait_for_stop and time.monotonic() < deadline:
            if should_stop():
                raise Cancelled("stopped")
            time.sleep(0.01)
        if self.error is not None:
            raise self.error
        progress(image.shape[0], image.shape[0])
        return self.table.copy(), self.suggestions.copy()


@pytest.fixture(autouse=True)
def no_stray_dialogs(monkeypatch, tmp_path):
    """Autosaves go to a temporary user folder; a dialog a test did not answer fails the test."""
    monkeypatch.setenv("NAPARI_SPINE_TRACKER_DATA_DIR", str(tmp_path / "user"))

    def unexpected(*args, **kwargs):
        raise AssertionError(f"unexpected dialog: {args[1:]}")

    for name in ("ask_yes_no", "ask_merge_or_replace", "choose_directory", "choose_open_file",
                 "choose_save_file"):
        monkeypatch.setattr(_dialogs, name, unexpected)


@pytest.fixture
def fake_detect(monkeypatch):
    fake = FakeDetect()
    monkeypatch.setattr(detect, "run_detection", fake)
    return fake


@pytest.fixture
def viewer_widget(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = np.random.default_rng(0).integers(0, 1000, (3, 6, 32, 32), dtype=np.uint16)
    viewer.add_image(image, name="series", scale=(1.0, *VOXEL))
    widget = SpineTrackerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spine Tracker")
    yield viewer, widget
    widget.flush_autosave()


def _detect(qtbot, widget):
    qtbot.mouseClick(widget.detect.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.detect.running, timeout=10000)


def _table(viewer, sort=False):
    layer = viewer.layers["spines"]
    table = edits.table_from_points(layer.data, layer.features)
    return table.sort_values(["t", "track_id"]).reset_index(drop=True) if sort else table



def test_mirror_views_reach_detection(viewer_widget, qtbot, fake_detect):
    _viewer, widget = viewer_widget
    widget.detect.views.setCurrentText("4")
    widget.detect.max_rotation.setValue(0.0)
    _detect(qtbot, widget)
    assert fake_detect.calls[0]["views"] == 4 and fake_detect.calls[0]["max_rotation_deg"] == 0.0
    assert fake_detect.calls[0]["track_evidence"] is True  # on unless unticked
    widget.detect.track_evidence.setChecked(False)
    _detect(qtbot, widget)
    assert fake_detect.calls[1]["track_evidence"] is False


def test_the_threshold_reaches_detection_and_a_lowered_one_is_told(viewer_widget, qtbot, fake_detect, monkeypatch):
    from napari_spine_tracker.widgets import main

    shown = []
    monkeypatch.setattr(main, "show_info", shown.append)
    _viewer, widget = viewer_widget
    assert widget.detect.threshold.text() == "auto"
    fake_detect.table.attrs.update(threshold=0.23, threshold_adapted=True, model_threshold=0.4)
    _detect(qtbot, widget)
    assert fake_detect.calls[-1]["threshold"] is None  # auto
    assert "peak threshold 0.23, lowered from the model's 0.40" in shown[-1]
    assert widget.detect.threshold.text() == "auto (last: 0.23)"
    widget.detect.threshold.setValue(0.3)
    fake_detect.table.attrs.update(threshold=0.3, threshold_adapted=False)
    _detect(qtbot, widget)
    assert fake_detect.calls[-1]["threshold"] == pytest.approx(0.3) and "lowered" not in shown[-1]
    widget.detect.threshold.setValue(0.0)
    assert widget.detect.threshold.text() == "auto"  # a fixed threshold leaves no "last" auto choice


def test_coarse_voxels_with_the_default_model_suggest_the_coarse_one(viewer_widget, qtbot, fake_detect,
                                                                      monkeypatch):
    shown = []
    monkeypatch.setattr(detect, "show_info", shown.append)
    _viewer, widget = viewer_widget
    _detect(qtbot, widget)
    assert not any("spinenet-synth-coarse" in str(m) for m in shown)  # fine voxels: no hint
    for box, value in zip(widget.detect.voxel, (1.0, 0.2, 0.2), strict=True):
        box.setValue(value)
    _detect(qtbot, widget)
    assert any("spinenet-synth-coarse" in str(m) for m in shown)
    assert fake_detect.calls[-1]["model"] == "spinenet-synth"  # a hint, not a change of model


def test_linking_choices_reach_detection(viewer_widget, qtbot, fake_detect):
    _viewer, widget = viewer_widget
    widget.detect.gate.setValue(0.8)
    widget.detect.max_gap.setValue(0)
    _detect(qtbot, widget)
    assert fake_detect.calls[0]["gate_um"] == pytest.approx(0.8) and fake_detect.calls[0]["max_gap"] == 0


def test_the_auto_gate_is_shown_with_its_last_choice(viewer_widget, qtbot, fake_detect):
    _viewer, widget = viewer_widget
    assert widget.detect.gate.text() == "auto"
    fake_detect.table.attrs.update(gate_um=0.93, gate_auto=True)
    _detect(qtbot, widget)
    assert fake_detect.calls[-1]["gate_um"] == "auto"
    assert widget.detect.gate.text() == "auto (last: 0.93 µm)"
    widget.detect.gate.setValue(1.1)
    fake_detect.table.attrs.update(gate_um=1.1, gate_auto=False)
    _detect(qtbot, widget)
    assert fake_detect.calls[-1]["gate_um"] == pytest.approx(1.1)
    widget.detect.gate.setValue(0.0)
    assert widget.detect.gate.text() == "auto"  # a fixed gate leaves no "last" auto choice

def test_detect_makes_points_and_tracks(viewer_widget, qtbot, fake_detect):
    viewer, widget = viewer_widget
    assert widget.detect.run_button.text() == "Detect spines"
    assert widget.detect.voxel_size_um() == pytest.approx(VOXEL), "voxel size comes from the layer scale"
    _detect(qtbot, widget)
    assert fake_detect.calls[0]["shape"] == (3, 6, 32, 32)
    assert fake_detect.calls[0]["voxel_size_um"] == pytest.approx(VOXEL)
    assert fake_detect.calls[0]["threshold"] is None and fake_detect.calls[0]["views"] == 1
    assert fake_detect.calls[0]["max_rotation_deg"] == 3.0
    assert fake_detect.calls[0]["gate_um"] == "auto" and fake_detect.calls[0]["max_gap"] == 2
    spines = viewer.layers["spines"]
    assert spines.ndim == 4 and len(spines.data) == 8
    assert spines.features["track_id"].dtype == np.int64 and spines.features["score"].dtype == np.float64
    assert set(spines.features["status"]) == {"predicted"}
    assert tuple(spines.scale) == pytest.approx((1.0, *VOXEL))
    assert spines.metadata["spine_tracker"]["schema"] == "spine-points/1"
    assert spines.text.string.format == "{track_id}"
    colours = {tid: tuple(c) for tid, c in zip(spines.features["track_id"], spines.face_color, strict=True)}
    assert len(set(colours.values())) == 3, "each spine has its own colour"
    tracks = viewer.layers["spine tracks"]
    assert tracks.data.shape == (8, 5)
    assert sorted(map(tuple, tracks.data[:, :2].astype(int))) == sorted(
        zip(_predictions()["track_id"], _predictions()["t"], strict=True))
    assert viewer.layers.selection.active is spines


def test_the_dock_is_as_wide_as_its_controls(viewer_widget, qtbot):
    """The sections scroll vertically only: the dock never squeezes the buttons out of sight."""
    _viewer, widget = viewer_widget
    needed = max(section.minimumSizeHint().width() for section in (widget.detect, widget.review, widget.train))
    assert widget.minimumSizeHint().width() >= needed
    qtbot.waitUntil(lambda: widget.width() >= needed, timeout=2000)


def test_errors_reach_the_user_as_notifications(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    shown = []
    monkeypatch.setattr(detect, "show_error", shown.append)
    monkeypatch.setattr(detect, "run_detection", FakeDetect(error=InputError("voxel size too coarse: fix it")))
    _detect(qtbot, widget)
    assert shown == ["voxel size too coarse: fix it"] and "spines" not in viewer.layers
    monkeypatch.setattr(detect, "run_detection", FakeDetect(error=RuntimeError("CUDA out of memory")))
    _detect(qtbot, widget)
    assert shown[-1] == "Detection failed: RuntimeError: CUDA out of memory"
    assert widget.detect.run_button.isEnabled() and widget.detect.model.isEnabled()


def test_cancel(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    fake = FakeDetect(wait_for_stop=True)
    monkeypatch.setattr(detect, "run_detection", fake)
    qtbot.mouseClick(widget.detect.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(fake.started.is_set, timeout=5000)
    assert widget.detect.run_button.text() == "Cancel"
    assert not widget.detect.model.isEnabled() and not widget.detect.image.isEnabled()
    qtbot.mouseClick(widget.detect.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.detect.running, timeout=5000)
    assert widget.detect.run_button.text() == "Detect spines" and widget.detect.model.isEnabled()
    assert "spines" not in viewer.layers


def test_corrections_with_keys_and_undo(viewer_widget, qtbot, fake_detect):
    viewer, widget = viewer_widget
    _detect(qtbot, widget)
    spines, editor = viewer.layers["spines"], widget.editor

    def press(key):
        binding = coerce_keybinding(key)
        assert binding in spines.keymap, f"{key} is not bound on the spines layer"
        spines.keymap[binding](spines)

    # next unconfirmed: lowest score first (spine 2 in session 0, score 0.3), viewer moves there
    press("N")
    (index,) = spines.selected_data
    assert spines.features["score"].iloc[index] == 0.3
    assert viewer.dims.current_step[0] == 0 and viewer.dims.point[1] == pytest.approx(4 * VOXEL[0])
    press("C")
    assert spines.features["status"].iloc[index] == "confirmed"
    assert tuple(spines.border_color[index]) == (1.0, 1.0, 1.0, 1.0), "vetted points get a white border"
    press("N")
    assert spines.features["score"].iloc[next(iter(spines.selected_data))] == 0.4

    # split spine 1 at session 1, then merge it back (select the new part, N = 1)
    rows = _table(viewer)
    at = int(np.flatnonzero((spines.features["track_id"] == 1).to_numpy() & (spines.data[:, 0] == 1))[0])
    spines.selected_data = {at}
    press("X")
    assert spines.features["track_id"].iloc[at] == 4
    assert len(viewer.layers["spine tracks"].properties["track_id"]) == 8
    assert set(viewer.layers["spine tracks"].data[:, 0].astype(int)) == {1, 2, 3, 4}
    widget.review.track.setValue(1)
    qtbot.mouseClick(widget.review.buttons["merge_selected"], Qt.MouseButton.LeftButton)
    assert spines.features["track_id"].iloc[at] == 1

    # assign: re-link the point of spine 3 in session 2 to spine 2 (swaps with spine 2's point)
    s3 = int(np.flatnonzero((spines.features["track_id"] == 3).to_numpy() & (spines.data[:, 0] == 2))[0])
    s2 = int(np.flatnonzero((spines.features["track_id"] == 2).to_numpy() & (spines.data[:, 0] == 2))[0])
    spines.selected_data = {s2}
    spines.selected_data = {s3}
    assert editor.previous_track_id == 2
    widget.review.track.setValue(0)
    press("T")
    assert spines.features["track_id"].iloc[s3] == 2 and spines.features["track_id"].iloc[s2] == 3
    assert spines.features["status"].iloc[s3] == "edited"

    # mark session 0 reviewed
    viewer.dims.set_current_step(0, 0)
    press("R")
    assert spines.metadata["spine_tracker"]["reviewed_sessions"] == [0]

    # delete with the button, then undo everything step by step and redo one
    spines.selected_data = {0}
    qtbot.mouseClick(widget.review.buttons["delete_selected"], Qt.MouseButton.LeftButton)
    assert len(spines.data) == 7 and len(viewer.layers["spine tracks"].data) == 7
    for _ in range(6):
        press("Control-Z")
    pd.testing.assert_frame_equal(_table(viewer), edits.table_from_points(*edits.points_from_table(
        _predictions())))
    assert not widget.review.buttons["undo"].isEnabled()
    press("Control-Shift-Z")
    assert spines.features["status"].iloc[index] == "confirmed"
    assert rows.shape == (8, 7)


def _detect_with_links(viewer_widget, qtbot, monkeypatch):
    """Detection that gives the predictions with link distances: spine 3's point in session 2 lay
    0.9 µm from where its track was expected, the others closer."""
    viewer, widget = viewer_widget
    table = _predictions()
    table["link_um"] = [np.nan, 0.1, 0.2, np.nan, 0.3, 0.15, np.nan, 0.9]
    monkeypatch.setattr(detect, "run_detection", FakeDetect(table=table))
    _detect(qtbot, widget)
    return viewer.layers["spines"]


def test_doubtful_links_are_visited_farthest_first_and_split(viewer_widget, qtbot, monkeypatch):
    from napari_spine_tracker.widgets import review

    viewer, widget = viewer_widget
    spines = _detect_with_links(viewer_widget, qtbot, monkeypatch)
    assert "link_um" in spines.features.columns
    qtbot.mouseClick(widget.review.buttons["jump_to_next_link"], Qt.MouseButton.LeftButton)
    (index,) = spines.selected_data
    assert spines.features["link_um"].iloc[index] == 0.9 and viewer.dims.current_step[0] == 2
    # the user splits it off: a new spine, and the link is no longer the tracker's
    spines.keymap[coerce_keybinding("X")](spines)
    assert spines.features["track_id"].iloc[index] == 4 and np.isnan(spines.features["link_um"].iloc[index])
    spines.keymap[coerce_keybinding("J")](spines)
    assert spines.features["link_um"].iloc[next(iter(spines.selected_data))] == 0.3
    # the table saved from the layer carries the distances, the split point's cleared
    saved = _table(viewer).set_index(["track_id", "t"])["link_um"]
    assert np.isnan(saved[(4, 2)]) and saved[(2, 1)] == 0.3
    # a new detection replaces the table: J starts again from its farthest link
    monkeypatch.setattr(_dialogs, "ask_merge_or_replace", lambda parent, n: "replace")
    _detect(qtbot, widget)
    assert viewer.layers["spines"] is spines and spines.features["link_um"].max() == 0.9
    spines.keymap[coerce_keybinding("J")](spines)
    assert spines.features["link_um"].iloc[next(iter(spines.selected_data))] == 0.9
    shown = []
    monkeypatch.setattr(review, "show_info", shown.append)
    spines.features = spines.features.drop(columns="link_um")
    widget.editor.jump_to_next_link()
    assert "no link distances" in shown[-1]


def test_the_status_line_counts_the_visited_points_left_as_they_were(viewer_widget, qtbot, monkeypatch):
    _, widget = viewer_widget
    spines, editor = _detect_with_links(viewer_widget, qtbot, monkeypatch), widget.editor

    def press(key):
        spines.keymap[coerce_keybinding(key)](spines)

    def score():
        return spines.features["score"].iloc[next(iter(spines.selected_data))]

    press("N")  # 0.3: nothing left yet, so no count
    assert editor.right_in_a_row == {"N": 0, "J": 0} and "in a row" not in widget.review.status.text()
    press("N")  # left 0.3 as it was
    assert score() == 0.4 and editor.right_in_a_row["N"] == 1
    assert "Right in a row: 1 with N, 0 with J" in widget.review.status.text()
    editor.delete_selected()  # 0.4 was false (the Delete key is napari's own)
    press("N")
    assert score() == 0.5 and editor.right_in_a_row["N"] == 0
    press("C")  # confirming is no correction
    press("N")
    assert score() == 0.6 and editor.right_in_a_row["N"] == 1
    press("J")  # leaves 0.6 as it was: N's count goes on; J's starts
    assert spines.features["link_um"].iloc[next(iter(spines.selected_data))] == 0.9
    assert editor.right_in_a_row == {"N": 2, "J": 0}
    press("X")  # the farthest link was wrong
    press("J")
    assert editor.right_in_a_row["J"] == 0
    press("J")
    assert editor.right_in_a_row == {"N": 2, "J": 1}
    assert "Right in a row: 2 with N, 1 with J" in widget.review.status.text()


def _suggestions():
    """Suggestions of missed spines, most likely first: a new spine (session 2), one where spine 3,
    first seen in session 1, was expected in session 0, one where spine 1 already is (hidden), and
    a new one in session 0."""
    return pd.DataFrame({"t": [2, 0, 1, 0], "z": [2.0, 3.0, 3.0, 3.0], "y": [28.0, 5.0, 10.0, 28.0],
                         "x": [5.0, 24.0, 11.2, 28.0], "score": [0.38, 0.31, 0.25, 0.22],
                         "track_id": [0, 3, 1, 0]})


def test_suggestions_of_missed_spines_are_visited_and_accepted(viewer_widget, qtbot, monkeypatch):
    from napari_spine_tracker.widgets import _layers, review

    viewer, widget = viewer_widget
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=_suggestions()))
    _detect(qtbot, widget)
    spines = viewer.layers["spines"]
    shown = viewer.layers["spine suggestions"]
    # the three open ones, under the spines, which stay active; in G's order: where a track
    # expected a spine first, then the most likely
    np.testing.assert_allclose(shown.data, [[0, 3, 5, 24], [2, 2, 28, 5], [0, 3, 28, 28]])
    assert list(shown.features["score"]) == [0.31, 0.38, 0.22]
    assert list(shown.features["expected"]) == ["3", "", ""]  # the id Y would give, written by each square
    assert viewer.layers.index(shown) < viewer.layers.index(spines) and viewer.layers.selection.active is spines
    assert "3 suggestions of missed spines" in widget.review.status.text()
    press = lambda key: spines.keymap[coerce_keybinding(key)](spines)  # noqa: E731
    info = []
    monkeypatch.setattr(review, "show_info", info.append)
    press("Y")  # nothing shown yet
    assert "press G" in info[-1] and len(spines.data) == 8
    press("G")  # the first, outlined white
    assert viewer.dims.current_step[0] == 0 and viewer.dims.point[1] == pytest.approx(3 * VOXEL[0])
    np.testing.assert_allclose(shown.border_color[0], _layers.CURRENT_SUGGESTION_BORDER)
    np.testing.assert_allclose(shown.border_color[1], _layers.SUGGESTION_BORDER)
    press("Y")  # where spine 3 was expected before it was first seen: it continues spine 3; the next is shown
    added = spines.features.iloc[-1]
    np.testing.assert_allclose(spines.data[-1], [0, 3, 5, 24])
    assert added["status"] == "added" and added["score"] == 1.0 and added["track_id"] == 3
    np.testing.assert_allclose(shown.data, [[2, 2, 28, 5], [0, 3, 28, 28]])
    assert viewer.dims.current_step[0] == 2
    np.testing.assert_allclose(shown.border_color[0], _layers.CURRENT_SUGGESTION_BORDER)
    # undo takes the spine away and offers its suggestion again
    press("Control-Z")
    assert len(spines.data) == 8 and len(shown.data) == 3
    press("Control-Shift-Z")
    assert len(spines.data) == 9 and len(shown.data) == 2
    press("Y")  # a spine now, with a new id (no track was expected there)
    assert spines.features["track_id"].iloc[-1] == 4 and spines.data[-1, 0] == 2
    # in link mode an accepted suggestion continues the selected spine (4 has no point in session 0)
    s4 = int(np.flatnonzero(spines.features["track_id"].to_numpy() == 4)[0])
    spines.selected_data = {s4}
    widget.review.link.click()
    qtbot.mouseClick(widget.review.buttons["accept_suggestion"], Qt.MouseButton.LeftButton)
    assert spines.features["track_id"].iloc[-1] == 4 and spines.data[-1, 0] == 0
    assert len(shown.data) == 0
    qtbot.mouseClick(widget.review.buttons["jump_to_next_suggestion"], Qt.MouseButton.LeftButton)
    assert "no suggestion left" in info[-1]
    # the saved table holds the accepted spines like any added by hand
    saved = _table(viewer)
    assert (saved["status"] == "added").sum() == 3
    # closing the layer ends the offer; a table opened later starts without one
    viewer.layers.remove(shown)
    press("G")
    assert "no suggestions" in info[-1]


def test_the_status_line_counts_the_suggestions_left_open_in_a_row(viewer_widget, qtbot, monkeypatch):
    _, widget = viewer_widget
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=_suggestions()))
    _detect(qtbot, widget)
    editor = widget.editor
    editor.jump_to_next_suggestion()  # the first of three open ones: nothing left yet
    assert editor.not_spines_in_a_row == 0 and "in a row" not in widget.review.status.text()
    editor.jump_to_next_suggestion()  # the first was left open: not a spine
    assert editor.not_spines_in_a_row == 1
    assert "not spines in a row: 1 with G" in widget.review.status.text()
    editor.accept_suggestion()  # the second is a spine; Y shows the third
    assert editor.not_spines_in_a_row == 0
    editor.jump_to_next_suggestion()  # the third left open, back to the first
    assert editor.not_spines_in_a_row == 1


def test_a_suggested_track_that_already_has_a_point_there_gives_a_new_id(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    # spine 2 is expected here, but it has a point in session 0 already (placed since, say)
    suggestions = pd.DataFrame({"t": [0], "z": [3.0], "y": [28.0], "x": [28.0], "score": [0.3], "track_id": [2]})
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=suggestions))
    _detect(qtbot, widget)
    widget.editor.jump_to_next_suggestion()
    widget.editor.accept_suggestion()
    spines = viewer.layers["spines"]
    assert spines.features["track_id"].iloc[-1] == 4 and spines.data[-1, 0] == 0


def test_suggestions_go_with_the_table_they_came_with(viewer_widget, qtbot, monkeypatch):
    viewer, widget = viewer_widget
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=_suggestions()))
    _detect(qtbot, widget)
    assert "spine suggestions" in viewer.layers
    monkeypatch.setattr(detect, "run_detection", FakeDetect())  # a detection that suggests nothing
    _detect(qtbot, widget)
    assert "spine suggestions" not in viewer.layers
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=_suggestions()))
    _detect(qtbot, widget)
    viewer.layers.remove(viewer.layers["spines"])  # the table goes, and its suggestions with it
    assert "spine suggestions" not in viewer.layers and "spine tracks" not in viewer.layers


def test_suggestions_are_saved_beside_the_table_and_come_back_with_it(viewer_widget, qtbot, monkeypatch,
                                                                     tmp_path):
    from napari_spine_tracker.io.tables import read_suggestions

    viewer, widget = viewer_widget
    monkeypatch.setattr(detect, "run_detection", FakeDetect(suggestions=_suggestions()))
    _detect(qtbot, widget)
    widget.editor.jump_to_next_suggestion()  # where spine 3 was expected: passed over
    widget.editor.jump_to_next_suggestion()
    widget.editor.accept_suggestion()  # the session-2 one is a spine now
    out = tmp_path / "m1.spines.csv"
    monkeypatch.setattr(_dialogs, "choose_save_file", lambda *args: str(out))
    assert widget.save_table() == out
    saved = read_suggestions(tmp_path / "m1.suggestions.csv")
    pd.testing.assert_frame_equal(saved, _suggestions(), check_dtype=False)  # all, the accepted one too
    # a later napari session: the table opens through the reader and the editor offers them again
    viewer.layers.remove(viewer.layers["spines"])
    assert "spine suggestions" not in viewer.layers
    viewer.open(str(out), plugin="napari-spine-tracker")
    shown, spines = viewer.layers["spine suggestions"], viewer.layers["spines"]
    assert widget.editor.layer is spines and len(spines.data) == 9
    # the table has no voxel size: it takes the image's scale, so that its points lie on the image
    np.testing.assert_allclose(spines.scale, (1.0, *VOXEL))
    np.testing.assert_allclose(viewer.layers["spine tracks"].scale, (1.0, *VOXEL))
    np.testing.assert_allclose(shown.scale, (1.0, *VOXEL))
    # the accepted one and the one where spine 1 lies stay hidden; the one where spine 3 was expected
    # still continues spine 3
    np.testing.assert_allclose(shown.data, [[0, 3, 5, 24], [0, 3, 28, 28]])
    widget.editor.jump_to_next_suggestion()
    widget.editor.accept_suggestion()
    assert spines.features["track_id"].iloc[-1] == 3
    # closing the layer ends the offer: saving then removes the file, which no longer goes with the table
    viewer.layers.remove(shown)
    info = []
    monkeypatch.setattr("napari_spine_tracker.widgets.main.show_info", info.append)
    assert widget.save_table() == out
    assert not (tmp_path / "m1.suggestions.csv").exists() and "removed m1.suggestions.csv" in info[-1]


def test_a_series_opens_with_the_table_and_suggestions_detection_wrote(make_napari_viewer, tmp_path):
    """``napari-spine-tracker detect X.tif --suggestions``, then ``gui X.tif``: ready to review."""
    from napari_spine_tracker.io.series import write_series_tiff
    from napari_spine_tracker.io.tables import write_spine_table, write_suggestions

    path = write_series_tiff(tmp_path / "m1.tif", np.zeros((3, 6, 32, 32), np.uint16), VOXEL)
    write_spine_table(_predictions(), tmp_path / "m1.spines.csv")
    write_suggestions(_suggestions(), tmp_path / "m1.suggestions.csv")
    viewer = make_napari_viewer()
    widget = SpineTrackerWidget(viewer)
    viewer.open(str(path), plugin="napari-spine-tracker")
    spines = viewer.layers["spines"]
    assert widget.editor.layer is spines and widget.detect.image_layer() is viewer.layers["m1"]
    for name in ("m1", "spines", "spine tracks", "spine suggestions"):
        np.testing.assert_allclose(viewer.layers[name].scale, (1.0, *VOXEL), err_msg=name)
    assert len(viewer.layers["spine suggestions"].data) == 3
    assert widget.editor.jump_to_next_suggestion() == 0
    assert viewer.dims.axis_labels == ("t", "z", "y", "x")


def test_gui_command_opens_a_series_for_review(make_napari_viewer, tmp_path, monkeypatch):
    import napari
    import tifffile

    from napari_spine_tracker.cli import main
    from napari_spine_tracker.io.series import write_series_tiff
    from napari_spine_tracker.io.tables import write_spine_table

    viewer = make_napari_viewer()
    monkeypatch.setattr(napari, "Viewer", lambda: viewer)
    monkeypatch.setattr(napari, "run", lambda: None)
    path = write_series_tiff(tmp_path / "m1.tif", np.zeros((3, 6, 32, 32), np.uint16), VOXEL)
    write_spine_table(_predictions(), tmp_path / "m1.spines.csv")
    assert main(["gui", str(path)]) == 0
    assert [layer.name for layer in viewer.layers] == ["m1", "spine tracks", "spines"]
    np.testing.assert_allclose(viewer.layers["spines"].scale, (1.0, *VOXEL))
    # a TIFF this plugin does not read whole (two channels) goes to napari's own reader
    viewer.layers.clear()
    two = tmp_path / "two.tif"
    tifffile.imwrite(two, np.zeros((2, 4, 2, 8, 9), np.uint16), imagej=True, metadata={"axes": "TZCYX"})
    assert main(["gui", str(two)]) == 0
    assert len(viewer.layers) >= 1 and "spines" not in viewer.layers
    assert main(["gui", str(tmp_path / "missing.tif")]) == 2


def test_napari_tools_add_move_delete(viewer_widget, qtbot, fake_detect):
    viewer, widget = viewer_widget
    _detect(qtbot, widget)
    spines, editor = viewer.layers["spines"], widget.editor
    # napari's add tool: a new spine with a new id
    spines.add([1, 3, 28, 28])
    assert spines.features["track_id"].iloc[-1] == 4 and spines.features["status"].iloc[-1] == "added"
    assert spines.features["score"].iloc[-1] == 1.0
    assert 4 in viewer.layers["spine tracks"].data[:, 0]
    # link mode: select spine 3's session-2 point, add in session 0 -> continues spine 3
    s3 = int(np.flatnonzero((spines.features["track_id"] == 3).to_numpy() & (spines.data[:, 0] == 2))[0])
    spines.selected_data = {s3}
    widget.review.link.click()
    assert editor.link_new_points
    spines.add([0, 2, 5, 24])
    assert spines.features["track_id"].iloc[-1] == 3 and spines.data[-1, 0] == 0
    # linking into a session where the spine already is gives a new id and a warning
    spines.selected_data = {s3}
    spines.add([2, 2, 30, 2])
    assert spines.features["track_id"].iloc[-1] == 5
    # a drag (napari's move) marks a prediction edited, as one undo step
    spines.selected_data = {0}
    spines._move({0}, [0, 3, 10, 10])
    spines._move({0}, [0, 3, 12, 12])
    assert spines.features["status"].iloc[0] == "edited"
    # napari's Delete key
    n = len(spines.data)
    spines.selected_data = {n - 1}
    spines.remove_selected()
    assert len(spines.data) == n - 1
    widget.editor.undo()
    assert len(spines.data) == n
    widget.editor.undo()
    assert spines.features["status"].iloc[0] == "predicted", "the whole drag is one undo step"
    # copy session 0 and paste into session 2: free ids are kept
    viewer.dims.set_current_step(0, 0)
    at0 = set(np.flatnonzero(spines.data[:, 0] == 0).tolist())
    spines.selected_data = at0
    spines.keymap[coerce_keybinding("Control-C")](spines)
    viewer.dims.set_current_step(0, 2)
    spines.keymap[coerce_keybinding("Control-V")](spines)
    pasted = spines.features.iloc[-len(at0):]
    assert set(pasted["status"]) == {"added"} and (spines.data[-len(at0):, 0] == 2).all()


def test_rerun_keeps_corrections_when_asked(viewer_widget, qtbot, fake_detect, monkeypatch):
    viewer, widget = viewer_widget
    _detect(qtbot, widget)
    spines = viewer.layers["spines"]
    spines.selected_data = {3}  # spine 2, session 0
    widget.editor.confirm_selected()
    asked = []
    monkeypatch.setattr(_dialogs, "ask_merge_or_replace", lambda parent, n: asked.append(n) or "cancel")
    _detect(qtbot, widget)
    assert asked == [1] and spines.features["status"].iloc[3] == "confirmed"
    # the new run moved spine 2 a little and numbers tracks differently
    moved = _predictions()
    moved["track_id"] = moved["track_id"].map({1: 7, 2: 8, 3: 9})
    moved.loc[3, "y"] += 0.5
    fake_detect.table = moved
    monkeypatch.setattr(_dialogs, "ask_merge_or_replace", lambda parent, n: "merge")
    _detect(qtbot, widget)
    table = _table(viewer)
    kept = table[(table["t"] == 0) & (table["status"] == "confirmed")]
    assert kept[["track_id", "y"]].values.tolist() == [[2, 20.0]], "the confirmed point and its id stay"
    assert sorted(table.loc[table["y"].between(19, 22), "track_id"].unique()) == [2], \
        "the new run's track through the confirmed point took its id"
    assert len(table) == 8
    monkeypatch.setattr(_dialogs, "ask_merge_or_replace", lambda parent, n: "replace")
    widget.detect.voxel[0].setValue(0.6)  # the user corrects the z voxel size, then detects again
    _detect(qtbot, widget)
    assert set(_table(viewer)["status"]) == {"predicted"}
    for name in ("series", "spines", "spine tracks"):
        assert viewer.layers[name].scale[-3] == pytest.approx(0.6), name
    widget.editor.undo()
    assert "confirmed" in set(_table(viewer)["status"]), "a replacing run can be undone"


def test_autosave_and_restore(make_napari_viewer, qtbot, fake_detect, monkeypatch, tmp_path):
    from napari_spine_tracker.io.series import write_series_tiff

    path = tmp_path / "mouse1.tif"
    write_series_tiff(path, np.random.default_rng(1).integers(0, 500, (3, 6, 32, 32), dtype=np.uint16), VOXEL)
    viewer = make_napari_viewer()
    viewer.open(path, plugin="napari")  # napari's own TIFF reader: no scale, the widget reads the file's
    widget = SpineTrackerWidget(viewer)
    _detect(qtbot, widget)
    assert fake_detect.calls[0]["voxel_size_um"] == pytest.approx(VOXEL)
    sidecar = tmp_path / "mouse1.spines.autosave.csv"
    qtbot.waitUntil(sidecar.exists, timeout=5000)
    spines = viewer.layers["spines"]
    spines.selected_data = {0}
    widget.editor.confirm_selected()
    widget.editor.toggle_reviewed(1)
    qtbot.waitUntil(lambda: autosave.read_autosave(sidecar).reviewed_sessions == (1,), timeout=5000)
    assert (autosave.read_autosave(sidecar).table["status"] == "confirmed").sum() == 1
    expected = _table(viewer, sort=True)
    widget.flush_autosave()

    # a new viewer with the widget already docked; opening the same file offers the autosave
    viewer2 = make_napari_viewer()
    widget2 = SpineTrackerWidget(viewer2)
    asked = []
    monkeypatch.setattr(_dialogs, "ask_yes_no", lambda parent, title, text: asked.append(text) or True)
    viewer2.open(path, plugin="napari")
    qtbot.waitUntil(lambda: "spines" in viewer2.layers, timeout=5000)
    assert len(asked) == 1 and "mouse1" in asked[0]
    pd.testing.assert_frame_equal(_table(viewer2, sort=True), expected)
    assert viewer2.layers["spines"].metadata["spine_tracker"]["reviewed_sessions"] == [1]
    assert tuple(viewer2.layers["spines"].scale) == pytest.approx((1.0, 0.5, 0.1, 0.1))
    # removing the spines layer removes its tracks and unbinds the autosave from this image
    viewer2.layers.remove("spines")
    assert "spine tracks" not in viewer2.layers and widget2.autosaver is None


def test_export_training_set_and_save_table(viewer_widget, qtbot, fake_detect, monkeypatch, tmp_path):
    import tifffile

    from napari_spine_tracker.io import trainset

    viewer, widget = viewer_widget
    _detect(qtbot, widget)
    widget.editor.toggle_reviewed(0)
    folder = tmp_path / "trainset"
    monkeypatch.setattr(_dialogs, "choose_directory", lambda parent, title: str(folder))
    widget.export()
    qtbot.waitUntil(lambda: widget._export_worker is None, timeout=10000)
    viewer.layers["series"].name = "series 2"
    widget.export()
    qtbot.waitUntil(lambda: widget._export_worker is None, timeout=10000)
    items = trainset.read_training_set(folder)
    assert len(items) == 2
    assert list(items[0].reviewed_sessions) == [0]
    assert tuple(items[0].voxel_size_um) == pytest.approx(VOXEL)
    image = tifffile.imread(items[0].image_path)
    np.testing.assert_array_equal(image, viewer.layers["series 2"].data)
    assert len(pd.read_csv(items[1].spines_path)) == 8

    out = tmp_path / "out.spines.csv"
    monkeypatch.setattr(_dialogs, "choose_save_file", lambda *args: str(out))
    assert widget.save_table() == out
    back = pd.read_csv(out)
    assert len(back) == 8 and set(back["track_id"]) == {1, 2, 3}


@pytest.mark.slow
def test_end_to_end_with_real_detection(make_napari_viewer, qtbot, monkeypatch, tiny_checkpoint):
    """The real detect_series in the real worker, with a checkpoint chosen through Browse…."""
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    synth = synthesize_series(SynthConfig.preset("tiny", seed=0))
    viewer = make_napari_viewer()
    viewer.add_image(synth.image, name="tiny", scale=(1.0, *synth.voxel_size_um))
    widget = SpineTrackerWidget(viewer)
    monkeypatch.setattr(_dialogs, "choose_open_file", lambda *args: str(tiny_checkpoint))
    browse = widget.detect.model.findText(detect.BROWSE)
    widget.detect.model.setCurrentIndex(browse)
    widget.detect.model.activated.emit(browse)
    assert widget.detect.model.currentText() == str(tiny_checkpoint)
    widget.detect.device.setCurrentText("cpu")
    progress = []
    widget.detect._relay.progressed.connect(lambda done, total: progress.append((done, total)))
    qtbot.mouseClick(widget.detect.run_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not widget.detect.running, timeout=120000)
    assert progress and progress[-1][0] == progress[-1][1], "progress reached the GUI and completed"
    spines = viewer.layers["spines"]
    table = _table(viewer)
    assert len(table) > 0 and len(viewer.layers["spine tracks"].data) == len(table)
    shape = np.array(synth.image.shape)
    assert table["t"].between(0, shape[0] - 1).all()
    assert ((table[["z", "y", "x"]].to_numpy() > -1) & (table[["z", "y", "x"]].to_numpy() < shape[1:])).all()
    assert tuple(spines.scale) == pytest.approx((1.0, *synth.voxel_size_um))
    widget.flush_autosave()
