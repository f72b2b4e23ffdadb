"""Autosave of the spines being corrected, so that a crash loses at most a second or two of work.

Two files, each written atomically: ``NAME.spines.autosave.csv`` (a spine table that any reader of
spine tables opens) and ``NAME.spines.autosave.json`` (the sessions marked reviewed, the image it
belongs to, the time of the save). They sit next to the image when its folder is writable, and
otherwise (read-only folder, image without a file) in the user data folder
(``platformdirs.user_data_dir("napari-spine-tracker")/autosave``, or
``$NAPARI_SPINE_TRACKER_DATA_DIR/autosave``).

:class:`Autosaver` takes snapshots from the GUI thread and writes the newest one from a background
thread at most ``delay_s`` after the first unsaved edit: editing continuously still saves once per
``delay_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import InputError
from .atomic import atomic_open
from .tables import default_table_path, read_spine_table, write_spine_table

log = logging.getLogger(__name__)

AUTOSAVE_SUFFIX = ".spines.autosave.csv"
SCHEMA = "spine-autosave/1"


@dataclass(frozen=True)
class AutosaveRecord:
    """An autosave found on disk."""

    path: Path  #: the CSV spine table
    table: pd.DataFrame
    reviewed_sessions: tuple[int, ...]
    saved_at: float  #: seconds since the epoch
    image: str | None  #: the image file or folder it belongs to, if it had one


def _meta_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name[: -len(".csv")] + ".json")


def user_autosave_dir() -> Path:
    """``autosave`` in the plugin's user data folder (``NAPARI_SPINE_TRACKER_DATA_DIR`` overrides it)."""
    from ..core.models import user_data_dir

    return user_data_dir() / "autosave"


def user_autosave_path(image_path: str | os.PathLike | None, image_name: str,
                       shape: Sequence[int]) -> Path:
    """Autosave path in the user data folder, unique per image file (or per name and shape)."""
    key = str(Path(image_path).resolve()) if image_path else f"{image_name}|{tuple(int(s) for s in shape)}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return user_autosave_dir() / f"{safe_name(image_name)}-{digest}{AUTOSAVE_SUFFIX}"


def safe_name(name: str, default: str = "image") -> str:
    """A layer name as a file name: letters, digits and ``. _ + -``, no leading dot."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("_").lstrip(".") or default


def sidecar_autosave_path(image_path: str | os.PathLike) -> Path:
    """``dir/NAME.tif`` (or folder ``dir/NAME``) -> ``dir/NAME.spines.autosave.csv``."""
    table_path = default_table_path(image_path)
    return table_path.with_name(table_path.name[: -len(".spines.csv")] + AUTOSAVE_SUFFIX)


def autosave_candidates(image_path: str | os.PathLike | None, image_name: str,
                        shape: Sequence[int]) -> list[Path]:
    """Where an autosave of this image may be, preferred place first."""
    paths = [sidecar_autosave_path(image_path)] if image_path else []
    return [*paths, user_autosave_path(image_path, image_name, shape)]


def write_autosave(path: str | os.PathLike, table: pd.DataFrame, reviewed_sessions: Iterable[int] = (),
                   image: str | os.PathLike | None = None) -> Path:
    """Write the table and its metadata atomically (two files); returns the CSV path."""
    path = Path(path)
    write_spine_table(table, path)
    meta = {"schema": SCHEMA, "image": str(image) if image else None,
            "reviewed_sessions": sorted({int(s) for s in reviewed_sessions}),
            "saved_at": time.time(), "rows": len(table)}
    with atomic_open(_meta_path(path), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return path


def read_autosave(path: str | os.PathLike) -> AutosaveRecord:
    """Read an autosave written by :func:`write_autosave` (the JSON part is optional)."""
    path = Path(path)
    table = read_spine_table(path)
    meta: dict = {}
    meta_path = _meta_path(path)
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable autosave metadata %s: %s", meta_path, exc)
    return AutosaveRecord(path=path, table=table,
                          reviewed_sessions=tuple(int(s) for s in meta.get("reviewed_sessions", [])),
                          saved_at=float(meta.get("saved_at", path.stat().st_mtime)),
                          image=meta.get("image"))


def find_autosave(image_path: str | os.PathLike | None, image_name: str,
                  shape: Sequence[int]) -> AutosaveRecord | None:
    """The newest readable autosave of this image, or None."""
    records = []
    for path in autosave_candidates(image_path, image_name, shape):
        if path.is_file():
            try:
                records.append(read_autosave(path))
            except InputError as exc:
                log.warning("ignoring unreadable autosave %s: %s", path, exc)
    return max(records, key=lambda r: r.saved_at, default=None)


class Autosaver:
    """Debounced, atomic autosave of one image's spines, written off the calling thread.

    ``submit(table, reviewed_sessions)`` returns at once; the newest snapshot is written at most
    ``delay_s`` seconds after the first unsaved one. Next to the image if its folder is writable,
    else in the user data folder (also when a write there fails). ``on_error(message)`` is called,
    from the writer thread, when no place could be written.
    """

    def __init__(self, image_path: str | os.PathLike | None, image_name: str, shape: Sequence[int], *,
                 delay_s: float = 1.0, on_error: Callable[[str], None] | None = None):
        self.image_path = Path(image_path) if image_path else None
        self.delay_s = float(delay_s)
        self.on_error = on_error
        self._candidates = autosave_candidates(image_path, image_name, shape)
        if self.image_path and not os.access(self._candidates[0].parent, os.W_OK):
            self._candidates = self._candidates[1:]
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._pending: tuple[pd.DataFrame, tuple[int, ...]] | None = None
        self._timer: threading.Timer | None = None
        self.last_saved: float | None = None

    @property
    def path(self) -> Path:
        """Where the next save goes."""
        return self._candidates[0]

    def submit(self, table: pd.DataFrame, reviewed_sessions: Iterable[int] = ()) -> None:
        """Queue a snapshot (the caller must not change ``table`` afterwards)."""
        with self._lock:
            self._pending = (table, tuple(reviewed_sessions))
            if self._timer is None:
                self._timer = threading.Timer(self.delay_s, self._write_pending)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> Path | None:
        """Write the pending snapshot now (blocking); returns the path written, if any."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        return self._write_pending()

    def close(self) -> None:
        """Flush and stop."""
        self.flush()

    def _write_pending(self) -> Path | None:
        with self._write_lock:
            with self._lock:
                pending, self._pending, self._timer = self._pending, None, None
            if pending is None:
                return None
            table, reviewed = pending
            errors = []
            while self._candidates:
                try:
                    path = write_autosave(self.path, table, reviewed, image=self.image_path)
                except InputError as exc:  # a table that is not valid cannot be saved anywhere
                    errors.append(str(exc))
                    break
                except OSError as exc:
                    errors.append(f"{self.path}: {exc}")
                    log.warning("autosave to %s failed (%s); trying the next place", self.path, exc)
                    if len(self._candidates) == 1:
                        break
                    self._candidates = self._candidates[1:]
                    continue
                self.last_saved = time.time()
                return path
            if self.on_error is not None:
                self.on_error("autosave failed: " + "; ".join(errors))
            return None
