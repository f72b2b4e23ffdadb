"""The ``Spine Tracker`` dock widget: detect, review and correct, autosave, export.

Sections (collapsible, added with :meth:`SpineTrackerWidget.add_section`): Detect
(:class:`~.detect.DetectPanel`), Review and correct (:class:`~.review.ReviewPanel` over a
:class:`~.review.SpineEditor`), Export, Train (:class:`~.train.TrainWidget`), and Dynamics when
``widgets/dynamics.py`` provides it. The widget wires them together: detection results become the
``spines`` layer (merged with the human corrections when asked), every change is autosaved, a
saved session is offered back when its image is opened again, and a model trained in the Train
section is listed and chosen for the next detection at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

import napari
import numpy as np
import pandas as pd
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QSize, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QFrame,
    QHBoxLayout,
    QPushButton,
    QScrollArea,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..core import edits
from ..core.detect import threshold_note
from ..core.edits import SpineState
from ..errors import InputError
from ..io.autosave import Autosaver, find_autosave, safe_name
from . import _dialogs
from ._models import add_model_description, refresh_model_choice
from .detect import DetectPanel, series_input
from .review import ReviewPanel, SpineEditor
from .train import TrainWidget

log = logging.getLogger(__name__)


def export_training_set(folder: str | Path, name: str, image, spines: pd.DataFrame,
                        voxel_size_um: Sequence[float], reviewed_sessions: Iterable[int]):
    """Append one corrected series to the training set in ``folder`` (DESIGN §3); returns the item.

    ``image`` (T, Z, Y, X); ``spines`` a spine table; voxel size z, y, x in µm.
    """
    from ..io.series import SeriesArray
    from ..io.trainset import append_training_item

    if not isinstance(image, np.ndarray | SeriesArray):  # e.g. dask; a SeriesArray is written lazily
        image = np.asarray(image)
    return append_training_item(folder, name, image, spines, tuple(voxel_size_um),
                                sorted(int(s) for s in reviewed_sessions))


def _image_geometry(image: Image | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(scale, translate) that put spine points in voxels onto ``image``; None without one."""
    if image is None:
        return None
    return (1.0, *(float(s) for s in image.scale[-3:])), SpineTrackerWidget._points_translate(image)


def _image_key(layer: Image) -> tuple[str | None, str, tuple[int, ...]]:
    """What identifies an image for its autosave: file path (if any), name, shape."""
    return layer.source.path, layer.name, tuple(int(n) for n in layer.data.shape)


