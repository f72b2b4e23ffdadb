"""The model choice shared by the Detect and Train sections: installed models by name, each with
what it was trained on (tooltip and a line under the choice), plus checkpoints picked by hand."""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel

from ..core.models import DEFAULT_MODEL, list_models

log = logging.getLogger(__name__)

BROWSE = "Browse…"


def available_models() -> list[tuple[str, str, bool]]:
    """(name, description, shipped) of the installed models; the default alone when none can be listed."""
    try:
        models = [(m.name, getattr(m, "description", ""), m.shipped) for m in list_models()]
    except Exception as exc:  # a broken model folder must not break the widget
        log.warning("cannot list models: %s", exc)
        models = []
    return models or [(DEFAULT_MODEL, "the shipped model", True)]


def is_checkpoint_path(text: str) -> bool:
    """A combo entry that is a checkpoint file picked with Browse…, not a model name."""
    return Path(text).suffix == ".pt"


def refresh_model_choice(combo: QComboBox, select: str | None = None) -> None:
    """List the installed models in ``combo`` by name, each with what it was trained on as tooltip.

    Keeps model paths picked with Browse… and the Browse… entry itself (last). Selects ``select``
    (default: the current choice, when it still exists). Listeners of ``currentIndexChanged`` and
    ``currentTextChanged`` hear the choice once, after the list is rebuilt.
    """
    wanted = select or combo.currentText()
    wanted = "" if wanted == BROWSE else wanted
    has_browse = combo.findText(BROWSE) >= 0
    browsed = [combo.itemText(i) for i in range(combo.count()) if is_checkpoint_path(combo.itemText(i))]
    combo.blockSignals(True)
    combo.clear()
    for name, description, shipped in available_models():
        if not shipped:
            tip = f"your model: {description}" if description else "your model (no description)"
        else:
            tip = description or "shipped with the plugin"
        combo.addItem(name)
        combo.setItemData(combo.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
    for path in browsed:
        combo.addItem(path)
        combo.setItemData(combo.count() - 1, path, Qt.ItemDataRole.ToolTipRole)
    if has_browse:
        combo.addItem(BROWSE)
    index = combo.findText(wanted) if wanted else -1
    combo.setCurrentIndex(index if index >= 0 else 0)
    combo.blockSignals(False)
    combo.currentIndexChanged.emit(combo.currentIndex())
    combo.currentTextChanged.emit(combo.currentText())


def model_description_label(combo: QComboBox) -> QLabel:
    """A small label that shows the chosen model's description (its tooltip) and follows the choice."""
    label = QLabel()
    label.setWordWrap(True)
    label.setStyleSheet("color: gray; font-size: small;")

    def update(*_):
        tip = combo.itemData(combo.currentIndex(), Qt.ItemDataRole.ToolTipRole)
        label.setText(str(tip) if tip and combo.currentText() != BROWSE else "")

    combo.currentIndexChanged.connect(update)
    update()
    return label


def add_model_description(form: QFormLayout, combo: QComboBox) -> QLabel:
    """Put a :func:`model_description_label` in ``form`` on the row under ``combo``."""
    label = model_description_label(combo)
    row, _ = form.getWidgetPosition(combo)
    form.insertRow(row + 1, "", label)
    return label
