"""Link per-session spine detections into tracks with persistent ids.

Sessions are processed in order. In session ``t`` each detection is first offered to the tracks
seen in session ``t-1`` (frame-to-frame), then what is left to the tracks that were last seen in
sessions ``t-2 .. t-1-max_gap`` (gap closing), so a spine missed in one or two sessions keeps its
id. Each step is one optimal assignment (Hungarian) maximising the sum of ``gate - cost`` over the
links made: a link costs its distance in µm, and a pair farther apart than the gate is never linked.

Where a detection came from (its expected position in an earlier session ``s``):

- frame-to-frame, with the network's displacement ``d = (dz, dy, dx)`` known:  ``p + d``;
- otherwise (or for a gap), by registration: ``p - (drift[t] - drift[s])``.

All positions are in voxels of each session's own grid; ``drift`` follows
:func:`napari_spine_tracker.core.register.estimate_drift` (a point at ``p`` in session 0 is at
``p + drift[t]`` in session ``t``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..errors import Cancelled, InputError
from ..io.tables import REQUIRED_COLUMNS, validate_spine_table
from .metrics import parse_voxel_size, sparse_assignment

log = logging.getLogger(__name__)

__all__ = ["link_detections"]

DISPLACEMENT_COLUMNS = ("dz", "dy", "dx")


def _assign(sources_um: np.ndarray, targets_um: np.ndarray,
            gates_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Links (source rows, target rows) maximising sum(gate - distance); ``gates_um`` per target."""
    if len(sources_um) == 0 or len(targets_um) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    max_gate = float(np.max(gates_um))
    dist = cKDTree(sources_um).sparse_distance_matrix(cKDTree(targets_um), max_gate,
                                                      output_type="coo_matrix")
    rows, cols, d = dist.row.astype(int), dist.col.astype(int), dist.data
    keep = d <= gates_um[cols]
    rows, cols, d = rows[keep], cols[keep], d[keep]
    # a tiny positive floor keeps a link exactly at the gate allowed (weights must be > 0)
    weights = gates_um[cols] - d + 1e-9
    return sparse_assignment(rows, cols, weights, len(sources_um), len(targets_um), maximize=True)


def _local_correction(sources_um: np.ndarray, targets_um: np.ndarray, src: np.ndarray, dst: np.ndarray,
                      which: np.ndarray, scale_um: float) -> np.ndarray:
    """(n_which, 3) µm: for each source row selected by ``which``, the Gaussian-weighted mean of
    the residuals (target - source) of the links ``src -> dst`` within 3 sigma of it; a prior
    weight of one link at zero residual keeps isolated points where registration put them."""
    residual = targets_um[dst] - sources_um[src]
    near = cKDTree(sources_um[which]).sparse_distance_matrix(cKDTree(sources_um[src]), 3 * scale_um,
                                                             output_type="coo_matrix")
    weights = np.exp(-near.data**2 / (2 * scale_um**2))
    n = int(which.sum())
    total = np.zeros((n, 3))
    np.add.at(total, near.row, weights[:, None] * residual[near.col])
    weight_sum = np.bincount(near.row, weights=weights, minlength=n)
    return total / (weight_sum[:, None] + 1.0)


def _check_drift(drift_vox, n_sessions: int) -> np.ndarray:
    if drift_vox is None:
        return np.zeros((n_sessions, 3))
    drift = np.asarray(drift_vox, dtype=float)
    if drift.ndim != 2 or drift.shape[1] != 3 or drift.shape[0] < n_sessions or not np.isfinite(drift).all():
        raise InputError(f"drift_vox must be a finite (T, 3) array (z, y, x voxels) covering sessions "
                         f"0..{n_sessions - 1}; got shape {drift.shape}.")
    return drift


