"""Corrections to a spine table as pure functions: ``(data, features, ...) -> (data, features)``.

The napari ``spines`` layer holds the table as ``data`` (N, 4) float, columns ``t, z, y, x`` in
voxels of each session's own image, and ``features``, a DataFrame with ``track_id`` (int),
``score`` (float) and ``status`` (str) plus any extra columns of the spine table. Each function
returns new arrays and never changes its inputs, so that the widget can keep an undo history of
snapshots and every edit is tested without a GUI.

Statuses: a prediction a human confirmed becomes ``confirmed``; a prediction moved by hand
becomes ``edited``; a point placed by hand is ``added`` (score 1.0) and stays ``added`` when moved.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ..errors import InputError
from ..io.tables import HUMAN_STATUSES, LINK_COLUMN, REQUIRED_COLUMNS, empty_spine_table, validate_spine_table
from .decode import SUGGEST_APART_UM

#: coordinate columns of the layer data, in order
POINT_COLUMNS = ("t", "z", "y", "x")
#: features every spines layer carries, in order
FEATURE_COLUMNS = ("track_id", "score", "status")
#: features of a point placed by hand (napari's ``feature_defaults``); track_id 0 means "not yet
#: assigned", replaced by :func:`add_spine`
HAND_DEFAULTS = {"track_id": 0, "score": 1.0, "status": "added"}

Points = tuple[np.ndarray, pd.DataFrame]


# --------------------------------------------------------------------------------------------
# table <-> (data, features)


def points_from_table(table: pd.DataFrame) -> Points:
    """Spine table -> ``data`` (N, 4) float ``t, z, y, x`` and typed ``features`` (extra columns kept)."""
    table = validate_spine_table(table)
    data = table[list(POINT_COLUMNS)].to_numpy(dtype=float).reshape(-1, 4)
    features = table.drop(columns=list(POINT_COLUMNS)).reset_index(drop=True)
    return data, typed_features(features)


def table_from_points(data: np.ndarray, features: pd.DataFrame) -> pd.DataFrame:
    """``data`` (N, 4) ``t, z, y, x`` + ``features`` -> a validated spine table (``t`` rounded)."""
    data = _as_data(data)
    features = typed_features(features)
    if len(features) != len(data):
        raise InputError(f"{len(data)} points but {len(features)} feature rows; they must match.")
    if len(data) == 0:
        extra = [c for c in features.columns if c not in REQUIRED_COLUMNS]
        return pd.concat([empty_spine_table(), features[extra].iloc[:0]], axis=1)
    coords = pd.DataFrame(data, columns=list(POINT_COLUMNS))
    coords["t"] = np.round(coords["t"]).astype("int64")
    table = pd.concat([coords, features.reset_index(drop=True)], axis=1)
    return validate_spine_table(table[[*REQUIRED_COLUMNS, *_extra(features)]], source="spines layer")


def _extra(features: pd.DataFrame) -> list[str]:
    return [c for c in features.columns if c not in REQUIRED_COLUMNS]


def typed_features(features: pd.DataFrame) -> pd.DataFrame:
    """Features with the three required columns first and typed (a copy)."""
    features = features.reset_index(drop=True).copy()
    for name, value in HAND_DEFAULTS.items():
        if name not in features.columns:
            features[name] = value
    features["track_id"] = features["track_id"].astype("int64")
    features["score"] = features["score"].astype("float64")
    features["status"] = features["status"].astype(str).astype(object)
    return features[[*FEATURE_COLUMNS, *_extra(features)]]


def _as_data(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=float)
    if data.size == 0:
        return np.zeros((0, 4))
    if data.ndim != 2 or data.shape[1] != 4:
        raise InputError(f"spine points must be (N, 4) t, z, y, x; got shape {data.shape}.")
    return data


def empty_points() -> Points:
    """No spines: ``data`` (0, 4) and typed empty features."""
    return points_from_table(empty_spine_table())


# --------------------------------------------------------------------------------------------
# queries


def sessions_of(data: np.ndarray) -> np.ndarray:
    """Session index of each point, (N,) int."""
    return np.round(_as_data(data)[:, 0]).astype(int)


def new_track_id(features: pd.DataFrame) -> int:
    """The smallest id above every id in use (1 for an empty layer)."""
    ids = features["track_id"].to_numpy()
    return int(ids.max()) + 1 if len(ids) and ids.max() >= 1 else 1


def track_has_point(data: np.ndarray, features: pd.DataFrame, track_id: int, session: int,
                    ignore: Iterable[int] = ()) -> bool:
    """Whether spine ``track_id`` already has a point in ``session`` (rows in ``ignore`` excluded)."""
    mask = (features["track_id"].to_numpy() == track_id) & (sessions_of(data) == session)
    mask[list(ignore)] = False
    return bool(mask.any())


def human_vetted(features: pd.DataFrame) -> np.ndarray:
    """(N,) bool: the points a human confirmed, added or edited."""
    return features["status"].isin(HUMAN_STATUSES).to_numpy()


def next_unconfirmed(features: pd.DataFrame, after: int | tuple[float, int] | None = None) -> int | None:
    """Index of the next ``predicted`` point in order of rising score (least certain first).

    ``after`` is the point reviewed last, as its index or as ``(score, index)`` kept by the caller
    from before an edit (deleting points renumbers the ones after them, so an index alone would
    then point at another point and skip the ones between); the search continues after it in that
    order and wraps around. None when no prediction is left.
    """
    scores = features["score"].to_numpy(float)
    if isinstance(after, tuple):
        last = (float(after[0]), int(after[1]))
    else:
        last = None if after is None or after >= len(features) else (scores[after], after)
    return _next_predicted(features, scores, last)


def next_doubtful_link(features: pd.DataFrame, after: tuple[float, int] | None = None) -> int | None:
    """Index of the next ``predicted`` point in order of falling ``link_um``: the spines found
    farthest from where their track was expected first.

    Those are the links most likely wrong: in dense tissue a new spine can take the id of a
    neighbour lost in the same session, which hides both from a turnover count. ``after`` is
    ``(link_um, index)`` of the link reviewed last (kept by the caller: a correction clears the
    point's ``link_um``); the search continues after it and wraps around. None when no predicted
    link is left, or the table has no ``link_um`` (it was not made by the tracker).
    """
    if LINK_COLUMN not in features.columns:
        return None
    return _next_predicted(features, _link_keys(features), None if after is None else (-after[0], after[1]))


def unconfirmed_order(features: pd.DataFrame) -> np.ndarray:
    """Indices of the ``predicted`` points in the order **N** visits them (rising score)."""
    return _predicted_order(features, features["score"].to_numpy(float))


def doubtful_link_order(features: pd.DataFrame) -> np.ndarray:
    """Indices of the ``predicted`` points with a ``link_um`` in the order **J** visits them
    (falling ``link_um``); none when the table has no link distances."""
    if LINK_COLUMN not in features.columns:
        return np.zeros(0, dtype=int)
    return _predicted_order(features, _link_keys(features))


def _link_keys(features: pd.DataFrame) -> np.ndarray:
    return -pd.to_numeric(features[LINK_COLUMN], errors="coerce").to_numpy(float)


def _predicted_order(features: pd.DataFrame, keys: np.ndarray) -> np.ndarray:
    """The ``predicted`` points with a finite key, in rising ``(key, index)`` order."""
    candidates = (features["status"].to_numpy() == "predicted") & np.isfinite(keys)
    order = np.lexsort((np.arange(len(features)), keys))
    return order[candidates[order]]


def _next_predicted(features: pd.DataFrame, keys: np.ndarray, after: tuple[float, int] | None) -> int | None:
    """The first ``predicted`` point with a finite key in rising ``(key, index)`` order that comes
    after ``after`` (wrapping around; from the start when None)."""
    order = _predicted_order(features, keys)
    if len(order) == 0:
        return None
    if after is not None:
        later = [i for i in order if (keys[i], i) > after]
        if later:
            return int(later[0])
    return int(order[0])


# --------------------------------------------------------------------------------------------
# edits


def open_suggestions(data: np.ndarray, suggestions: pd.DataFrame, voxel_size_um: Sequence[float]) -> np.ndarray:
    """Which ``suggestions`` (``t, z, y, x`` voxels, as ``detect_series(return_suggestions=True)``
    gives them) are still open: no spine of ``data`` (N, 4) lies within ``SUGGEST_APART_UM`` of
    them in their session. One accepted, added by hand or pasted there closes it; undoing that
    opens it again."""
    from scipy.spatial import cKDTree

    data = _as_data(data)
    scale = np.asarray(voxel_size_um, dtype=float).reshape(3)
    points = suggestions[["t", "z", "y", "x"]].to_numpy(dtype=float).reshape(-1, 4)
    is_open = np.ones(len(points), dtype=bool)
    spine_sessions, their_sessions = sessions_of(data), np.round(points[:, 0]).astype(int)
    for session in np.unique(their_sessions):
        spines = data[spine_sessions == session, 1:] * scale
        if len(spines):
            mine = their_sessions == session
            distance, _ = cKDTree(spines).query(points[mine, 1:] * scale)
            is_open[mine] = distance >= SUGGEST_APART_UM
    return is_open


def review_order(suggestions: pd.DataFrame) -> pd.DataFrame:
    """``suggestions`` in the order **G** visits them, rows renumbered: first those where the tracker
    expected a spine (``track_id`` > 0: a track passes there without a point), then the rest, each
    highest score first. On the tuning seeds 40-52 % of the first kind were missed spines in
    `low_snr`, `crowded` and the second microscope's series, against 7-14 % of the rest, while the
    highest-scored of all were spines no more often than the others (README, "The review's work")."""
    expected = (suggestions["track_id"].to_numpy() > 0 if "track_id" in suggestions
                else np.zeros(len(suggestions), dtype=bool))
    order = np.lexsort((-suggestions["score"].to_numpy(dtype=float), ~expected))
    return suggestions.iloc[order].reset_index(drop=True)


def _check_indices(features: pd.DataFrame, indices: Iterable[int]) -> list[int]:
    indices = sorted({int(i) for i in indices})
    if not indices:
        raise InputError("no spine selected: select one or more points first.")
    if indices[0] < 0 or indices[-1] >= len(features):
        raise InputError(f"point index out of range (layer has {len(features)} points).")
    return indices


def add_spine(data: np.ndarray, features: pd.DataFrame, point: Sequence[float], *,
              track_id: int | None = None, **extra) -> Points:
    """Add a hand-placed spine at ``point`` (t, z, y, x): status ``added``, score 1.0.

    ``track_id`` continues an existing spine in this session; None gives a new id. ``extra``
    fills extra feature columns (others get NaN).
    """
    data, features = _as_data(data), typed_features(features)
    point = np.array(point, dtype=float).reshape(4)  # a copy: the caller's point stays as given
    session = round(float(point[0]))
    point[0] = session
    if track_id is None:
        track_id = new_track_id(features)
    elif track_id < 1:
        raise InputError(f"track ids start at 1 (got {track_id}).")
    elif track_has_point(data, features, track_id, session):
        raise InputError(f"spine {track_id} already has a point in session {session}; move that "
                         "point instead, or add a new spine.")
    row = {**{c: np.nan for c in features.columns}, **extra, **HAND_DEFAULTS, "track_id": int(track_id)}
    features = pd.concat([features, pd.DataFrame([row])[features.columns]], ignore_index=True)
    return np.vstack([data, point]), typed_features(features)


def accept_suggestion(data: np.ndarray, features: pd.DataFrame, point: Sequence[float],
                      track_id: int = 0) -> Points:
    """Add a suggested spine at ``point`` (t, z, y, x) as :func:`add_spine` does: it continues
    ``track_id``, the track the tracker expected there (``link.suggested_tracks``), where that
    track has no point in the session yet; a new id where it has, or where ``track_id`` is 0."""
    session = round(float(np.asarray(point, dtype=float).reshape(4)[0]))
    free = track_id > 0 and not track_has_point(data, features, track_id, session)
    return add_spine(data, features, point, track_id=track_id if free else None)


def delete_spines(data: np.ndarray, features: pd.DataFrame, indices: Iterable[int]) -> Points:
    """Remove the points at ``indices``."""
    indices = _check_indices(features, indices)
    keep = np.ones(len(features), bool)
    keep[indices] = False
    return _as_data(data)[keep], typed_features(features)[keep].reset_index(drop=True)


def mark_edited(data: np.ndarray, features: pd.DataFrame, indices: Iterable[int]) -> Points:
    """Status ``edited`` for moved predictions (``added`` points stay ``added``)."""
    indices = _check_indices(features, indices)
    features = typed_features(features)
    rows = features.index.isin(indices) & (features["status"] != "added")
    features.loc[rows, "status"] = "edited"
    return _as_data(data).copy(), features


def move_spine(data: np.ndarray, features: pd.DataFrame, index: int, zyx: Sequence[float]) -> Points:
    """Move point ``index`` to ``zyx`` (voxels, same session); it becomes ``edited``."""
    data, features = mark_edited(data, features, [index])
    data[index, 1:] = np.asarray(zyx, dtype=float).reshape(3)
    return data, features


def confirm_spines(data: np.ndarray, features: pd.DataFrame, indices: Iterable[int]) -> Points:
    """Mark predictions at ``indices`` ``confirmed`` (points already added or edited keep that status)."""
    indices = _check_indices(features, indices)
    features = typed_features(features)
    rows = features.index.isin(indices) & (features["status"] == "predicted")
    features.loc[rows, "status"] = "confirmed"
    return _as_data(data).copy(), features


def _vetted(features: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """Predictions at ``rows`` become ``edited``: a human changed their identity, so the tracker's
    link distance no longer describes them."""
    if LINK_COLUMN in features.columns:
        features.loc[rows, LINK_COLUMN] = np.nan
    rows = rows & (features["status"] == "predicted").to_numpy()
    features.loc[rows, "status"] = "edited"
    return features


def assign_track(data: np.ndarray, features: pd.DataFrame, index: int, track_id: int) -> Points:
    """Give point ``index`` the id ``track_id`` (re-link it to another spine).

    If spine ``track_id`` already has a point in this session, the two points swap ids, which is
    the fix for an identity switch between neighbours. Predictions touched become ``edited``.
    """
    (index,) = _check_indices(features, [index])
    if track_id < 1:
        raise InputError(f"track ids start at 1 (got {track_id}).")
    data, features = _as_data(data).copy(), typed_features(features)
    ids = features["track_id"].to_numpy().copy()
    old_id = int(ids[index])
    if old_id == track_id:
        return data, features
    sessions = sessions_of(data)
    other = np.flatnonzero((ids == track_id) & (sessions == sessions[index]))
    ids[other] = old_id
    ids[index] = track_id
    features["track_id"] = ids
    touched = np.zeros(len(ids), bool)
    touched[[index, *other]] = True
    return data, _vetted(features, touched)


def merge_tracks(data: np.ndarray, features: pd.DataFrame, keep_id: int, other_id: int) -> Points:
    """Join spine ``other_id`` into ``keep_id`` (one spine that the tracker cut in two).

    Raises :class:`InputError` when both have a point in the same session.
    """
    data, features = _as_data(data).copy(), typed_features(features)
    ids = features["track_id"].to_numpy().copy()
    if keep_id == other_id:
        raise InputError(f"select points of two different spines to merge (both are {keep_id}).")
    for tid in (keep_id, other_id):
        if not (ids == tid).any():
            raise InputError(f"no spine with id {tid} in this layer.")
    sessions = sessions_of(data)
    both = set(sessions[ids == keep_id]) & set(sessions[ids == other_id])
    if both:
        raise InputError(f"spines {keep_id} and {other_id} both have a point in session(s) "
                         f"{sorted(int(s) for s in both)}; delete or re-assign one of them first.")
    moved = ids == other_id
    ids[moved] = keep_id
    features["track_id"] = ids
    return data, _vetted(features, moved)


def split_track(data: np.ndarray, features: pd.DataFrame, track_id: int, session: int) -> Points:
    """Cut spine ``track_id`` before ``session``: its points from ``session`` on get a new id."""
    data, features = _as_data(data).copy(), typed_features(features)
    ids = features["track_id"].to_numpy().copy()
    sessions = sessions_of(data)
    track = ids == track_id
    later = track & (sessions >= session)
    if not later.any() or not (track & (sessions < session)).any():
        raise InputError(f"spine {track_id} has no points both before and from session {session}; "
                         "go to the first session of the new part and split there.")
    ids[later] = new_track_id(features)
    features["track_id"] = ids
    return data, _vetted(features, later)


def paste_spines(data: np.ndarray, features: pd.DataFrame, copied_data: np.ndarray,
                 copied_features: pd.DataFrame, session: int) -> Points:
    """Paste copied spines into ``session`` (same z, y, x), keeping their ids where free.

    Copying a session's spines into the next one keeps each spine's identity; a spine that already
    has a point there gets a new id. Pasted points are ``added``.
    """
    copied = typed_features(copied_features)
    for point, (_, row) in zip(_as_data(copied_data), copied.iterrows(), strict=True):
        tid = int(row["track_id"])
        free = tid >= 1 and not track_has_point(data, features, tid, session)
        # the tracker's link distance belongs to the copied point's link, not to the pasted one
        extra = {k: row[k] for k in _extra(features) if k in row and k != LINK_COLUMN}
        data, features = add_spine(data, features, [session, *point[1:]],
                                   track_id=tid if free else None, **extra)
    return data, features


# --------------------------------------------------------------------------------------------
# re-running detection


def merge_predictions(data: np.ndarray, features: pd.DataFrame, predictions: pd.DataFrame, *,
                      voxel_size_um: Sequence[float], tol_um: float = 1.0,
                      reviewed_sessions: Iterable[int] = ()) -> Points:
    """New predictions merged with the human-vetted points, which keep their place and id.

    - confirmed, added and edited points are kept as they are;
    - every point of a ``reviewed_sessions`` session is kept, and no new prediction enters it;
    - old ``predicted`` points elsewhere are replaced by the new predictions;
    - a new prediction within ``tol_um`` (µm, per-session Hungarian matching) of a kept point is
      dropped, and its track takes that point's id, so a spine keeps its id across sessions;
    - other new tracks get ids above every kept id.

    ``voxel_size_um`` is (z, y, x). Returns ``(data, features)`` with the kept points first.
    """
    data, features = _as_data(data), typed_features(features)
    new_data, new_features = points_from_table(predictions)
    reviewed = np.array(sorted({int(s) for s in reviewed_sessions}), dtype=int)
    keep = human_vetted(features) | np.isin(sessions_of(data), reviewed)
    kept_data, kept_features = data[keep], features[keep].reset_index(drop=True)
    new_sessions = sessions_of(new_data)
    fresh = ~np.isin(new_sessions, reviewed)
    new_data, new_features = new_data[fresh], new_features[fresh].reset_index(drop=True)
    new_sessions = new_sessions[fresh]

    scale = np.asarray(voxel_size_um, dtype=float).reshape(3)
    kept_sessions = sessions_of(kept_data)
    kept_ids = kept_features["track_id"].to_numpy()
    drop = np.zeros(len(new_data), bool)
    votes: dict[int, Counter] = {}
    for session in np.intersect1d(kept_sessions, new_sessions):
        k = np.flatnonzero(kept_sessions == session)
        n = np.flatnonzero(new_sessions == session)
        dist = np.linalg.norm((kept_data[k, None, 1:] - new_data[None, n, 1:]) * scale, axis=-1)
        rows, cols = linear_sum_assignment(dist)
        close = dist[rows, cols] <= tol_um
        for r, c in zip(rows[close], cols[close], strict=True):
            drop[n[c]] = True
            votes.setdefault(int(new_features["track_id"].iloc[n[c]]), Counter())[int(kept_ids[k[r]])] += 1

    new_data, new_features = new_data[~drop], new_features[~drop].reset_index(drop=True)
    new_sessions = new_sessions[~drop]
    taken = set(zip(kept_ids.tolist(), kept_sessions.tolist(), strict=True))
    next_id = (int(kept_ids.max()) if len(kept_ids) else 0) + 1
    assigned = np.zeros(len(new_features), dtype="int64")
    for pred_id in sorted(set(new_features["track_id"].tolist())):
        rows = np.flatnonzero(new_features["track_id"].to_numpy() == pred_id)
        target = votes[pred_id].most_common(1)[0][0] if pred_id in votes else None
        spill = None
        for r in rows:
            if target is None:
                target, next_id = next_id, next_id + 1
            tid = target
            if (tid, int(new_sessions[r])) in taken:
                if spill is None:
                    spill, next_id = next_id, next_id + 1
                tid = spill
            assigned[r] = tid
            taken.add((tid, int(new_sessions[r])))
    new_features["track_id"] = assigned
    merged_data = np.vstack([kept_data, new_data]) if len(new_data) else kept_data.copy()
    merged_features = pd.concat([kept_features, new_features], ignore_index=True)
    return merged_data.reshape(-1, 4), typed_features(merged_features)


# --------------------------------------------------------------------------------------------
# undo / redo


@dataclass(frozen=True)
class SpineState:
    """One snapshot of the spines layer: points, features and the sessions marked reviewed."""

    data: np.ndarray
    features: pd.DataFrame
    reviewed_sessions: frozenset[int] = frozenset()

    def table(self) -> pd.DataFrame:
        """The snapshot as a spine table."""
        return table_from_points(self.data, self.features)


@dataclass
class EditHistory:
    """Undo/redo over :class:`SpineState` snapshots (at most ``limit`` undo steps).

    ``push(state, merge_key=k)`` replaces the newest snapshot instead of adding one when the
    previous push had the same key, so that a drag of many small moves is one undo step.
    """

    limit: int = 200
    _states: list[SpineState] = field(default_factory=list)
    _keys: list[object] = field(default_factory=list)
    _pos: int = -1

    @property
    def current(self) -> SpineState | None:
        return self._states[self._pos] if self._states else None

    def reset(self, state: SpineState) -> None:
        """Forget the history; ``state`` is the new starting point."""
        self._states, self._keys, self._pos = [state], [None], 0

    def push(self, state: SpineState, merge_key: object = None) -> None:
        del self._states[self._pos + 1:], self._keys[self._pos + 1:]
        if merge_key is not None and self._pos > 0 and self._keys[self._pos] == merge_key:
            self._states[self._pos] = state
            return
        self._states.append(state)
        self._keys.append(merge_key)
        if len(self._states) > self.limit + 1:
            del self._states[0], self._keys[0]
        self._pos = len(self._states) - 1

    @property
    def can_undo(self) -> bool:
        return self._pos > 0

    @property
    def can_redo(self) -> bool:
        return self._pos < len(self._states) - 1

    def undo(self) -> SpineState | None:
        """Step back; returns the state to show, or None when there is nothing to undo."""
        if not self.can_undo:
            return None
        self._pos -= 1
        self._keys[self._pos] = None  # an edit after an undo never merges into the older step
        return self._states[self._pos]

    def redo(self) -> SpineState | None:
        if not self.can_redo:
            return None
        self._pos += 1
        self._keys[self._pos] = None
        return self._states[self._pos]
