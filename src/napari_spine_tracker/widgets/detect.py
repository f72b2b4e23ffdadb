"""The Detect section: image, voxel size, model, device, threshold, and a cancellable detection run.

Detection runs in a napari ``create_worker`` thread. The worker only calls :func:`run_detection`
and returns its DataFrame; it never touches layers or widgets (progress reaches the GUI through a
queued Qt signal). Layers are built on the main thread by whoever handles ``detected``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..core.link import AUTO_GATE, DEFAULT_GATE_UM, DEFAULT_MAX_GAP
from ..core.models import coarse_model_hint
from ..errors import Cancelled, InputError
from . import _dialogs
from ._models import BROWSE, refresh_model_choice
from ._runs import CancellableRun

log = logging.getLogger(__name__)

DETECT_LABEL = "Detect spines"


def run_detection(image, voxel_size_um, *, model: str, device: str, threshold: float | str | None,
                  views: int = 1, max_rotation_deg: float = 3.0, gate_um: float | str = DEFAULT_GATE_UM,
                  max_gap: int = DEFAULT_MAX_GAP, track_evidence: bool = True,
                  progress: Callable[[int, int], None],
                  should_stop: Callable[[], bool]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Detect and track spines in ``image`` (T, Z, Y, X); voxel size z, y, x in µm. Runs in a worker.
    Returns (spine table, suggestions of missed spines).

    Module-level so that tests can replace it with a fake.
    """
    from ..core.detect import detect_series

    return detect_series(image, voxel_size_um, model=model, device=device, threshold=threshold, views=views,
                         max_rotation_deg=max_rotation_deg, gate_um=gate_um, max_gap=max_gap,
                         track_evidence=track_evidence, progress=progress, should_stop=should_stop,
                         return_suggestions=True)


def image_voxel_size(layer: Image) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x) µm of an image layer: its scale, its metadata, or its file's metadata."""
    scale = tuple(float(s) for s in layer.scale[-3:])
    if not np.allclose(scale, 1.0):
        return scale  # type: ignore[return-value]
    voxel = layer.metadata.get("voxel_size_um")
    if voxel is not None:
        return tuple(float(v) for v in voxel)  # type: ignore[return-value]
    path = layer.source.path
    if path:
        try:
            from ..io.series import read_voxel_size

            return read_voxel_size(path)
        except Exception as exc:  # a voxel size hint, never an error
            log.debug("no voxel size from %s: %s", path, exc)
    return None


def series_input(layer: Image):
    """The image to detect on, as (T, Z, Y, X); a 3D image is one session."""
    if layer.rgb or layer.multiscale or layer.ndim not in (3, 4):
        raise InputError(f"layer {layer.name!r} has {layer.ndim} dimensions; choose a 3D (Z, Y, X) or "
                         "4D (T, Z, Y, X) grayscale image.")
    return layer.data if layer.ndim == 4 else np.asarray(layer.data)[None]


def _number_box(box, low, high, *, tip: str, step=None, value=None, suffix: str = "", special: str = ""):
    """``box`` (a QSpinBox or QDoubleSpinBox) set up: range, step, value, suffix, the text shown at
    its minimum (``special``), tooltip."""
    box.setRange(low, high)
    if step is not None:
        box.setSingleStep(step)
    if value is not None:
        box.setValue(value)
    box.setSuffix(suffix)
    box.setSpecialValueText(special)
    box.setToolTip(tip)
    return box


