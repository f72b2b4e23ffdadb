"""Training sets (DESIGN §3, a contract): a folder of corrected series for fine-tuning.

::

    manifest.json    {"schema": "spine-trainset/1", "items": [{"name": NAME, "image": "images/NAME.tif",
                      "spines": "spines/NAME.csv", "voxel_size_um": [z, y, x],
                      "reviewed_sessions": [0, 2, ...]}, ...]}
    images/NAME.tif  (T, Z, Y, X) uint16 ImageJ hyperstack with its voxel size
    spines/NAME.csv  spine table

Only ``reviewed_sessions`` are complete labels: there an unmarked spot is a true negative; the
other sessions' spines are positives only. ``name`` is optional in manifests written by others
(it defaults to the image's file stem). Appending is not safe against two writers at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock

from ..errors import InputError
from .atomic import atomic_open
from .series import (
    Series,
    SeriesArray,
    load_series,
    read_voxel_size,
    validate_voxel_size,
    write_series_tiff,
)
from .tables import read_spine_table, validate_spine_table, write_spine_table

log = logging.getLogger(__name__)

SCHEMA = "spine-trainset/1"
MANIFEST = "manifest.json"
LOCK = ".manifest.lock"
_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9._+-]*$")
_UINT16_MAX = 65535


@dataclass
class TrainingItem:
    """One corrected series of a training set; paths are absolute, voxel size z, y, x in µm."""

    name: str
    image_path: Path
    spines_path: Path
    voxel_size_um: tuple[float, float, float]
    reviewed_sessions: list[int]

    def load_series(self) -> Series:
        """The image as a lazy :class:`Series`, at the manifest's voxel size."""
        return load_series(self.image_path, self.voxel_size_um)

    def load_image(self) -> SeriesArray:
        """The image (T, Z, Y, X), lazy: index it, or ``np.asarray`` it to read it all."""
        return self.load_series().data

    def load_spines(self) -> pd.DataFrame:
        """The spine table (validated)."""
        return read_spine_table(self.spines_path)


# --------------------------------------------------------------------------------------------
# writing


def _to_uint16(image: np.ndarray | SeriesArray, name: str) -> np.ndarray:
    """The rule: values that are all integers in 0..65535 are kept exactly, whatever the dtype;
    anything else (negative, larger, fractional) is mapped linearly from [min, max] onto
    [0, 65535]. NaN or infinite values are an error."""
    image = np.asarray(image)
    if image.dtype == np.uint16:
        return image
    if image.dtype.kind not in "biuf":
        raise InputError(f"training item {name!r}: image dtype {image.dtype} is not numeric.")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputError(f"training item {name!r}: the image holds NaN or infinite values; replace them "
                         "(e.g. np.nan_to_num) before adding it.")
    lo, hi = (image.min(), image.max()) if image.size else (0, 0)
    exact = lo >= 0 and hi <= _UINT16_MAX and (image.dtype.kind in "biu" or np.all(image == np.round(image)))
    if exact:
        return image.astype(np.uint16)
    log.warning("training item %r: %s values in [%g, %g] are rescaled linearly to 0..65535 for the uint16 "
                "training image.", name, image.dtype, float(lo), float(hi))
    scale = _UINT16_MAX / (float(hi) - float(lo)) if hi > lo else 0.0
    out = np.empty(image.shape, np.uint16)
    for t in range(image.shape[0]):  # one session at a time: no float copy of the whole series
        out[t] = np.round((image[t].astype(np.float64) - float(lo)) * scale)
    return out


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{folder} has no {MANIFEST}: it is not a training set. Create one with "
                         "append_training_item() or the widget's export.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); restore it from a backup or fix it by "
                         "hand.") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"{path}: schema {found!r} is not {SCHEMA!r}; this is not a training set this "
                         "version can read.")
    if not isinstance(manifest.get("items"), list):
        raise InputError(f"{path}: 'items' must be a list of items.")
    return manifest


def _item_name(entry: object) -> str | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("name"), str):
        return entry["name"]
    image = entry.get("image")
    return Path(image).stem if isinstance(image, str) else None


