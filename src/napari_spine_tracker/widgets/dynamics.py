"""The Dynamics section: gains, losses, turnover and survival, live from the ``spines`` layer.

A thin view over :mod:`napari_spine_tracker.core.dynamics`: it reads the ``spines`` Points layer
(ndim 4: t, z, y, x; ``features.track_id``), recomputes after edits (the layer's data and features
events, debounced with a QTimer), shows the per-session table and the same figure as the
``dynamics`` command (``io.reports.draw_dynamics_figure`` on a Qt canvas), and exports both.
Densities need a dendrite length: typed in, or measured on the image in a worker thread
(``core.morphology``), which never touches layers or widgets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..core.dynamics import DynamicsResult, compute_dynamics
from ..errors import InputError

log = logging.getLogger(__name__)

SPINES_LAYER = "spines"
DEBOUNCE_MS = 250
#: (column of the session table, header, format)
TABLE_COLUMNS = (
    ("t", "session", "{:d}"),
    ("n_present", "present", "{:d}"),
    ("gained", "gained", "{:d}"),
    ("lost", "lost", "{:d}"),
    ("stable", "stable", "{:d}"),
    ("turnover", "turnover", "{:.3f}"),
    ("survival", "survival", "{:.3f}"),
    ("density_per_um", "per µm", "{:.3f}"),
)


def _disconnecter(viewer, callback):
    """A slot for ``destroyed`` that stops the viewer calling a deleted widget (holds no widget)."""
    def disconnect(*_):
        try:
            layers = viewer.layers
        except AttributeError:  # the viewer went first (interpreter exit): nothing left to call us
            return
        layers.events.inserted.disconnect(callback)
        layers.events.removed.disconnect(callback)
    return disconnect


def spine_table_from_layer(data: np.ndarray, features: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``(track_id, t)`` of the layer's points, and notes on what was tolerated.

    ``data`` (N, 4) t, z, y, x. A point without a track id (< 1, e.g. just placed by hand) counts
    as a spine of its own; a track with two points in one session counts once there.
    """
    data = np.asarray(data, dtype=float).reshape(-1, 4)
    if "track_id" not in features.columns:
        raise InputError("the spines layer has no track_id feature; open a spine table or run detection.")
    ids = pd.to_numeric(features["track_id"], errors="coerce").to_numpy(dtype=float)
    table = pd.DataFrame({"track_id": ids, "t": np.round(data[:, 0])})
    notes = []
    unassigned = ~(table["track_id"] >= 1)
    if unassigned.any():
        start = int(np.nanmax(ids, initial=0)) + 1
        table.loc[unassigned, "track_id"] = np.arange(start, start + int(unassigned.sum()))
        notes.append(f"{int(unassigned.sum())} point(s) without a track id counted as separate spines")
    table = table.astype("int64")
    duplicated = table.duplicated(["track_id", "t"])
    if duplicated.any():
        first = table[duplicated].iloc[0]
        notes.append(f"spine {first.track_id} has {int(duplicated.sum()) + 1}+ points in one session "
                     f"(e.g. session {first.t}); counted once")
    return table, notes


