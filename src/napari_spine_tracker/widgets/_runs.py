"""What the Detect and Train sections share: one background run at a time, cancelled by the same
button that started it."""

from __future__ import annotations

import threading


class CancellableRun:
    """Mixin for a panel with ``run_button`` and a background ``worker``.

    The panel defines ``start()`` and sets ``self.worker`` while a run is going and back to None when it finishes;
    ``self._stop`` is the event its run polls (``should_stop=self._stop.is_set``).
    """

    worker = None

    def _init_run_state(self) -> None:
        self.worker = None
        self._stop = threading.Event()

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
