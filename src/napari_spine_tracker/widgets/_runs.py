"""What the Detect and Train sections share: one background run at a time, shown by a progress
bar in the panel and in napari's activity dock, cancelled by the same button that started it."""

from __future__ import annotations

import threading

from napari.utils import progress as napari_progress


class CancellableRun:
    """Mixin for a panel with ``run_button``, a ``bar`` (QProgressBar) and ``_controls`` (the
    widgets locked while a run goes on).

    The panel defines ``start()``, which calls :meth:`_show_running` and sets ``self.worker``;
    its ``finished`` handler calls :meth:`_show_idle`. ``self._stop`` is the event the run polls
    (``should_stop=self._stop.is_set``); progress reaches :meth:`_on_progress` on the GUI thread.
    """

    worker = None

    def _init_run_state(self) -> None:
        self.worker = None
        self._stop = threading.Event()
        self._pbar: napari_progress | None = None

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _cancel_message(self) -> str | None:
        """A status line shown while cancelling (None: none)."""
        return None

    def _on_run_clicked(self) -> None:
        if not self.running:
            self.start()
            return
        self._stop.set()
        self.run_button.setText("Cancelling…")
        self.run_button.setEnabled(False)
        message = self._cancel_message()
        if message:
            self._set_status(message)

    def _show_running(self, description: str) -> None:
        """Busy bar, a napari activity entry, the button turned into Cancel, the controls locked."""
        self._stop.clear()
        self._pbar = napari_progress(total=0, desc=description)
        self.bar.setRange(0, 0)
        self.bar.setVisible(True)
        self.run_button.setText("Cancel")
        for control in self._controls:
            control.setEnabled(False)

    def _on_progress(self, done: int, total: int) -> None:
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(done)
        if self._pbar is not None:
            self._pbar.total = total
            self._pbar.update(done - self._pbar.n)

    def _show_idle(self, run_label: str) -> None:
        """Undo :meth:`_show_running` once the worker has finished."""
        self.worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.bar.setVisible(False)
        self.run_button.setText(run_label)
        self.run_button.setEnabled(True)
        for control in self._controls:
            control.setEnabled(True)