class DynamicsWidget(QWidget):
    """Per-session spine dynamics of the viewer's ``spines`` layer, as a table and a plot."""

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__(parent)
        self.viewer = viewer
        self.layer = None
        self.result: DynamicsResult | None = None
        self.dendrite_length_um: np.ndarray | None = None  #: measured per session, (T,)
        self._worker = None

        self.max_gap = QSpinBox()
        self.max_gap.setRange(0, 10)
        self.max_gap.setValue(1)
        self.max_gap.setToolTip("a spine missing for at most this many sessions between two sightings "
                                "was missed, not lost and regained")
        self.length = QDoubleSpinBox()
        self.length.setRange(0.0, 1e6)
        self.length.setDecimals(1)
        self.length.setSuffix(" µm")
        self.length.setSpecialValueText("unknown")
        self.length.setToolTip("dendrite length in the field, for densities (0: unknown)")
        self.measure_button = QPushButton("Measure on image")
        self.measure_button.setToolTip("estimate the dendrite length of each session from the image layer")
        form = QFormLayout()
        form.addRow("max gap (sessions)", self.max_gap)
        length_row = QHBoxLayout()
        length_row.addWidget(self.length, 1)
        length_row.addWidget(self.measure_button)
        form.addRow("dendrite length", length_row)

        self.status = QLabel("no spines layer")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([header for _, header, _ in TABLE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(120)
        self.figure = Figure(figsize=(4.0, 5.5), dpi=90)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(420)
        self.csv_button = QPushButton("Export CSV…")
        self.png_button = QPushButton("Export PNG…")
        buttons = QHBoxLayout()
        buttons.addWidget(self.csv_button)
        buttons.addWidget(self.png_button)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(form)
        layout.addWidget(self.status)
        layout.addWidget(self.table)
        layout.addWidget(self.canvas)
        layout.addLayout(buttons)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.refresh)
        self.max_gap.valueChanged.connect(self.schedule_refresh)
        self.length.valueChanged.connect(self._on_length_typed)
        self.measure_button.clicked.connect(self.measure_dendrite_length)
        self.csv_button.clicked.connect(self._ask_export_csv)
        self.png_button.clicked.connect(self._ask_export_png)
        viewer.layers.events.inserted.connect(self._on_layers_changed)
        viewer.layers.events.removed.connect(self._on_layers_changed)
        self.destroyed.connect(_disconnecter(viewer, self._on_layers_changed))
        self._on_layers_changed()

    # ---------------------------------------------------------------------------------------
    # following the spines layer

    def _find_layer(self):
        from napari.layers import Points

        for layer in self.viewer.layers:
            if isinstance(layer, Points) and layer.name == SPINES_LAYER and layer.ndim == 4:
                return layer
        return None

    def _on_layers_changed(self, event=None) -> None:
        layer = self._find_layer()
        if layer is not self.layer:
            self._forget_layer()
            self.layer = layer
            if layer is not None:
                layer.events.data.connect(self.schedule_refresh)
                layer.events.features.connect(self.schedule_refresh)
        self.schedule_refresh()

    def schedule_refresh(self, event=None) -> None:
        """Recompute a moment after the last change (edits come in bursts)."""
        try:
            self._timer.start()
        except RuntimeError:  # the widget was closed and its Qt side deleted
            self._forget_layer()

    def _forget_layer(self) -> None:
        if self.layer is not None:
            self.layer.events.data.disconnect(self.schedule_refresh)
            self.layer.events.features.disconnect(self.schedule_refresh)
        self.layer = None

    def n_sessions(self) -> int | None:
        """Sessions in the series: the longest 4D image layer, or None (then the table's last session)."""
        from napari.layers import Image

        lengths = [int(layer.data.shape[0]) for layer in self.viewer.layers
                   if isinstance(layer, Image) and layer.ndim == 4]
        return max(lengths) if lengths else None

    # ---------------------------------------------------------------------------------------
    # computing and showing

    def refresh(self) -> None:
        """Recompute the statistics from the spines layer now and show them."""
        self._timer.stop()
        if self.layer is None:
            self._show(None, "no spines layer: run detection or open a spine table")
            return
        try:
            table, notes = spine_table_from_layer(self.layer.data, self.layer.features)
            n_sessions = self.n_sessions()
            if n_sessions is not None and len(table) and table["t"].max() >= n_sessions:
                n_sessions = None  # points beyond the image: let the table decide
            length = self._length_for(n_sessions if n_sessions is not None
                                      else (int(table["t"].max()) + 1 if len(table) else 0))
            result = compute_dynamics(table, n_sessions, max_gap=self.max_gap.value(),
                                      dendrite_length_um=length)
        except InputError as exc:
            self._show(None, str(exc))
            return
        n_tracks = table["track_id"].nunique()
        message = f"{len(table)} points, {n_tracks} spines, {len(result.sessions)} sessions"
        self._show(result, "; ".join([message, *notes]))

    def _length_for(self, n_sessions: int) -> float | np.ndarray | None:
        if self.dendrite_length_um is not None and len(self.dendrite_length_um) == n_sessions:
            return self.dendrite_length_um
        return self.length.value() or None

    def _show(self, result: DynamicsResult | None, message: str) -> None:
        from ..io.reports import draw_dynamics_figure

        self.result = result
        self.status.setText(message)
        sessions = result.sessions if result is not None else pd.DataFrame()
        self.table.setRowCount(len(sessions))
        for row, record in enumerate(sessions.itertuples(index=False)):
            values = record._asdict()
            for col, (name, _, fmt) in enumerate(TABLE_COLUMNS):
                value = values.get(name)
                text = "" if value is None or pd.isna(value) else fmt.format(value)
                self.table.setItem(row, col, QTableWidgetItem(text))
        if result is not None and len(sessions):
            draw_dynamics_figure(self.figure, sessions, result.survival, vertical=True)
        else:
            self.figure.clear()
        self.canvas.draw_idle()

    # ---------------------------------------------------------------------------------------
    # dendrite length

    def _on_length_typed(self, value: float) -> None:
        self.dendrite_length_um = None  # a typed length replaces a measured one
        self.schedule_refresh()

    def image_layer(self):
        """The 4D image the spines were found on (the first 4D image layer), or None."""
        from napari.layers import Image

        images = [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim == 4]
        return images[0] if images else None

    def measure_dendrite_length(self):
        """Estimate the dendrite length of every session of the image layer, in a worker thread.

        The voxel size is the image layer's scale (z, y, x in µm). Returns the worker (started).
        """
        from napari.qt.threading import create_worker
        from napari.utils.notifications import show_warning

        image = self.image_layer()
        if image is None:
            show_warning("no 4D image layer (T, Z, Y, X) to measure the dendrite on.")
            return None
        voxel = tuple(float(s) for s in image.scale[-3:])
        if np.allclose(voxel, 1.0):
            show_warning(f"the image layer {image.name!r} has no voxel size (its scale is 1): lengths "
                         "are in voxels, not µm. Open the series with its metadata to fix this.")
        from ..core.morphology import measure_series

        data = image.data

        def work():
            lengths, _ = measure_series(data, voxel)
            return lengths

        self._worker = create_worker(work)
        self._worker.returned.connect(self._on_measured)
        self._worker.errored.connect(lambda exc: show_warning(f"dendrite length not measured: {exc}"))
        self._worker.finished.connect(lambda: self.measure_button.setEnabled(True))
        self.measure_button.setEnabled(False)
        self.status.setText(f"measuring the dendrite in {image.name!r}…")
        self._worker.start()
        return self._worker

    def _on_measured(self, lengths: np.ndarray) -> None:
        self.length.blockSignals(True)
        self.length.setValue(float(np.mean(lengths)))
        self.length.blockSignals(False)
        self.dendrite_length_um = np.asarray(lengths, dtype=float)
        self.refresh()

    # ---------------------------------------------------------------------------------------
    # exports

    def export_csv(self, path: str | Path) -> Path:
        """Write the per-session table to ``path`` (atomically); InputError without one."""
        from ..io.reports import write_table_csv

        if self.result is None:
            raise InputError("no dynamics to export: the viewer needs a spines layer with points.")
        return write_table_csv(self.result.sessions, path)

    def export_png(self, path: str | Path) -> Path:
        """Save the figure as shown to ``path`` (atomically)."""
        from ..io.reports import save_figure_png

        if self.result is None:
            raise InputError("no dynamics to export: the viewer needs a spines layer with points.")
        return save_figure_png(self.figure, path)

    def _ask_export(self, title: str, suggestion: str, file_filter: str, export) -> None:
        from napari.utils.notifications import show_info, show_warning

        from . import _dialogs

        path = _dialogs.choose_save_file(self, title, suggestion, file_filter)
        if not path:
            return
        try:
            show_info(f"wrote {export(path)}")
        except (InputError, OSError) as exc:
            show_warning(str(exc))

    def _ask_export_csv(self) -> None:
        self._ask_export("Export spine dynamics", "dynamics.csv", "CSV (*.csv)", self.export_csv)

    def _ask_export_png(self) -> None:
        self._ask_export("Export dynamics plot", "dynamics.png", "PNG image (*.png)", self.export_png)
