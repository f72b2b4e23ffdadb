"""The look of the ``spines`` Points layer and the ``spine tracks`` Tracks layer (DESIGN §3).

Plain data only (numpy, pandas, napari's Colormap): the reader and the sample-data hooks build
layers with these keyword arguments too, so a table opened from disk looks like a detection.

- ``spines``: ndim 4 (t, z, y, x), ``features`` track_id/score/status, text shows the id, the face
  colour comes from a categorical palette indexed by id (consecutive ids differ), drawn as a ring
  so the spine head stays visible; points a human vetted get a white outline.
- ``spine tracks``: (track_id, t, z, y, x), the same colour per id as the points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..core.edits import HAND_DEFAULTS, human_vetted

SPINES_LAYER = "spines"
TRACKS_LAYER = "spine tracks"
#: the detection's suggestions of missed spines (squares under the spines; not a spine table)
SUGGESTIONS_LAYER = "spine suggestions"
SUGGESTION_BORDER = (1.0, 0.75, 0.1, 1.0)  # amber
CURRENT_SUGGESTION_BORDER = (1.0, 1.0, 1.0, 1.0)  # the one the review visits
#: ``layer.metadata["spine_tracker"]`` schema
METADATA_SCHEMA = "spine-points/1"
#: where the reader puts the suggestions saved beside a table (columns as lists), for the editor
SUGGESTIONS_KEY = "suggestions"

#: bright, mutually distinct colours (after Trubetskoy's 20, the dark ones lightened for a dark canvas)
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (67, 99, 216), (245, 130, 49), (177, 92, 255),
    (70, 240, 240), (240, 50, 230), (188, 246, 12), (250, 190, 190), (0, 179, 179), (230, 190, 255),
    (210, 160, 90), (255, 250, 200), (170, 255, 195), (255, 216, 177),
], dtype=float) / 255.0
VETTED_BORDER = (1.0, 1.0, 1.0, 1.0)
PREDICTED_BORDER = (0.0, 0.0, 0.0, 0.0)  # none: a raw prediction is a plain coloured ring


def palette_index(track_ids: Iterable[int]) -> np.ndarray:
    """Palette slot of each id: consecutive ids get different colours."""
    return (np.asarray(list(track_ids), dtype=int) - 1) % len(PALETTE)


def id_colours(track_ids: Iterable[int]) -> np.ndarray:
    """(N, 4) RGBA, one colour per id."""
    rgb = PALETTE[palette_index(track_ids)]
    return np.column_stack([rgb, np.ones(len(rgb))]).reshape(-1, 4)


def status_borders(features: pd.DataFrame) -> np.ndarray:
    """(N, 4) RGBA border: white where a human vetted the point, none for raw predictions."""
    borders = np.tile(PREDICTED_BORDER, (len(features), 1))
    borders[human_vetted(features)] = VETTED_BORDER
    return borders


def spine_layer_metadata(reviewed_sessions: Iterable[int] = (), **extra) -> dict:
    """``layer.metadata`` of a spines layer: schema version and reviewed sessions."""
    return {"spine_tracker": {"schema": METADATA_SCHEMA,
                              "reviewed_sessions": sorted({int(s) for s in reviewed_sessions}), **extra}}


def reviewed_sessions_of(metadata: dict) -> set[int]:
    """Sessions marked reviewed in a layer's metadata (empty for a foreign layer)."""
    return {int(s) for s in metadata.get("spine_tracker", {}).get("reviewed_sessions", [])}


def take_suggestions(metadata: dict) -> pd.DataFrame | None:
    """The suggestions the reader put in a spines layer's metadata, removed from it (they are
    offered once, with the table they were saved with); None where there are none."""
    stored = metadata.get("spine_tracker", {}).pop(SUGGESTIONS_KEY, None)
    return None if stored is None else pd.DataFrame(stored)