def append_training_item(folder: str | os.PathLike, name: str, image: np.ndarray | SeriesArray | Series,
                         spines: pd.DataFrame, voxel_size_um: Sequence[float],
                         reviewed_sessions: Sequence[int]) -> TrainingItem:
    """Add (or replace) item ``name``: writes ``images/NAME.tif``, ``spines/NAME.csv``, then the manifest.

    ``image`` is (T, Z, Y, X) or (Z, Y, X). Conversion to uint16: values that are all integers in
    0..65535 are kept exactly, whatever the dtype; anything else is mapped linearly from
    [min, max] onto [0, 65535] (with a warning); NaN or infinite values are an error. Spine
    coordinates are voxels of each session's image, voxel size is z, y, x in µm. Everything is
    checked before anything is written; each file is written atomically, the manifest last.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"training item name {name!r} must not start with '.' and may hold only "
                         "letters, digits and . _ + - (it becomes a file name), e.g. 'mouse1_dendrite3'.")
    voxel = validate_voxel_size(voxel_size_um, source=f"training item {name!r}: voxel size")
    if isinstance(image, Series):
        image = image.data
    if image.ndim == 3:
        image = np.asarray(image)[np.newaxis]
    if image.ndim != 4:
        raise InputError(f"training item {name!r}: the image must be (T, Z, Y, X) or (Z, Y, X), got shape "
                         f"{tuple(image.shape)}.")
    n_sessions = int(image.shape[0])
    reviewed = _check_reviewed(reviewed_sessions, n_sessions, f"training item {name!r}")
    table = validate_spine_table(spines, source=f"training item {name!r}: spine table")
    _check_spines_fit(table, tuple(int(n) for n in image.shape), f"training item {name!r}")
    image_rel, spines_rel = f"images/{name}.tif", f"spines/{name}.csv"
    entry = {"name": name, "image": image_rel, "spines": spines_rel, "voxel_size_um": list(voxel),
             "reviewed_sessions": reviewed}
    folder.mkdir(parents=True, exist_ok=True)
    # one writer at a time (two napari windows, or a script beside the widget, exporting to one
    # set): the manifest is read, the files written and the manifest replaced under a lock file
    with FileLock(folder / LOCK):
        manifest = (_read_manifest(folder) if (folder / MANIFEST).exists()
                    else {"schema": SCHEMA, "items": []})
        write_series_tiff(folder / image_rel, _to_uint16(image, name), voxel)
        write_spine_table(table, folder / spines_rel)
        items = [e for e in manifest["items"] if _item_name(e) != name]
        replaced = len(items) < len(manifest["items"])
        manifest["items"] = [*items, entry]
        with atomic_open(folder / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    log.info("%s training item %r in %s (%d sessions, %d reviewed, %d spine points)",
             "replaced" if replaced else "added", name, folder, n_sessions, len(reviewed), len(table))
    return TrainingItem(name, (folder / image_rel).resolve(), (folder / spines_rel).resolve(), voxel,
                        reviewed)


def _check_reviewed(reviewed: object, n_sessions: int, where: str) -> list[int]:
    if isinstance(reviewed, str | bytes) or not isinstance(reviewed, Sequence | np.ndarray):
        raise InputError(f"{where}: reviewed_sessions must be a list of session indices, got {reviewed!r}.")
    out = []
    for t in reviewed:
        if isinstance(t, bool) or not isinstance(t, int | np.integer):
            raise InputError(f"{where}: reviewed session {t!r} is not an integer session index.")
        if not 0 <= int(t) < n_sessions:
            raise InputError(f"{where}: reviewed session {int(t)} does not exist; the image has "
                             f"{n_sessions} session(s), numbered 0..{n_sessions - 1}.")
        out.append(int(t))
    if not out:
        log.warning("%s has no reviewed session: its spines count only as positives, never as negatives.",
                    where)
    return sorted(set(out))


def _check_spines_fit(table: pd.DataFrame, shape: tuple[int, ...], where: str) -> None:
    """Spines must lie in the image: t < T and z, y, x within a voxel of the grid."""
    if table.empty:
        return
    if int(table["t"].max()) >= shape[0]:
        raise InputError(f"{where}: spine table has session t={int(table['t'].max())} but the image has "
                         f"{shape[0]} session(s).")
    for axis, n in zip("zyx", shape[1:], strict=True):
        values = table[axis].to_numpy()
        if values.min() < -1 or values.max() > n:
            raise InputError(f"{where}: spine {axis} coordinates span {values.min():g}..{values.max():g} but "
                             f"the image has {n} voxels along {axis}; coordinates are in voxels, not µm.")


# --------------------------------------------------------------------------------------------
# reading


def read_training_set(folder: str | os.PathLike) -> list[TrainingItem]:
    """Read and validate a training set; every problem is an :class:`InputError` naming the item."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"training set {folder} does not exist or is not a folder: check the path.")
    manifest = _read_manifest(folder)
    if not manifest["items"]:
        raise InputError(f"training set {folder} has no items; add corrected series with "
                         "append_training_item() or the widget's export first.")
    items, seen = [], set()
    for i, entry in enumerate(manifest["items"]):
        item = _read_item(folder, i, entry)
        if item.name in seen:
            raise InputError(f"training set {folder}: item {i} repeats the name {item.name!r}; remove one "
                             f"of them from {MANIFEST}.")
        seen.add(item.name)
        items.append(item)
    return items


def _read_item(folder: Path, index: int, entry: object) -> TrainingItem:
    where = f"training set {folder}, item {index}"
    if not isinstance(entry, dict):
        raise InputError(f"{where}: must be an object with image, spines, voxel_size_um and "
                         f"reviewed_sessions; found {entry!r}. Fix {MANIFEST}.")
    name = _item_name(entry)
    where = f"{where} ({name!r})" if name else where
    paths = {}
    for key in ("image", "spines"):
        rel = entry.get(key)
        if not isinstance(rel, str) or not rel:
            raise InputError(f"{where}: '{key}' must be a path relative to the folder. Fix {MANIFEST}.")
        paths[key] = (folder / rel).resolve()
        if not paths[key].is_file():
            raise InputError(f"{where}: {key} file {paths[key]} is missing; restore it or remove the item "
                             f"from {MANIFEST}.")
    raw_voxel = entry.get("voxel_size_um")
    if not isinstance(raw_voxel, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in raw_voxel):
        raise InputError(f"{where}: voxel_size_um must be a list [z, y, x] of numbers in µm, got "
                         f"{raw_voxel!r}.")
    voxel = validate_voxel_size(raw_voxel, source=f"{where}: voxel_size_um")
    try:
        series = load_series(paths["image"], voxel)
        table = read_spine_table(paths["spines"])
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from exc
    reviewed = _check_reviewed(entry.get("reviewed_sessions"), series.n_sessions, where)
    _check_spines_fit(table, tuple(series.data.shape), where)
    in_file = read_voxel_size(paths["image"])
    if in_file is not None and not np.allclose(in_file, voxel, rtol=1e-3):
        log.warning("%s: manifest voxel size %s differs from the image's metadata %s; using the manifest's.",
                    where, voxel, in_file)
    return TrainingItem(name or paths["image"].stem, paths["image"], paths["spines"], voxel, reviewed)