class _VerticalScroll(QScrollArea):
    """Scrolls up and down only: as wide as its content wants, so the dock never squeezes it."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def _width(self, content_width: int) -> int:
        return content_width + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:
        hint = super().minimumSizeHint()
        inner = self.widget()
        return hint if inner is None else QSize(self._width(inner.minimumSizeHint().width()), hint.height())

    def sizeHint(self) -> QSize:
        hint = super().sizeHint()
        inner = self.widget()
        return hint if inner is None else QSize(self._width(inner.sizeHint().width()), hint.height())


class SpineTrackerWidget(QWidget):
    """The plugin's main dock widget, titled ``Spine Tracker`` (DESIGN §3)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.autosaver: Autosaver | None = None
        self._autosave_image: Image | None = None
        self._offered: set[tuple] = set()
        self._export_worker = None
        self.last_export_folder: Path | None = None

        # the sections scroll, so that Detect, Train and Dynamics open together fit any screen
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = _VerticalScroll(self)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        inner = QWidget()
        layout = QVBoxLayout(inner)
        layout.setContentsMargins(4, 4, 4, 4)
        self._sections = QVBoxLayout()
        layout.addLayout(self._sections)
        layout.addStretch(1)
        scroll.setWidget(inner)
        outer.addWidget(scroll)

        self.detect = DetectPanel(napari_viewer)
        detect_panel = self.detect  # the editor holds the panel, not this widget (no reference cycle)
        self.editor = SpineEditor(napari_viewer, geometry=lambda: _image_geometry(detect_panel.image_layer()))
        self.review = ReviewPanel(self.editor)
        self.add_section("Detect", self.detect)
        self.add_section("Review and correct", self.review)
        self.add_section("Export", self._build_export())
        self.train = TrainWidget(napari_viewer)
        self.add_section("Train", self.train, expanded=False)
        self._add_dynamics()
        # models listed by name, with what each was trained on (tooltip and a line under the choice)
        self.model_description = add_model_description(self.detect.layout(), self.detect.model)
        self.train.set_start_model(self.detect.model_choice())
        self.detect.model.currentTextChanged.connect(self.train.set_start_model)
        self.train.trained.connect(lambda name: refresh_model_choice(self.detect.model, select=name))

        self.detect.detected.connect(self._on_detected)
        self.editor.changed.connect(self._on_spines_changed)
        self.detect.image_changed.connect(lambda: QTimer.singleShot(0, self.offer_restore))
        napari_viewer.dims.events.current_step.connect(self.review.refresh)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.flush_autosave)
        QTimer.singleShot(0, self.offer_restore)

    # ---------------------------------------------------------------------------------------
    # sections

    def add_section(self, title: str, widget: QWidget, *, expanded: bool = True) -> QCollapsible:
        """Add a collapsible section (e.g. a Train panel) below the others; returns it."""
        section = QCollapsible(title)
        section.addWidget(widget)
        if expanded:
            section.expand(animate=False)
        else:
            section.collapse(animate=False)
        self._sections.addWidget(section)
        return section

    def _add_dynamics(self) -> None:
        try:
            from .dynamics import DynamicsWidget
        except ImportError as exc:
            log.debug("no dynamics section: %s", exc)
            return
        self.add_section("Dynamics", DynamicsWidget(self.viewer), expanded=False)

    def _build_export(self) -> QWidget:
        panel = QWidget()
        row = QHBoxLayout(panel)
        row.setContentsMargins(0, 0, 0, 0)
        self.save_button = QPushButton("Save table…")
        self.save_button.setToolTip("Write the spines as a spine table (CSV)")
        self.save_button.clicked.connect(self.save_table)
        self.export_button = QPushButton("Export training set…")
        self.export_button.setToolTip("Append the image, the corrected spines and the reviewed sessions "
                                      "to a training-set folder, for `napari-spine-tracker train`")
        self.export_button.clicked.connect(self.export)
        row.addWidget(self.save_button)
        row.addWidget(self.export_button)
        return panel

    # ---------------------------------------------------------------------------------------
    # detection results

    def _on_detected(self, table: pd.DataFrame, suggestions: pd.DataFrame, image: Image,
                     voxel_size_um: Sequence[float]) -> None:
        data, features = edits.points_from_table(table)
        state = SpineState(data, features)
        current = self.editor.state
        if current is not None and (edits.human_vetted(current.features).any() or current.reviewed_sessions):
            choice = _dialogs.ask_merge_or_replace(self, int(edits.human_vetted(current.features).sum()))
            if choice == "cancel":
                show_info("New detection discarded; your spines are unchanged.")
                return
            if choice == "merge":
                data, features = edits.merge_predictions(
                    current.data, current.features, table, voxel_size_um=voxel_size_um,
                    reviewed_sessions=current.reviewed_sessions)
                state = SpineState(data, features, current.reviewed_sessions)
        self._bind_autosave(image)
        self.editor.show(state, scale=(1.0, *voxel_size_um), translate=self._points_translate(image))
        offered = self.editor.set_suggestions(suggestions)
        self._label_axes()
        lowered = threshold_note(table)
        show_info(f"{len(state.data)} spine points in {state.features['track_id'].nunique()} tracks"
                  + (f"; {offered} suggestions of missed spines (G visits them, Y accepts one)." if offered else ".")
                  + (f" The {lowered} (set Threshold to keep it)." if lowered else ""))

    def _label_axes(self) -> None:
        """Name the axes t, z, y, x when napari shows its default numbers (-4..-1)."""
        dims = self.viewer.dims
        if dims.ndim == 4 and all(label.lstrip("-").isdigit() for label in dims.axis_labels):
            dims.axis_labels = ("t", "z", "y", "x")

    @staticmethod
    def _points_translate(image: Image) -> tuple[float, ...]:
        translate = tuple(float(v) for v in image.translate)
        return translate if image.ndim == 4 else (0.0, *translate[-3:])

    # ---------------------------------------------------------------------------------------
    # autosave

    def _bind_autosave(self, image: Image) -> None:
        if self._autosave_image is image and self.autosaver is not None:
            return
        self.flush_autosave()
        path, name, shape = _image_key(image)
        self.autosaver = Autosaver(path, name, shape, on_error=self._autosave_failed)
        self._autosave_image = image
        self._offered.add(_image_key(image))  # its autosave is now this session's work

    def _autosave_failed(self, message: str) -> None:
        # called from the writer thread: hand the message to the GUI thread
        QTimer.singleShot(0, lambda: show_warning(message))

    def _on_spines_changed(self) -> None:
        state = self.editor.state
        if state is None:  # the spines layer is gone: the next one may belong to another image
            self.flush_autosave()
            self.autosaver, self._autosave_image = None, None
            return
        self._label_axes()  # a table opened from disk, too
        if self.autosaver is None:
            image = self.detect.image_layer()
            if image is None:
                return
            self._bind_autosave(image)
        try:
            self.autosaver.submit(state.table(), state.reviewed_sessions)
        except InputError as exc:
            show_warning(f"not autosaved: {exc}")

    def flush_autosave(self) -> None:
        """Write a pending autosave now (on quit, before switching images)."""
        if self.autosaver is not None:
            self.autosaver.flush()

    def offer_restore(self) -> bool:
        """If the chosen image has an autosave from an earlier session, offer to restore it."""
        image = self.detect.image_layer()
        if image is None or _image_key(image) in self._offered:
            return False
        self._offered.add(_image_key(image))
        record = find_autosave(*_image_key(image))
        if record is None:
            return False
        current = self.editor.state
        if current is not None and current.table().equals(record.table):
            return False
        when = datetime.fromtimestamp(record.saved_at).strftime("%Y-%m-%d %H:%M")
        reviewed = ", ".join(map(str, record.reviewed_sessions)) or "none"
        question = (f"Spines autosaved for {image.name!r} on {when}: {len(record.table)} points, "
                    f"reviewed sessions: {reviewed}.\n({record.path})\n\nRestore them?")
        if not _dialogs.ask_yes_no(self, "Restore autosaved spines?", question):
            return False
        data, features = edits.points_from_table(record.table)
        self._bind_autosave(image)
        voxel = self.detect.voxel_size_um()
        self.editor.show(SpineState(data, features, frozenset(record.reviewed_sessions)),
                         scale=(1.0, *voxel), translate=self._points_translate(image))
        self._label_axes()
        show_info(f"restored {len(record.table)} spine points from {record.path}")
        return True

    # ---------------------------------------------------------------------------------------
    # export

    def _spines_or_warn(self) -> SpineState | None:
        state = self.editor.state
        if state is None:
            show_warning("no spines to save: run detection or open a spine table first.")
        return state

    def save_table(self) -> Path | None:
        """Ask for a path and write the spines there as a spine table, with the suggestions of
        missed spines on offer beside it (``NAME.suggestions.csv``; the reader brings them back).
        A suggestions file already there that belongs to another table is removed."""
        from ..io.tables import default_table_path, suggestions_path, write_spine_table, write_suggestions

        state = self._spines_or_warn()
        if state is None:
            return None
        image = self._autosave_image or self.detect.image_layer()
        suggestion = (str(default_table_path(image.source.path)) if image is not None and image.source.path
                      else f"{safe_name(image.name if image is not None else 'spines')}.spines.csv")
        path = _dialogs.choose_save_file(self, "Save spine table", suggestion, "Spine tables (*.csv)")
        if not path:
            return None
        try:
            written = write_spine_table(state.table(), path)
        except (InputError, OSError) as exc:
            show_error(f"could not save the spine table: {exc}")
            return None
        said = f"saved {len(state.data)} spine points to {written}"
        suggestions, beside = self.editor.suggestions, suggestions_path(written)
        try:
            if suggestions is not None:
                write_suggestions(suggestions, beside)
                said += f", and the suggestions of missed spines to {beside.name}"
            elif beside.exists():
                beside.unlink()
                said += f"; removed {beside.name}, the suggestions of an earlier table"
        except OSError as exc:  # the table is safe; only the suggestions are not
            show_warning(f"{said}, but the suggestions of missed spines could not be written: {exc}")
            return written
        show_info(said)
        return written

    def export(self) -> None:
        """Ask for a training-set folder and append this series to it (in a worker thread)."""
        state = self._spines_or_warn()
        image = self._autosave_image or self.detect.image_layer()
        if state is None:
            return
        if image is None:
            show_warning("no image to export: choose the image the spines belong to.")
            return
        if not state.reviewed_sessions and not _dialogs.ask_yes_no(
                self, "No session reviewed",
                "No session is marked reviewed (R), so the export gives the spines but no complete "
                "session to learn from. Export anyway?"):
            return
        folder = _dialogs.choose_directory(self, "Training-set folder (new or existing)")
        if not folder:
            return
        try:
            series = series_input(image)
        except InputError as exc:
            show_error(str(exc))
            return
        self.export_button.setEnabled(False)
        self._export_worker = create_worker(
            export_training_set, folder, safe_name(image.name), series, state.table(),
            self.detect.voxel_size_um(), state.reviewed_sessions,
            _connect={"returned": lambda item: self._on_exported(image.name, folder),
                      "errored": lambda exc: show_error(f"export failed: {exc}"),
                      "finished": self._on_export_finished})

    def _on_exported(self, name: str, folder: str) -> None:
        show_info(f"exported {name!r} to {folder}")
        self.last_export_folder = Path(folder)
        self.train.set_default_folder(folder)

    def _on_export_finished(self) -> None:
        self._export_worker = None
        self.export_button.setEnabled(True)
