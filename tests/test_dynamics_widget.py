"""The Dynamics widget follows the ``spines`` layer: table, plot, updates after edits, exports."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.widgets.dynamics import spine_table_from_layer

pytestmark = pytest.mark.gui

# (track_id, t): track 1 throughout, 2 lost in 2, 3 gained in 1
POINTS = [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 1), (3, 2)]


def add_spines(viewer, points=POINTS):
    data = np.array([(t, 2.0, 5.0 * tid, 5.0) for tid, t in points], float)
    features = pd.DataFrame({"track_id": [tid for tid, _ in points], "score": 0.9, "status": "predicted"})
    return viewer.add_points(data, ndim=4, name="spines", features=features)


def column(widget, header: str) -> list[str]:
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    col = headers.index(header)
    return [widget.table.item(r, col).text() for r in range(widget.table.rowCount())]


def test_table_from_layer_tolerates_unassigned_and_duplicate_points():
    data = np.array([[0, 1, 1, 1], [0, 2, 2, 2], [1, 3, 3, 3], [1, 4, 4, 4]], float)
    features = pd.DataFrame({"track_id": [1, 0, 1, 1]})
    table, notes = spine_table_from_layer(data, features)
    assert table["track_id"].tolist() == [1, 2, 1, 1]
    assert len(notes) == 2 and "without a track id" in notes[0] and "counted once" in notes[1]


def test_widget_follows_the_spines_layer(make_napari_viewer, qtbot, tmp_path):
    from napari_spine_tracker.widgets.dynamics import DynamicsWidget

    viewer = make_napari_viewer()
    widget = DynamicsWidget(viewer)
    qtbot.addWidget(widget)
    assert widget.result is None and widget.table.rowCount() == 0

    layer = add_spines(viewer)
    qtbot.waitUntil(lambda: widget.table.rowCount() == 3, timeout=10000)
    assert column(widget, "present") == ["2", "3", "2"]
    assert column(widget, "gained") == ["0", "1", "0"]
    assert column(widget, "lost") == ["0", "0", "1"]
    assert column(widget, "survival") == ["1.000", "1.000", "0.500"]
    assert len(widget.figure.axes) >= 2

    # an edit: delete track 2's point in session 1, so it is lost one session earlier
    layer.selected_data = {4}
    layer.remove_selected()
    qtbot.waitUntil(lambda: column(widget, "lost") == ["0", "1", "0"], timeout=10000)
    assert column(widget, "present") == ["2", "2", "2"]

    # an image with 5 sessions: the empty trailing sessions count
    viewer.add_image(np.zeros((5, 4, 16, 16), np.uint16))
    widget.refresh()
    assert widget.table.rowCount() == 5 and column(widget, "lost")[3] == "2"

    widget.length.setValue(20.0)
    qtbot.waitUntil(lambda: column(widget, "per µm")[0] == f"{2 / 20:.3f}", timeout=10000)

    csv = widget.export_csv(tmp_path / "dyn.csv")
    assert pd.read_csv(csv)["lost"].tolist() == [0, 1, 0, 2, 0]
    png = widget.export_png(tmp_path / "dyn.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    viewer.layers.remove(layer)
    qtbot.waitUntil(lambda: widget.result is None, timeout=10000)
    assert "no spines layer" in widget.status.text()


def test_widget_measures_the_dendrite(make_napari_viewer, qtbot):
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.widgets.dynamics import DynamicsWidget

    series = synthesize_series(SynthConfig.preset("tiny", seed=1, sessions=2, shape=(16, 200, 200)))
    viewer = make_napari_viewer()
    viewer.add_image(series.image, scale=(1.0, *series.voxel_size_um))
    add_spines(viewer)
    widget = DynamicsWidget(viewer)
    qtbot.addWidget(widget)
    worker = widget.measure_dendrite_length()
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: widget.dendrite_length_um is not None, timeout=10000)
    assert len(widget.dendrite_length_um) == series.image.shape[0]
    np.testing.assert_allclose(widget.dendrite_length_um, series.session_dendrite_length_um, rtol=0.2)
    assert "density_per_um" in widget.result.sessions


def test_a_closed_widget_stops_listening(make_napari_viewer, qtbot):
    from napari_spine_tracker.widgets.dynamics import DynamicsWidget

    viewer = make_napari_viewer()
    widget = DynamicsWidget(viewer)
    layer = add_spines(viewer)
    qtbot.waitUntil(lambda: widget.result is not None, timeout=10000)
    n_before = len(viewer.layers.events.inserted.callbacks)
    with qtbot.waitSignal(widget.destroyed, timeout=5000):
        widget.deleteLater()
    assert len(viewer.layers.events.inserted.callbacks) == n_before - 1
    layer.selected_data = {0}
    layer.remove_selected()  # its data event reaches a deleted widget: must not raise
    viewer.layers.remove(layer)
