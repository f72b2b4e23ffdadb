"""Regenerate docs/screenshot.png: the synthetic sample, detection, a few corrections, the widget.

Run under a virtual X server from the project root:
    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshot.py
``--truth`` shows the ground truth as if it were a detection (when no trained model is at hand).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from napari._qt.dialogs.qt_notification import NapariQtNotification
from qtpy.QtWidgets import QApplication

from napari_spine_tracker._napari import make_sample_series
from napari_spine_tracker.widgets import detect
from napari_spine_tracker.widgets.main import SpineTrackerWidget


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).with_name("screenshot.png")))
    parser.add_argument("--truth", action="store_true", help="show the truth instead of a detection")
    parser.add_argument("--session", type=int, default=2)
    args = parser.parse_args()
    # keep this run's autosave out of the user's folder
    os.environ["NAPARI_SPINE_TRACKER_DATA_DIR"] = tempfile.mkdtemp()

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    for data, kwargs, kind in make_sample_series():
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    truth = viewer.layers["truth"]
    if args.truth:
        from napari_spine_tracker.core.edits import table_from_points

        table = table_from_points(truth.data, truth.features)
        table["score"] = np.round(np.random.default_rng(0).uniform(0.3, 1.0, len(table)), 2)
        table["status"] = "predicted"
        detect.run_detection = lambda *a, progress, should_stop, **k: (table, table.iloc[:0, 1:6])
    widget = SpineTrackerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spine Tracker", area="right")
    app = QApplication.instance()
    widget.detect.start()
    while widget.detect.running:
        app.processEvents()
    spines = viewer.layers["spines"]
    image = viewer.layers["synthetic series"]
    image.contrast_limits = np.percentile(np.asarray(image.data[args.session]), [1, 99.8]).tolist()
    viewer.dims.set_current_step(0, args.session)
    # a few corrections, as a reviewer would have made them
    for _ in range(3):
        widget.editor.jump_to_next()
        widget.editor.confirm_selected()
    in_session = np.flatnonzero(spines.data[:, 0] == args.session)
    spines.selected_data = set(in_session[::4].tolist())
    widget.editor.confirm_selected()
    widget.editor.toggle_reviewed(0)
    viewer.dims.set_current_step(0, args.session)
    viewer.dims.set_current_step(1, int(np.median(spines.data[spines.data[:, 0] == args.session, 1])))
    # a thick slab (max projection over 4 µm of z) shows more spines at once
    image.projection_mode = "max"
    spines.projection_mode = "all"
    if "spine suggestions" in viewer.layers:
        viewer.layers["spine suggestions"].projection_mode = "all"
    viewer.dims.thickness = (1, 4.0, 0, 0)
    spines.selected_data = set()
    viewer.reset_view()
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.05)
    viewer.screenshot(args.out, canvas_only=False, flash=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
