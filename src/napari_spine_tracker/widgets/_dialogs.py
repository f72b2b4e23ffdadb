"""Modal questions and file choosers, in one place so that tests can answer them (monkeypatch)."""

from __future__ import annotations

from qtpy.QtWidgets import QFileDialog, QMessageBox, QWidget


def ask_yes_no(parent: QWidget | None, title: str, text: str) -> bool:
    """A Yes/No question; Yes is the default."""
    buttons = QMessageBox.StandardButton
    return QMessageBox.question(parent, title, text, buttons.Yes | buttons.No, buttons.Yes) == buttons.Yes


def ask_merge_or_replace(parent: QWidget | None, n_vetted: int) -> str:
    """After a new detection, when the layer holds vetted points: ``merge``, ``replace`` or ``cancel``."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Question)
    box.setWindowTitle("Keep your corrections?")
    box.setText(f"The spines layer holds {n_vetted} point(s) you confirmed, added or edited.")
    box.setInformativeText("Keep them (with their ids and every point of reviewed sessions) and replace "
                           "only the unreviewed predictions, or replace everything?")
    keep = box.addButton("Keep corrections", QMessageBox.ButtonRole.AcceptRole)
    replace = box.addButton("Replace all", QMessageBox.ButtonRole.DestructiveRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.setDefaultButton(keep)
    box.exec()
    clicked = box.clickedButton()
    return "merge" if clicked is keep else "replace" if clicked is replace else "cancel"


def choose_directory(parent: QWidget | None, title: str) -> str | None:
    """A folder chosen by the user, or None."""
    return QFileDialog.getExistingDirectory(parent, title) or None


def choose_open_file(parent: QWidget | None, title: str, filter: str) -> str | None:
    """An existing file chosen by the user, or None."""
    path, _ = QFileDialog.getOpenFileName(parent, title, "", filter)
    return path or None


def choose_save_file(parent: QWidget | None, title: str, suggestion: str, filter: str) -> str | None:
    """A file to write chosen by the user, or None."""
    path, _ = QFileDialog.getSaveFileName(parent, title, suggestion, filter)
    return path or None
