"""The Train section, driven like a user would: fine-tune, cancel, refuse bad training sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from qtpy.QtCore import Qt
from superqt import QCollapsible

from napari_spine_tracker.core.batches import PatchOptions
from napari_spine_tracker.core.models import user_models_dir
from napari_spine_tracker.io.checkpoint import load_checkpoint
from napari_spine_tracker.widgets import _dialogs, train
from napari_spine_tracker.widgets.main import SpineTrackerWidget

pytestmark = pytest.mark.gui

START = "tiny-start"
TINY = dict(size="tiny", batch_size=2, pool_size=2, val_every=2, pool_refresh_every=2,
            patch=PatchOptions(shape=(8, 32, 32), sessions=2), validation=(("tiny", 1000),), validation_shape={})


@pytest.fixture(autouse=True)
def tiny_runs_and_no_stray_dialogs(monkeypatch):
    """Tiny training options; a dialog a test did not answer fails the test."""
    monkeypatch.setattr(train, "TRAIN_OVERRIDES", dict(TINY, device="cpu"))

    def unexpected(*args, **kwargs):
        raise AssertionError(f"unexpected dialog: {args[1:]}")

    for name in ("ask_yes_no", "choose_directory", "choose_open_file", "choose_save_file"):
        monkeypatch.setattr(_dialogs, name, unexpected)


@pytest.fixture(scope="module")
def tiny_series():
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    return synthesize_series(SynthConfig.preset("tiny", seed=5))


def make_trainset(folder: Path, series, reviewed=(0, 1, 2)) -> Path:
    from napari_spine_tracker.io.trainset import append_training_item

    append_training_item(folder, "dendrite1", series.image, series.truth, series.voxel_size_um, list(reviewed))
    return folder


@pytest.fixture
def trainset(tmp_path, tiny_series) -> Path:
    return make_trainset(tmp_path / "set", tiny_series)


@pytest.fixture
def viewer_widget(make_napari_viewer, tiny_checkpoint):
    """The main widget, with an untrained tiny model installed as the user model ``tiny-start``."""
    user_models_dir().mkdir(parents=True)
    shutil.copy(tiny_checkpoint, user_models_dir() / f"{START}.pt")
    viewer = make_napari_viewer()
    widget = SpineTrackerWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Spine Tracker")
    widget.detect.model.setCurrentIndex(widget.detect.model.findText(START))
    return widget


def tooltip(combo, text: str) -> str:
    return combo.itemData(combo.findText(text), Qt.ItemDataRole.ToolTipRole)


def click(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def model_files() -> set[str]:
    return {p.name for p in user_models_dir().iterdir()}


@pytest.mark.slow
def test_fine_tune_from_the_widget(viewer_widget, qtbot, trainset, monkeypatch):
    widget = viewer_widget
    panel = widget.train
    assert panel.start_model.currentText() == START, "the start model follows the detection model"
    monkeypatch.setattr(_dialogs, "choose_directory", lambda parent, title: str(trainset))
    click(qtbot, panel.add_button)
    assert panel.folder_list() == [str(trainset)]
    panel.budget_unit.setCurrentText("steps")
    panel.steps.setValue(4)
    panel.name.setText("lab-tuned")

    click(qtbot, panel.run_button)
    assert panel.running and panel.run_button.text() == "Cancel"
    assert not panel.start_model.isEnabled() and not panel.add_button.isEnabled()
    qtbot.waitUntil(lambda: not panel.running, timeout=120_000)

    out = user_models_dir() / "lab-tuned.pt"
    checkpoint = load_checkpoint(out)
    training = checkpoint["training"]
    assert training["datasets"] == [str(trainset)] and training["init"] == START
    assert training["steps"] in (2, 4) and "--steps 4" in training["command_line"]
    assert model_files() == {f"{START}.pt", "lab-tuned.pt", "lab-tuned.json"}, "no resume or temporary file"
    # the live plot saw every step and the validations
    assert panel.plot.steps == [1, 2, 3, 4] and len(panel.plot.smoothed) == 4
    assert [v[0] for v in panel.plot.validation] == [2, 4]
    assert all(0.0 <= f1 <= 1.0 for _, f1, _ in panel.plot.validation)
    # the new model is listed, with what it was trained on, and chosen for the next detection
    assert widget.detect.model.currentText() == "lab-tuned"
    description = json.loads(out.with_suffix(".json").read_text())["description"]
    assert "trained on set" in description
    assert tooltip(widget.detect.model, "lab-tuned") == f"your model: {description}"
    assert widget.model_description.text() == f"your model: {description}"
    assert panel.start_model.currentText() == "lab-tuned" and panel.start_model.isEnabled()
    assert "Trained lab-tuned" in panel.status.text()
    assert panel.run_button.text() == "Train" and panel.name.text().startswith("finetuned-")


@pytest.mark.slow
def test_cancel_keeps_the_best_validated_model(viewer_widget, qtbot, trainset):
    widget = viewer_widget
    panel = widget.train
    panel.add_folder(trainset)
    panel.budget_unit.setCurrentText("steps")
    panel.steps.setValue(1_000_000)
    panel.name.setText("stopped")
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: len(panel.plot.validation) >= 1, timeout=60_000)
    click(qtbot, panel.run_button)
    assert panel.run_button.text() == "Cancelling…"
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)

    assert "best model validated so far" in panel.status.text()
    best_step = panel.best_validation()[0]
    assert load_checkpoint(user_models_dir() / "stopped.pt")["training"]["steps"] == best_step
    assert model_files() == {f"{START}.pt", "stopped.pt", "stopped.json"}, "nothing half-written or left over"
    assert widget.detect.model.currentText() == "stopped"
    assert panel.run_button.text() == "Train" and panel.run_button.isEnabled()
    assert all(control.isEnabled() for control in panel._controls)


def test_cancel_before_the_first_validation_writes_nothing(viewer_widget, qtbot, trainset):
    widget = viewer_widget
    panel = widget.train
    panel.add_folder(trainset)
    panel.name.setText("early")
    click(qtbot, panel.run_button)
    click(qtbot, panel.run_button)
    qtbot.waitUntil(lambda: not panel.running, timeout=60_000)
    assert "was not written" in panel.status.text()
    assert model_files() == {f"{START}.pt"}
    assert widget.detect.model.currentText() == START and panel.run_button.isEnabled()


def test_bad_training_sets_and_names_are_refused(viewer_widget, qtbot, tmp_path, tiny_series, monkeypatch):
    widget = viewer_widget
    panel = widget.train
    shown = []
    monkeypatch.setattr(train, "show_error", shown.append)

    def refused(message: str) -> None:
        shown.clear()
        click(qtbot, panel.run_button)
        assert len(shown) == 1 and message in shown[0], shown
        assert not panel.running and panel.run_button.text() == "Train"

    refused("no training set chosen")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not panel.add_folder(empty) and "has no manifest.json" in shown[-1]
    (tmp_path / "no-items").mkdir()
    (tmp_path / "no-items" / "manifest.json").write_text('{"schema": "spine-trainset/1", "items": []}')
    assert not panel.add_folder(tmp_path / "no-items") and "has no items" in shown[-1]
    assert panel.folder_list() == []

    unreviewed = make_trainset(tmp_path / "unreviewed", tiny_series, reviewed=())
    assert panel.add_folder(unreviewed)
    refused("no reviewed session")
    panel.folders.clear()
    good = make_trainset(tmp_path / "good", tiny_series)
    assert panel.add_folder(good)
    (good / "manifest.json").write_text("{not json")  # broken after it was added
    refused("is not valid JSON")
    make_trainset(tmp_path / "good2", tiny_series)
    panel.folders.clear()
    panel.add_folder(tmp_path / "good2")

    panel.name.setText("../evil")
    refused("may hold only letters")
    existing = user_models_dir() / f"{START}.pt"
    before = existing.read_bytes()
    asked = []
    monkeypatch.setattr(_dialogs, "ask_yes_no", lambda parent, title, text: asked.append(text) or False)
    panel.name.setText(START)
    click(qtbot, panel.run_button)
    assert asked and START in asked[0] and not panel.running and existing.read_bytes() == before

    panel.name.setText("ok")
    panel.start_model.insertItem(0, str(tmp_path / "missing.pt"))
    panel.start_model.setCurrentIndex(0)
    refused("no model checkpoint")
    assert model_files() == {f"{START}.pt"}


def test_budget_follows_the_device_and_the_export_folder_is_the_default(viewer_widget, trainset, tmp_path):
    widget = viewer_widget
    panel = widget.train
    assert panel.minutes.value() == 0 and panel.minutes.text().startswith("auto")
    assert panel.build_options(tmp_path / "m.pt").minutes is None, "auto: train_model's 8 CPU / 2 GPU"
    panel.device.setCurrentText("cpu")
    assert panel.minutes.value() == 8
    panel.device.setCurrentText("cuda")
    assert panel.minutes.value() == 2
    panel.minutes.setValue(5)
    panel.device.setCurrentText("cpu")
    assert panel.minutes.value() == 5, "a budget the user typed stays"
    options = panel.build_options(tmp_path / "m.pt")
    assert options.minutes == 5 and options.steps is None and options.init == START

    widget._on_exported("series", str(tmp_path / "a"))
    assert panel.folder_list() == [str(tmp_path / "a")] and widget.last_export_folder == tmp_path / "a"
    widget._on_exported("series", str(tmp_path / "b"))
    assert panel.folder_list() == [str(tmp_path / "b")], "a newer export replaces the default"
    panel.add_folder(trainset)
    widget._on_exported("series", str(tmp_path / "c"))
    assert panel.folder_list() == [str(tmp_path / "b"), str(trainset)], "folders the user chose are kept"


def test_the_section_grows_with_its_status_line(viewer_widget, qtbot):
    """A QCollapsible fixes its content height when expanded: a longer status must not be cut off."""
    widget = viewer_widget
    section = next(s for s in widget.findChildren(QCollapsible) if s.text() == "Train")
    section.expand(animate=False)
    before = section.content().maximumHeight()
    widget.train._set_status("\n".join(["a status of several lines"] * 6))
    qtbot.waitUntil(lambda: section.content().maximumHeight() > before, timeout=2000)
    assert section.content().maximumHeight() >= section.content().sizeHint().height()
