"""The Train section: fine-tune a model on exported training sets, with a live loss plot.

A thin view over :func:`napari_spine_tracker.core.train.train_model`. Training sets are checked up
front (``io.trainset.read_training_set``); the run goes to a napari ``create_worker`` thread that
only calls :func:`run_training`. Progress and log records reach the GUI thread through queued Qt
signals; the worker never touches widgets. The new model is written to
``core.models.user_models_dir() / NAME.pt`` (with its JSON description), and ``trained(name)`` is
emitted so that the main widget lists and selects it.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..errors import Cancelled, InputError
from . import _dialogs
from ._models import BROWSE, add_model_description, is_checkpoint_path, refresh_model_choice
from ._runs import CancellableRun

log = logging.getLogger(__name__)

TRAIN_LABEL = "Train"
#: TrainOptions fields that replace the widget's choices (tests set a tiny model and tiny patches)
TRAIN_OVERRIDES: dict[str, Any] = {}
#: default time budget in minutes per device; 0 (auto) lets train_model choose (8 on CPU, 2 on GPU)
DEFAULT_MINUTES = {"auto": 0.0, "cpu": 8.0, "cuda": 2.0}
DEFAULT_STEPS = 1000
LOSS_SMOOTHING = 0.9  # exponential moving average of the training loss, debiased
REDRAW_MS = 300
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")


def run_training(options, *, progress: Callable[[int, int], None], should_stop: Callable[[], bool],
                 on_log: Callable[[dict], None]) -> Path:
    """Fine-tune with ``options`` (a ``TrainOptions``); returns the checkpoint path. Runs in a worker.

    Module-level so that tests can replace it.
    """
    from ..core.train import train_model

    return train_model(options, progress=progress, should_stop=should_stop, on_log=on_log)


def default_model_name(now: datetime | None = None) -> str:
    """``finetuned-YYYYMMDD-HHMM``, with a suffix when a user model of that name exists."""
    from ..core.models import user_models_dir

    base = f"finetuned-{(now or datetime.now()):%Y%m%d-%H%M}"
    name, n = base, 1
    while (user_models_dir() / f"{name}.pt").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def check_training_sets(folders: Sequence[str | Path]) -> int:
    """Validate training-set folders; returns how many sessions are marked reviewed in all.

    Raises :class:`InputError` (with the reader's message) for a missing, empty or malformed set,
    and when no session anywhere is reviewed (nothing to learn from).
    """
    from ..io.trainset import read_training_set

    if not folders:
        raise InputError("no training set chosen: Add… a folder written by 'Export training set…'.")
    reviewed = 0
    for folder in folders:
        reviewed += sum(len(item.reviewed_sessions) for item in read_training_set(folder))
    if reviewed == 0:
        raise InputError("the training sets hold no reviewed session: mark the sessions you corrected as "
                         "reviewed (R) and export again; only reviewed sessions are complete labels.")
    return reviewed


class _Relay(QObject):
    """Carries the worker's progress and log records to the GUI thread (queued signals)."""

    progressed = Signal(int, int)
    logged = Signal(object)


class TrainPlot(QWidget):
    """Training loss (raw and smoothed) against step, and validation F1 / IDF1 as they arrive."""

    def __init__(self, parent: QWidget | None = None) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        super().__init__(parent)
        self.figure = Figure(figsize=(4.0, 3.0), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(260)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.redraw)
        self.clear()

    def clear(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.validation: list[tuple[int, float, float]] = []  #: (step, F1, IDF1)
        self._ema, self._weight = 0.0, 0.0
        self.redraw()

    def add(self, record: dict) -> None:
        """Take one record from ``train_model``'s ``on_log``; the plot redraws shortly after."""
        if "validation" in record:
            result = record["validation"]
            self.validation.append((int(record["step"]), float(result["f1"]), float(result["idf1"])))
        elif "loss" in record and np.isfinite(record["loss"]):
            self._ema = LOSS_SMOOTHING * self._ema + (1 - LOSS_SMOOTHING) * float(record["loss"])
            self._weight = LOSS_SMOOTHING * self._weight + (1 - LOSS_SMOOTHING)
            self.steps.append(int(record["step"]))
            self.losses.append(float(record["loss"]))
            self.smoothed.append(self._ema / self._weight)
        if not self._timer.isActive():
            self._timer.start()

    def redraw(self) -> None:
        self.figure.clear()
        ax = self.figure.add_subplot(1, 1, 1)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        if self.losses:
            ax.plot(self.steps, self.losses, color="tab:blue", alpha=0.25, lw=0.8)
            ax.plot(self.steps, self.smoothed, color="tab:blue", lw=1.6, label="loss (smoothed)")
            if min(self.losses) > 0 and max(self.losses) / min(self.losses) > 20:
                ax.set_yscale("log")
        score = ax.twinx()
        score.set_ylim(0, 1)
        score.set_ylabel("validation")
        if self.validation:
            steps, f1, idf1 = zip(*self.validation)
            score.plot(steps, f1, "o-", color="tab:green", ms=4, lw=1, label="F1")
            score.plot(steps, idf1, "s--", color="tab:orange", ms=4, lw=1, label="IDF1")
        handles = ax.get_legend_handles_labels()[0] + score.get_legend_handles_labels()[0]
        if handles:
            self.figure.legend(handles=handles, loc="outside upper center", ncol=3, fontsize="small",
                               frameon=False)
        else:
            ax.text(0.5, 0.5, "the loss and validation scores appear here", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        self.canvas.draw_idle()


class TrainWidget(CancellableRun, QWidget):
    """Fine-tune a model on training sets; emits ``trained(model_name)`` when a run leaves a model."""

    trained = Signal(str)

    def __init__(self, viewer=None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._init_run_state()
        self.out: Path | None = None
        self._default_folder: str | None = None
        self._device = "auto"
        self._last_step = 0
        self._val_every = 0
        self._started = time.monotonic()
        #: (score, step, F1, IDF1) of each validation of the current run; score as train_model ranks them
        self._validations: list[tuple[float, int, float, float]] = []
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self._relay.logged.connect(self._on_log)

        self.folders = QListWidget()
        self.folders.setToolTip("Training-set folders written by 'Export training set…'")
        self.folders.setMaximumHeight(72)
        self.add_button = QPushButton("Add…")
        self.add_button.clicked.connect(self._on_add)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_selected_folders)
        folder_buttons = QVBoxLayout()
        folder_buttons.addWidget(self.add_button)
        folder_buttons.addWidget(self.remove_button)
        folder_buttons.addStretch(1)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.folders, 1)
        folder_row.addLayout(folder_buttons)

        self.start_model = QComboBox()
        self.start_model.addItem(BROWSE)
        refresh_model_choice(self.start_model)
        self.start_model.setToolTip("The model to start from (fine-tuning keeps what it knows)")
        self.start_model.activated.connect(self._on_start_model_activated)
        self.device = QComboBox()
        self.device.addItems(list(DEFAULT_MINUTES))
        self.device.setToolTip("auto: the GPU when there is one, else the CPU")
        self.device.currentTextChanged.connect(self._on_device_changed)

        self.budget_unit = QComboBox()
        self.budget_unit.addItems(["minutes", "steps"])
        self.budget_unit.setToolTip("Stop after this much time, or after this many optimisation steps")
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.0, 24 * 60.0)
        self.minutes.setDecimals(1)
        self.minutes.setSpecialValueText("auto (8 CPU, 2 GPU)")
        self.minutes.setValue(DEFAULT_MINUTES["auto"])
        self.steps = QSpinBox()
        self.steps.setRange(1, 10_000_000)
        self.steps.setValue(DEFAULT_STEPS)
        self.steps.setVisible(False)
        self.budget_unit.currentTextChanged.connect(self._on_unit_changed)
        budget_row = QHBoxLayout()
        budget_row.addWidget(self.minutes, 1)
        budget_row.addWidget(self.steps, 1)
        budget_row.addWidget(self.budget_unit)

        self.name = QLineEdit(default_model_name())
        self.name.setToolTip("Name of the new model; it is saved in your models folder and listed under Model")
        self.run_button = QPushButton(TRAIN_LABEL)
        self.run_button.setToolTip("Fine-tune on the training sets (click again to cancel: the best model "
                                   "validated so far is kept)")
        self.run_button.clicked.connect(self._on_run_clicked)
        self.bar = QProgressBar()
        self.bar.setVisible(False)
        self.status = QLabel("Add the training sets you exported, then press Train.")
        self.status.setWordWrap(True)
        self.plot = TrainPlot()
        self._refit_timer = QTimer(self)
        self._refit_timer.setSingleShot(True)
        self._refit_timer.setInterval(0)
        self._refit_timer.timeout.connect(self._refit_section)

        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Training sets", folder_row)
        form.addRow("Start from", self.start_model)
        add_model_description(form, self.start_model)
        form.addRow("Device", self.device)
        form.addRow("Budget", budget_row)
        form.addRow("New model", self.name)
        form.addRow(self.run_button)
        form.addRow(self.bar)
        form.addRow(self.status)
        form.addRow(self.plot)
        self._controls = [self.folders, self.add_button, self.remove_button, self.start_model, self.device,
                          self.budget_unit, self.minutes, self.steps, self.name]
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop.set)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)
        self._refit_timer.start()

    def _refit_section(self) -> None:
        """Give the enclosing section room for grown content (a QCollapsible fixes its height when expanded)."""
        from superqt import QCollapsible

        parent = self.parentWidget()
        while parent is not None and not isinstance(parent, QCollapsible):
            parent = parent.parentWidget()
        if parent is not None and parent.isExpanded():
            self.updateGeometry()  # the cached size hints up to the section predate our growth
            parent.content().layout().invalidate()
            parent.expand(animate=False)

    # ---------------------------------------------------------------------------------------
    # choices

    def folder_list(self) -> list[str]:
        return [self.folders.item(i).text() for i in range(self.folders.count())]

    def add_folder(self, folder: str | Path) -> bool:
        """Add a training-set folder after checking it; a bad one is refused with a notification."""
        from ..io.trainset import read_training_set

        folder = str(folder)
        if folder in self.folder_list():
            return False
        try:
            read_training_set(folder)
        except InputError as exc:
            show_error(str(exc))
            return False
        self.folders.addItem(folder)
        return True

    def set_default_folder(self, folder: str | Path) -> None:
        """The folder the user last exported to: listed unless the user chose folders of their own."""
        folder = str(folder)
        if self.folder_list() in ([], [self._default_folder]):
            self.folders.clear()
            self.folders.addItem(folder)
        self._default_folder = folder

    def remove_selected_folders(self) -> None:
        for item in self.folders.selectedItems():
            self.folders.takeItem(self.folders.row(item))

    def _on_add(self) -> None:
        folder = _dialogs.choose_directory(self, "Add a training-set folder")
        if folder:
            self.add_folder(folder)

    def set_start_model(self, name_or_path: str) -> None:
        """Follow the model chosen for detection (a listed name or a checkpoint path)."""
        if not name_or_path or name_or_path == BROWSE:
            return
        if self.start_model.findText(name_or_path) < 0:
            if not is_checkpoint_path(name_or_path):
                refresh_model_choice(self.start_model)
            if self.start_model.findText(name_or_path) < 0:
                self.start_model.insertItem(self.start_model.count() - 1, name_or_path)
        self.start_model.setCurrentIndex(self.start_model.findText(name_or_path))

    def _on_start_model_activated(self, index: int) -> None:
        if self.start_model.itemText(index) != BROWSE:
            return
        path = _dialogs.choose_open_file(self, "Start from a model checkpoint", "Checkpoints (*.pt)")
        self.start_model.setCurrentIndex(0)
        if path:
            self.set_start_model(path)

    def _on_device_changed(self, device: str) -> None:
        # a budget the user has not changed follows the device's default
        if self.minutes.value() == DEFAULT_MINUTES[self._device]:
            self.minutes.setValue(DEFAULT_MINUTES[device])
        self._device = device

    def _on_unit_changed(self, unit: str) -> None:
        self.minutes.setVisible(unit == "minutes")
        self.steps.setVisible(unit == "steps")

    def model_path(self) -> Path:
        """Where the new model goes: ``user_models_dir() / NAME.pt``."""
        from ..core.models import SHIPPED_DIR, user_models_dir

        name = self.name.text().strip()
        if not _MODEL_NAME.match(name) or name.endswith(".resume"):
            raise InputError(f"model name {name!r} may hold only letters, digits and . _ + - (it becomes a "
                             "file name), e.g. 'finetuned-lab2'.")
        if (SHIPPED_DIR / f"{name}.pt").exists():
            raise InputError(f"{name!r} is the name of a shipped model; choose another name.")
        return user_models_dir() / f"{name}.pt"

    def build_options(self, out: Path):
        """The ``TrainOptions`` of a run from the controls, with :data:`TRAIN_OVERRIDES` on top."""
        from ..core.train import TrainOptions

        datasets = [Path(f) for f in self.folder_list()]
        init, device = self.start_model.currentText(), self.device.currentText()
        steps = minutes = None
        if self.budget_unit.currentText() == "steps":
            steps = self.steps.value()
        elif self.minutes.value() > 0:
            minutes = self.minutes.value()
        budget = ["--steps", str(steps)] if steps else ["--minutes", f"{minutes:g}"] if minutes else []
        command = shlex.join(["napari-spine-tracker", "train", *map(str, datasets), "--init", init,
                              "--out", str(out), "--device", device, *budget])
        values = dict(out=out, datasets=datasets, init=init, device=device, steps=steps, minutes=minutes,
                      command_line=f"{command}  # from the napari Train section")
        values.update(TRAIN_OVERRIDES)
        return TrainOptions(**values)

    # ---------------------------------------------------------------------------------------
    # running

    def _cancel_message(self) -> str:
        return "Cancelling after this step; the best model validated so far is kept."

    def start(self) -> bool:
        """Check the choices and start a fine-tuning run (returns at once); False when refused."""
        from ..core.models import resolve_model

        if self.running:
            return False
        try:
            check_training_sets(self.folder_list())
            out = self.model_path()
            resolve_model(self.start_model.currentText())
            options = self.build_options(out)
        except InputError as exc:
            show_error(str(exc))
            return False
        if out.exists() and not _dialogs.ask_yes_no(
                self, "Replace the model?",
                f"A model named {out.stem!r} exists ({out}). Replace it with the one this run trains?"):
            return False
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self._last_step, self._val_every = 0, options.validation_interval
        self._validations = []
        self._started = time.monotonic()
        self.plot.clear()
        self._show_running(f"Training {out.stem}")
        self._set_status("Preparing the training data and the validation series…")
        relay = self._relay
        self.worker = create_worker(
            run_training, options,
            progress=lambda done, total: relay.progressed.emit(int(done), int(total)),
            should_stop=self._stop.is_set, on_log=relay.logged.emit,
            _connect={"returned": self._on_returned, "errored": self._on_errored, "finished": self._on_finished})
        return True

    def _on_log(self, record: dict) -> None:
        self.plot.add(record)
        self._last_step = int(record.get("step", self._last_step))
        if "validation" in record:
            result = record["validation"]
            self._validations.append((float(result["score"]), self._last_step, float(result["f1"]),
                                      float(result["idf1"])))
        if self._stop.is_set():
            return
        elapsed = (time.monotonic() - self._started) / 60
        if "validation" in record:
            self._set_status(f"step {self._last_step}: validation F1 {result['f1']:.3f}, IDF1 "
                                f"{result['idf1']:.3f} ({elapsed:.1f} min)")
        elif self.plot.smoothed:
            next_up = " — validating…" if self._val_every and self._last_step % self._val_every == 0 else ""
            self._set_status(f"step {self._last_step}: loss {self.plot.smoothed[-1]:.3f} "
                                f"({elapsed:.1f} min){next_up}")

    def best_validation(self) -> tuple[int, float, float] | None:
        """(step, F1, IDF1) of the best validation of this run (what the checkpoint holds), or None."""
        if not self._validations:
            return None
        # train_model saves a validation only when its score is strictly better: the first of equals
        _, step, f1, idf1 = max(self._validations, key=lambda v: (v[0], -v[1]))
        return step, f1, idf1

    def _on_returned(self, path: Path) -> None:
        best = self.best_validation()
        scores = f" (step {best[0]}: validation F1 {best[1]:.3f}, IDF1 {best[2]:.3f})" if best else ""
        self._set_status(f"Trained {path.stem}{scores}. It is now the chosen model: press Detect spines.")
        show_info(f"model {path.stem!r} saved to {path}")
        self.trained.emit(path.stem)

    def _on_errored(self, exc: Exception) -> None:
        name = self.out.stem if self.out is not None else "the model"
        if isinstance(exc, Cancelled):
            best = self.best_validation()
            if best is not None:
                self._set_status(f"Cancelled at step {self._last_step}. {name} holds the best model validated "
                                    f"so far (step {best[0]}: F1 {best[1]:.3f}, IDF1 {best[2]:.3f}); it is now "
                                    "the chosen model.")
                self.trained.emit(name)
            else:
                kept = "is unchanged" if self.out is not None and self.out.exists() else "was not written"
                self._set_status(f"Cancelled before the first validation: {name} {kept}.")
        elif isinstance(exc, InputError):
            self._set_status(f"Training stopped: {exc}")
            show_error(str(exc))
        else:
            log.error("training failed", exc_info=exc)
            self._set_status(f"Training failed: {type(exc).__name__}: {exc}")
            show_error(f"Training failed: {type(exc).__name__}: {exc}")
        self._remove_resume_state()

    def _remove_resume_state(self) -> None:
        """The widget offers no resume: a stopped run's ``.resume.pt`` would only clutter the models."""
        from ..core.train import _resume_path

        if self.out is not None:
            _resume_path(self.out).unlink(missing_ok=True)

    def _on_finished(self) -> None:
        self._show_idle(TRAIN_LABEL)
        self._refit_timer.start()
        self.plot.redraw()
        refresh_model_choice(self.start_model)
        if self.out is not None and self.name.text().strip() == self.out.stem and self.out.exists():
            self.name.setText(default_model_name())
