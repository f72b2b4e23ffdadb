"""npe2 hooks (see napari.yaml): reader, writer and sample data. No Qt here.

- reader: spine tables (recognised by their header, not the extension alone) -> a Points layer
  like the one detection makes, carrying the suggestions of missed spines saved beside the table
  (``NAME.suggestions.csv``) in its metadata for the widget to offer; a one-channel TIFF or a
  folder of one 3D TIFF per session -> a lazy 4D image with its voxel size as scale, and the spine
  table beside it (``NAME.spines.csv``) where detection wrote one. A TIFF this reader cannot take
  whole (several channels) is left to napari's own reader.
  ``get_reader`` returns None for anything else and never raises.
- writer: a Points layer -> a spine table CSV (atomic).
- samples: ``synthetic_series`` (a synthetic series and its ground truth) and ``real_dendrite``
  (a crop of a real two-photon stack).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

LayerData = tuple[Any, dict, str]

REAL_DENDRITE_VOXEL_UM = (0.5, 0.094, 0.094)
REAL_DENDRITE_ATTRIBUTION = (
    "Crop of the DeepD3 benchmark stack (Fernholz et al., 'DeepD3, an open framework for automated "
    "quantification of dendritic spines', PLOS Comput Biol 2024; Zenodo record 8428849), as published "
    "in the examples of the splinebox project (BSD-3-Clause). Voxel size about 0.5 x 0.094 x 0.094 µm "
    "(z, y, x), not stored in the file."
)


# --------------------------------------------------------------------------------------------
# reader


def get_reader(path: str | Sequence[str]) -> Callable[[str], list[LayerData]] | None:
    """npe2 reader hook: a reader for spine tables and session folders, else None (never raises)."""
    try:
        if not isinstance(path, str | os.PathLike):
            if len(path) != 1:
                return None
            path = path[0]
        p = Path(path)
        if p.is_dir():
            from .io.series import list_session_files

            return read_series if list_session_files(p) else None
        if p.suffix.lower() in (".tif", ".tiff"):
            from .io.series import load_series

            # a file only this reader's one-channel series can read is left to napari's own reader
            load_series(p, require_voxel_size=False).close()
            return read_series
        from .io.tables import looks_like_spine_table

        if p.suffix.lower() == ".csv" and looks_like_spine_table(p):
            return read_spine_table_layer
    except Exception as exc:  # the reader contract: never raise from get_reader
        log.debug("get_reader(%r): %s", path, exc)
    return None


def _one_path(path: str | Sequence[str]) -> Path:
    return Path(path if isinstance(path, str | os.PathLike) else path[0])


def read_spine_table_layer(path: str | Sequence[str]) -> list[LayerData]:
    """A spine table CSV -> a ``spines``-style Points layer (an autosave brings its reviewed sessions)."""
    from .core.edits import points_from_table
    from .io.autosave import AUTOSAVE_SUFFIX, read_autosave
    from .io.tables import TABLE_SUFFIX, read_spine_table, read_suggestions, suggestions_path
    from .widgets._layers import SPINES_LAYER, SUGGESTIONS_KEY, spine_points_kwargs

    path = _one_path(path)
    reviewed: tuple[int, ...] = ()
    if path.name.endswith(AUTOSAVE_SUFFIX):
        record = read_autosave(path)
        table, reviewed = record.table, record.reviewed_sessions
    else:
        table = read_spine_table(path)
    named_as_spines = path.name.endswith((TABLE_SUFFIX, AUTOSAVE_SUFFIX))
    name = SPINES_LAYER if named_as_spines else path.stem
    data, features = points_from_table(table)
    kwargs = spine_points_kwargs(data, features, name=name, reviewed_sessions=reviewed)
    kwargs["metadata"]["spine_tracker"]["source"] = str(path)
    beside = suggestions_path(path)
    if beside.is_file():  # the Spine Tracker widget offers them (G, Y); a bad file loses only them
        try:
            kwargs["metadata"]["spine_tracker"][SUGGESTIONS_KEY] = read_suggestions(beside).to_dict("list")
        except InputError as exc:
            log.warning("suggestions not opened: %s", exc)
    return [(kwargs.pop("data"), kwargs, "points")]


def read_series(path: str | Sequence[str]) -> list[LayerData]:
    """A TIFF (4D T, Z, Y, X or 3D, one session) or a folder of 3D TIFFs (one per session, natural
    sort order) -> a lazy 4D (T, Z, Y, X) image with the voxel size as its scale, and the spine
    table detection wrote beside it (``NAME.spines.csv``, with its suggestions) where there is one."""
    from .io.series import load_series
    from .io.tables import default_table_path, looks_like_spine_table

    path = _one_path(path)
    series = load_series(path, require_voxel_size=False)
    kwargs: dict = {"name": series.name, "rgb": False,
                    "metadata": {"voxel_size_um": series.voxel_size_um,
                                 "sources": [str(s) for s in series.sources]}}
    if series.voxel_size_um is not None:
        kwargs["scale"] = (1.0, *series.voxel_size_um)
    else:
        log.warning("%s: voxel size unknown; enter it in the Spine Tracker widget", path)
    layers = [(series.data, kwargs, "image")]
    table = default_table_path(path)
    if table.is_file() and looks_like_spine_table(table):
        try:
            ((data, points, kind),) = read_spine_table_layer(table)
        except InputError as exc:  # the image still opens; the table can be opened on its own
            log.warning("%s not opened with %s: %s", table.name, path.name, exc)
        else:
            points["scale"] = kwargs.get("scale", (1.0, 1.0, 1.0, 1.0))
            layers.append((data, points, kind))
    return layers


# --------------------------------------------------------------------------------------------
# writer


def points_layer_table(data: np.ndarray, features: pd.DataFrame | None) -> pd.DataFrame:
    """Points ``data`` (N, 4) t, z, y, x or (N, 3) z, y, x (session 0) + features -> spine table.

    A layer without ``track_id`` (points clicked in another layer) gets ids 1..N, score 1.0 and
    status ``added``.
    """
    from .core.edits import table_from_points

    data = np.asarray(data, dtype=float)
    if data.size == 0:
        data = data.reshape(0, 4)
    if data.ndim != 2 or data.shape[1] not in (3, 4):
        raise InputError(f"a spine table needs 3D (z, y, x) or 4D (t, z, y, x) points; this layer's "
                         f"points have {data.shape[-1]} dimensions.")
    if data.shape[1] == 3:
        data = np.column_stack([np.zeros(len(data)), data])
    features = pd.DataFrame(index=range(len(data))) if features is None else pd.DataFrame(features).copy()
    if "track_id" not in features.columns:
        features["track_id"] = np.arange(1, len(data) + 1)
    return table_from_points(data, features)  # missing score and status get the hand defaults


def write_points(path: str, data: np.ndarray, attributes: dict) -> list[str]:
    """npe2 writer hook: one Points layer -> a spine table CSV; returns the path written."""
    from .io.tables import write_spine_table

    table = points_layer_table(data, attributes.get("features"))
    return [str(write_spine_table(table, path))]


# --------------------------------------------------------------------------------------------
# sample data


def make_sample_series() -> list[LayerData]:
    """The ``sample`` synthetic series (T, Z, Y, X) with its ground truth as a ``truth`` Points layer."""
    from .core.edits import points_from_table
    from .core.synth import SynthConfig, synthesize_series
    from .widgets._layers import spine_points_kwargs

    synth = synthesize_series(SynthConfig.preset("sample", seed=0))
    scale = (1.0, *synth.voxel_size_um)
    image = (synth.image, {"name": "synthetic series", "scale": scale, "rgb": False,
                           "metadata": {"voxel_size_um": synth.voxel_size_um,
                                        "synth": synth.metadata()}}, "image")
    data, features = points_from_table(synth.truth)
    kwargs = spine_points_kwargs(data, features, name="truth", scale=scale)
    kwargs["visible"] = False  # the answer key: shown on demand, not over the detection
    return [image, (kwargs.pop("data"), kwargs, "points")]


def real_dendrite_path() -> Path:
    """The bundled real stack (Z, Y, X) uint16."""
    return Path(str(resources.files("napari_spine_tracker") / "data" / "deepd3_crop_dendrite.tif"))


def make_real_dendrite() -> list[LayerData]:
    """A real two-photon dendrite (one session, Z, Y, X) with its voxel size and attribution."""
    import tifffile

    path = real_dendrite_path()
    if not path.is_file():
        raise InputError(f"the bundled stack {path} is missing; reinstall napari-spine-tracker.")
    image = tifffile.imread(path)
    return [(image, {"name": "real dendrite", "scale": REAL_DENDRITE_VOXEL_UM, "rgb": False,
                     "metadata": {"voxel_size_um": REAL_DENDRITE_VOXEL_UM,
                                  "attribution": REAL_DENDRITE_ATTRIBUTION}}, "image")]