def link_detections(detections: pd.DataFrame, voxel_size_um: Sequence[float] | float, *,
                    drift_vox: np.ndarray | None = None, gate_um: float = 1.5, max_gap: int = 2,
                    gap_gate_growth_um: float = 0.25, local_scale_um: float | None = 4.0,
                    progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """Give every detection a ``track_id`` so that the same spine keeps its id across sessions.

    Parameters
    ----------
    detections
        One row per detected spine: ``t`` (session), ``z, y, x`` (voxels of that session's grid),
        ``score``; optionally ``dz, dy, dx``, the predicted displacement in voxels from this point
        to the same spine in session ``t-1`` (NaN where unknown). Other columns are kept.
    voxel_size_um
        ``(z, y, x)`` in µm; costs and gates are distances in µm.
    drift_vox
        ``(T, 3)`` drift in voxels from :func:`~napari_spine_tracker.core.register.estimate_drift`,
        or None (no drift).
    gate_um
        Largest distance in µm for a frame-to-frame link.
    max_gap
        Largest number of consecutive sessions a spine may be missing and keep its id.
    gap_gate_growth_um
        The gate grows by this much per missed session when closing a gap.
    local_scale_um
        Non-rigid correction for detections linked by registration (no displacement): after a
        first assignment, each such detection's expected position is moved by the Gaussian-weighted
        (sigma ``local_scale_um``) mean offset of the links around it, and the assignment is
        redone. Tissue deforms smoothly, so neighbours share their residual motion. None: off.

    Returns
    -------
    pd.DataFrame
        A spine table (``track_id, t, z, y, x, score, status`` then the extra input columns),
        ``track_id`` numbered from 1 in order of first appearance, sorted by ``t, track_id``.
        ``status`` is ``predicted`` unless the input carries one.
    """
    scale = parse_voxel_size(voxel_size_um)
    if not (np.isfinite(gate_um) and gate_um > 0):
        raise InputError(f"gate_um must be a positive distance in µm, got {gate_um!r}.")
    if max_gap < 0 or int(max_gap) != max_gap:
        raise InputError(f"max_gap must be a whole number of sessions >= 0, got {max_gap!r}.")
    missing = [c for c in ("t", "z", "y", "x") if c not in detections.columns]
    if missing:
        raise InputError(f"detections lack the column(s) {', '.join(missing)}; they need t, z, y, x "
                         "(voxels) and score.")
    table = detections.drop(columns=["track_id"], errors="ignore").reset_index(drop=True).copy()
    if "score" not in table.columns:
        table["score"] = 1.0
    if "status" not in table.columns:
        table["status"] = "predicted"
    if len(table) == 0:
        table["track_id"] = pd.Series(dtype="int64")
        return validate_spine_table(table[list(REQUIRED_COLUMNS) + _extra(table)])

    t_all = pd.to_numeric(table["t"], errors="coerce").to_numpy()
    if np.isnan(t_all).any() or (t_all < 0).any() or (t_all != np.round(t_all)).any():
        raise InputError("detections: column 't' must hold whole session indices >= 0.")
    t_all = t_all.astype(int)
    n_sessions = int(t_all.max()) + 1
    drift = _check_drift(drift_vox, n_sessions)
    pos = table[["z", "y", "x"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(pos).all():
        raise InputError("detections: z, y, x must be finite numbers (voxels); "
                         f"row {int(np.argmax(~np.isfinite(pos).all(axis=1)))} is not.")
    if "dz" in table.columns or "dy" in table.columns or "dx" in table.columns:
        disp = np.column_stack([pd.to_numeric(table[c], errors="coerce").to_numpy(float)
                                if c in table.columns else np.full(len(table), np.nan)
                                for c in DISPLACEMENT_COLUMNS])
    else:
        disp = np.full((len(table), 3), np.nan)
    has_disp = np.isfinite(disp).all(axis=1)

    track_of_row = np.zeros(len(table), dtype=int)
    # active tracks: provisional key -> row index of its last detection
    last_row: dict[int, int] = {}
    next_key = 1
    for t in range(n_sessions):
        if should_stop is not None and should_stop():
            raise Cancelled("linking stopped")
        rows = np.flatnonzero(t_all == t)
        # tracks that can no longer be continued
        for key in [k for k, r in last_row.items() if t_all[r] < t - 1 - max_gap]:
            del last_row[key]
        linked = np.zeros(len(rows), dtype=bool)

        # 1. frame-to-frame, to tracks seen in session t-1
        keys = [k for k, r in last_row.items() if t_all[r] == t - 1]
        if keys and len(rows):
            back = np.where(has_disp[rows, None], pos[rows] + disp[rows],
                            pos[rows] - (drift[t] - drift[t - 1]))
            targets = pos[[last_row[k] for k in keys]]
            gates = np.full(len(keys), float(gate_um))
            src, dst = _assign(back * scale, targets * scale, gates)
            by_registration = ~has_disp[rows]
            if local_scale_um and by_registration.any() and len(src) >= 3:
                back[by_registration] += _local_correction(
                    back * scale, targets * scale, src, dst, by_registration, local_scale_um) / scale
                src, dst = _assign(back * scale, targets * scale, gates)
            for i, j in zip(src, dst, strict=True):
                track_of_row[rows[i]] = keys[j]
                last_row[keys[j]] = rows[i]
            linked[src] = True

        # 2. gap closing, to tracks last seen in t-2 .. t-1-max_gap, by registration
        keys = [k for k, r in last_row.items() if t - 1 - max_gap <= t_all[r] <= t - 2]
        free = np.flatnonzero(~linked)
        if keys and len(free):
            last_t = np.array([t_all[last_row[k]] for k in keys])
            # where each candidate track's last position would be in session t
            ahead = pos[[last_row[k] for k in keys]] + (drift[t] - drift[last_t])
            gates = gate_um + gap_gate_growth_um * (t - 1 - last_t)
            src, dst = _assign(pos[rows[free]] * scale, ahead * scale, gates.astype(float))
            for i, j in zip(src, dst, strict=True):
                track_of_row[rows[free[i]]] = keys[j]
                last_row[keys[j]] = rows[free[i]]
            linked[free[src]] = True

        # 3. the rest start new tracks
        for i in np.flatnonzero(~linked):
            track_of_row[rows[i]] = next_key
            last_row[next_key] = rows[i]
            next_key += 1
        if progress is not None:
            progress(t + 1, n_sessions)

    table["track_id"] = _renumber(track_of_row, t_all)
    log.debug("linked %d detections in %d sessions into %d tracks", len(table), n_sessions,
              table["track_id"].nunique())
    table = table.sort_values(["t", "track_id"], kind="stable")
    return validate_spine_table(table[list(REQUIRED_COLUMNS) + _extra(table)], source="linked detections")


def _extra(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in REQUIRED_COLUMNS]


def _renumber(keys: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Ids 1, 2, ... in order of first appearance (session, then row)."""
    order = np.lexsort((np.arange(len(keys)), t))
    _, first = np.unique(keys[order], return_index=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1)
    uniq = np.unique(keys)
    return rank[np.searchsorted(uniq, keys)]