class _ProgressRelay(QObject):
    """Carries ``progress(done, total)`` from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int)


class DetectPanel(CancellableRun, QWidget):
    """Controls for a detection run; emits ``detected(table, suggestions, image_layer, voxel_size_um)``."""

    detected = Signal(object, object, object, object)
    #: another image layer was chosen (or the first one appeared)
    image_changed = Signal()

    def __init__(self, viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._init_run_state()
        self._relay = _ProgressRelay()
        self._relay.progressed.connect(self._on_progress)
        self._images: list[Image] = []

        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        self.image = QComboBox()
        self.image.setToolTip("The series to analyse: 4D (T, Z, Y, X) or 3D (one session)")
        self.image.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("Image", self.image)
        voxel_row = QHBoxLayout()
        self.voxel = []
        for axis in "zyx":
            box = QDoubleSpinBox()
            box.setDecimals(3)
            box.setRange(0.001, 100.0)
            box.setSingleStep(0.01)
            box.setToolTip(f"voxel size along {axis} in µm (from the layer scale or the file; editable)")
            voxel_row.addWidget(box)
            self.voxel.append(box)
        # the unit in the row's name: a suffix in each box left too little room for 0.065 at a dock's width
        form.addRow("Voxel z,y,x µm", voxel_row)
        self.model = QComboBox()
        self.model.addItem(BROWSE)
        refresh_model_choice(self.model)
        self.model.setToolTip("A shipped model, or Browse… for a fine-tuned checkpoint (.pt)")
        self.model.activated.connect(self._on_model_activated)
        form.addRow("Model", self.model)
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.device.setToolTip("auto: the GPU when there is one, else the CPU")
        form.addRow("Device", self.device)
        self.threshold = _number_box(
            QDoubleSpinBox(), 0.0, 0.99, step=0.05, special="auto",
            tip="Detection score threshold: lower finds more spines (and more false ones). auto: the model's, "
                "lowered to the split of this image's own peak scores where that is lower (another "
                "microscope shifts a model's scores), not below 0.3")
        form.addRow("Threshold", self.threshold)
        self.views = QComboBox()
        self.views.addItems(["1", "2", "4"])
        self.views.setToolTip("Mirror views: average the model over this many mirror images of the image. "
                              "4 finds more spines; it takes about 3.5x as long on a CPU, little more on a GPU")
        form.addRow("Mirror views", self.views)
        self.max_rotation = _number_box(
            QDoubleSpinBox(), 0.0, 45.0, step=0.5, value=3.0, suffix=" °", special="none (translation only)",
            tip="Largest turn in the image plane between two sessions that registration looks for (the animal "
                "mounted anew). Fields too small for it to move their corners by 2 µm (up to about 54 µm across "
                "at 3°) are not searched")
        form.addRow("Max rotation", self.max_rotation)
        self.gate = _number_box(
            QDoubleSpinBox(), 0.0, 20.0, step=0.1, suffix=" µm", special=AUTO_GATE,
            tip="Linking gate: the farthest a spine is followed from one session to the next, after registration "
                "and the local motion of its neighbours. auto: 4x the median distance of this series' own links, "
                "within 0.8-1.4 µm (narrow where spines are found where expected, so a new spine does not take a "
                "lost neighbour's id). Raise it for tissue that deforms more than the registration follows")
        form.addRow("Linking gate", self.gate)
        self.max_gap = _number_box(
            QSpinBox(), 0, 20, value=DEFAULT_MAX_GAP, suffix=" sessions",
            tip="Sessions a spine may be missed and keep its id (0: a spine missed once gets a new id when it is "
                "found again)")
        form.addRow("Max gap", self.max_gap)
        self.track_evidence = QCheckBox("a clear track keeps its dim sessions")
        self.track_evidence.setChecked(True)
        self.track_evidence.setToolTip(
            "Keep a peak up to 0.1 under the threshold where the spine's track scores at least 0.05 over it "
            "on average (clear on most days, dim on one). Off: the threshold alone decides")
        form.addRow("Track evidence", self.track_evidence)
        self.run_button = QPushButton(DETECT_LABEL)
        self.run_button.setToolTip("Detect and track spines in every session (click again to cancel)")
        self.run_button.clicked.connect(self._on_run_clicked)
        form.addRow(self.run_button)
        self.bar = QProgressBar()
        self.bar.setVisible(False)
        form.addRow(self.bar)
        self._controls = [self.image, *self.voxel, self.model, self.device, self.threshold, self.views,
                          self.max_rotation, self.gate, self.max_gap, self.track_evidence]

        viewer.layers.events.inserted.connect(self.refresh_images)
        viewer.layers.events.removed.connect(self.refresh_images)
        self.refresh_images()

    # ---------------------------------------------------------------------------------------
    # choices

    def image_layer(self) -> Image | None:
        """The chosen image layer (None when there is none)."""
        index = self.image.currentIndex()
        return self._images[index] if 0 <= index < len(self._images) else None

    def refresh_images(self, event=None) -> None:
        """List the viewer's image layers, keeping the chosen one (also across renames)."""
        current = self.image_layer()
        self._images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        self.image.blockSignals(True)
        self.image.clear()
        self.image.addItems([layer.name for layer in self._images])
        if current in self._images:
            self.image.setCurrentIndex(self._images.index(current))
        self.image.blockSignals(False)
        if self.image_layer() is not current:
            self._on_image_changed()
        if event is not None and isinstance(getattr(event, "value", None), Image):
            event.value.events.name.connect(self.refresh_images)

    def _on_image_changed(self, index: int | None = None) -> None:
        layer = self.image_layer()
        voxel = image_voxel_size(layer) if layer is not None else None
        for box, value in zip(self.voxel, voxel or (1.0, 1.0, 1.0), strict=True):
            box.setValue(value)
            box.setStyleSheet("" if voxel or layer is None else "color: orange;")
        self.image_changed.emit()

    def voxel_size_um(self) -> tuple[float, float, float]:
        return tuple(box.value() for box in self.voxel)  # type: ignore[return-value]

    def model_choice(self) -> str:
        return self.model.currentText()

    def _on_model_activated(self, index: int) -> None:
        if self.model.itemText(index) != BROWSE:
            return
        path = _dialogs.choose_open_file(self, "Choose a model checkpoint", "Checkpoints (*.pt)")
        if path:
            self.model.insertItem(index, path)
            self.model.setItemData(index, path, 3)
            self.model.setCurrentIndex(index)
        else:
            self.model.setCurrentIndex(0)

    # ---------------------------------------------------------------------------------------
    # running

    def start(self) -> None:
        """Start a detection run on the chosen image (returns at once)."""
        layer = self.image_layer()
        try:
            if layer is None:
                raise InputError("no image to analyse: open a series (File > Open) or a sample first.")
            image = series_input(layer)
        except InputError as exc:
            show_error(str(exc))
            return
        voxel = self.voxel_size_um()
        # points and image must agree on the voxel size the user settled on
        layer.scale = (*layer.scale[:-3], *voxel)
        hint = coarse_model_hint(voxel, self.model_choice())
        if hint:
            show_info(hint)
        self._show_running("Detecting spines")
        relay = self._relay
        self.worker = create_worker(
            run_detection, image, voxel, model=self.model_choice(), device=self.device.currentText(),
            threshold=self.threshold.value() or None, views=int(self.views.currentText()),
            max_rotation_deg=self.max_rotation.value(), gate_um=self.gate.value() or AUTO_GATE,
            max_gap=self.max_gap.value(), track_evidence=self.track_evidence.isChecked(),
            progress=lambda done, total: relay.progressed.emit(int(done), int(total)),
            should_stop=self._stop.is_set,
            _connect={"returned": lambda result: self._on_returned(*result, layer, voxel),
                      "errored": self._on_errored, "finished": self._on_finished},
        )

    def _on_returned(self, table: pd.DataFrame, suggestions: pd.DataFrame, layer: Image, voxel) -> None:
        if self._stop.is_set():  # cancelled while the model finished anyway
            show_info("Detection cancelled; nothing changed.")
            return
        used = table.attrs.get("threshold")
        # what auto chose last time, where the choice is shown
        self.threshold.setSpecialValueText("auto" if used is None or not table.attrs.get("threshold_adapted")
                                           else f"auto (last: {used:.2f})")
        gate = table.attrs.get("gate_um")
        self.gate.setSpecialValueText(f"auto (last: {gate:.2f} µm)" if table.attrs.get("gate_auto") and gate
                                      else AUTO_GATE)
        self.detected.emit(table, suggestions, layer, voxel)

    def _on_errored(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            show_info("Detection cancelled; nothing changed.")
        elif isinstance(exc, InputError):
            show_error(str(exc))
        else:
            log.error("detection failed", exc_info=exc)
            show_error(f"Detection failed: {type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        self._show_idle(DETECT_LABEL)