def spine_points_kwargs(data: np.ndarray, features: pd.DataFrame, *, scale: Sequence[float] | None = None,
                        translate: Sequence[float] | None = None, name: str = SPINES_LAYER,
                        reviewed_sessions: Iterable[int] = (), size: float = 7.0) -> dict:
    """Keyword arguments for ``napari.layers.Points`` (or ``viewer.add_points``) of spines.

    ``data`` (N, 4) t, z, y, x in voxels; ``scale`` (4,) world units per voxel, time first.
    ``size`` is the marker diameter in y/x voxels.
    """
    kwargs = dict(
        data=data, ndim=4, name=name, features=features,
        feature_defaults={**HAND_DEFAULTS, **{c: np.nan for c in features.columns if c not in HAND_DEFAULTS}},
        face_color=id_colours(features["track_id"]) if len(features) else "white",
        border_color=status_borders(features) if len(features) else "white",
        border_width=0.15, border_width_is_relative=True, symbol="ring", size=size,
        text={"string": "{track_id}", "size": 9, "color": "white", "anchor": "upper_left",
              "translation": [0, 0, -size / 2, size / 2]},
        metadata=spine_layer_metadata(reviewed_sessions),
    )
    if scale is not None:
        kwargs["scale"] = tuple(scale)
    if translate is not None:
        kwargs["translate"] = tuple(translate)
    return kwargs


def suggestion_features(scores: np.ndarray, track_ids: np.ndarray) -> pd.DataFrame:
    """Features of the suggestions layer: the score, and the id **Y** would give ("" for a new one),
    written next to each square."""
    return pd.DataFrame({"score": np.asarray(scores, float),
                         "expected": [str(int(i)) if i > 0 else "" for i in np.asarray(track_ids)]})


def suggestion_points_kwargs(data: np.ndarray, features: pd.DataFrame, *, scale: Sequence[float],
                             translate: Sequence[float], size: float = 9.0) -> dict:
    """Keyword arguments for the Points layer of suggestions: ``data`` (N, 4) t, z, y, x voxels,
    amber squares with the id of the track each would continue (``suggestion_features``)."""
    return dict(data=data, ndim=4, name=SUGGESTIONS_LAYER, features=features,
                symbol="square", face_color="transparent", border_color=np.asarray(SUGGESTION_BORDER),
                border_width=0.12, border_width_is_relative=True, size=size, scale=tuple(scale),
                translate=tuple(translate),
                text={"string": "{expected}", "size": 8, "color": np.asarray(SUGGESTION_BORDER),
                      "anchor": "lower_right", "translation": [0, 0, size / 2, -size / 2]})


def tracks_data(data: np.ndarray, features: pd.DataFrame) -> tuple[np.ndarray, dict]:
    """Tracks layer ``data`` (M, 5) track_id, t, z, y, x sorted by id then t, and ``properties``."""
    ids = features["track_id"].to_numpy(dtype=float)
    tracks = np.column_stack([ids, np.round(data[:, 0]), data[:, 1:]]).reshape(-1, 5)
    order = np.lexsort((tracks[:, 1], tracks[:, 0]))
    tracks = tracks[order]
    colour_key = (palette_index(tracks[:, 0].astype(int)) + 0.5) / len(PALETTE)
    return tracks, {"track_id": tracks[:, 0].astype(int), "colour": colour_key}


def tracks_colormap():
    """The palette as a napari Colormap over ``properties["colour"]`` (no normalisation)."""
    from napari.utils.colormaps import Colormap

    n = len(PALETTE)
    return Colormap(colors=np.column_stack([PALETTE, np.ones(n)]), controls=np.linspace(0, 1, n + 1),
                    interpolation="zero", name="spine ids")


def spine_tracks_kwargs(data: np.ndarray, features: pd.DataFrame, *, scale: Sequence[float] | None = None,
                        translate: Sequence[float] | None = None) -> dict:
    """Keyword arguments for ``napari.layers.Tracks`` of the spines (needs at least one point)."""
    tracks, properties = tracks_data(data, features)
    kwargs = dict(data=tracks, properties=properties, name=TRACKS_LAYER, color_by="colour",
                  colormaps_dict={"colour": tracks_colormap()}, tail_length=1, head_length=0, tail_width=1.5,
                  opacity=0.6, blending="translucent")
    if scale is not None:
        kwargs["scale"] = tuple(scale)
    if translate is not None:
        kwargs["translate"] = tuple(translate)
    return kwargs
