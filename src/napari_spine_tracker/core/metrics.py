"""Scores of predicted spine tracks against ground truth: detection F1, IDF1, association accuracy.

Every distance is in µm: z, y, x voxel coordinates are multiplied by the voxel size first, and a
prediction and a true spine *match* when they lie within ``tol_um`` of each other in the same session.

- **Detection** (precision, recall, F1): in each session, an optimal one-to-one matching
  (:func:`sparse_assignment`) with the largest number of pairs within
  the tolerance, ties broken by the smallest total distance; counts are summed over sessions
  (micro average).
- **Identity** (IDP, IDR, IDF1; Ristani et al. 2016, "Performance measures and a data set for
  multi-target, multi-camera tracking"): one global one-to-one matching of predicted track ids to
  true track ids that maximises the identity true positives IDTP, where a (predicted id, true id)
  pair scores one for each session in which both exist and lie within the tolerance.
  IDFP = n_pred - IDTP, IDFN = n_true - IDTP, IDF1 = 2 IDTP / (2 IDTP + IDFP + IDFN).
- **Association accuracy**: a *true link* joins two consecutive appearances of the same true
  spine, t_a -> t_b with no appearance in between. A session in which the spine is absent from the
  truth table (a transient miss, a gap) does not break the link: the spine keeps its identity across
  the gap, and keeping it is exactly what gap closing is for. A link is *evaluable* when both of its
  ends were matched by the per-session detection matching, and *correct* when the two matched
  predictions share a track id. ``association_accuracy`` = correct / evaluable, so that it measures
  linking alone (detection misses are F1's business); ``link_recall`` = correct / all true links
  mixes both.

Any ratio whose denominator is zero (no predictions, no truth, no evaluable link) is reported as 0.0,
so that the result is always plain JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from scipy.spatial import cKDTree

from ..errors import InputError
from ..io.tables import validate_spine_table

__all__ = ["evaluate_tracks", "match_points", "parse_voxel_size", "sparse_assignment"]


def parse_voxel_size(voxel_size_um: Sequence[float] | float, *, name: str = "voxel_size_um") -> np.ndarray:
    """``(z, y, x)`` voxel size in µm as a float array of 3 positive numbers (a scalar means isotropic)."""
    try:
        size = np.asarray(voxel_size_um, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be three numbers z, y, x in µm, got {voxel_size_um!r}.") from exc
    if size.ndim == 0:
        size = np.repeat(size, 3)
    if size.shape != (3,) or not np.all(np.isfinite(size)) or np.any(size <= 0):
        raise InputError(f"{name} must be three positive numbers z, y, x in µm, got {voxel_size_um!r}.")
    return size


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else 0.0


def sparse_assignment(rows: np.ndarray, cols: np.ndarray, weights: np.ndarray,
                      n_rows: int, n_cols: int, *, maximize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching restricted to the given edges.

    ``rows[k], cols[k], weights[k]`` is one allowed pair (each pair listed once); pairs not listed
    are never matched, and any item may stay unmatched.
    ``maximize=True``: maximise the total weight (all weights must be > 0).
    ``maximize=False``: maximise the number of pairs first, then minimise the total weight.
    Returns the matched ``(rows, cols)``.

    Solved as one sparse full matching (LAPJVsp, :func:`scipy.sparse.csgraph.
    min_weight_full_bipartite_matching`) of a graph in which every item may pair with a stand-in
    instead: row ``i`` with the stand-in of row ``i``, column ``j`` with the stand-in of column
    ``j``, and the two stand-ins with each other wherever ``(i, j)`` is an edge, so that a full
    matching exists for any set of real pairs. Every stand-in edge gains 1 and a real edge 1 + its
    gain, and a full matching always holds ``n_rows + n_cols`` edges, so the stand-ins add the same
    to every matching and the best one holds the best real pairs. A sparse problem costs about as
    much as its largest cluster, without a loop over clusters in Python.
    """
    rows, cols = np.asarray(rows, dtype=int), np.asarray(cols, dtype=int)
    if len(rows) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    weights = np.asarray(weights, dtype=float)
    if maximize:
        gain = weights
    else:  # one more pair gains more than any set of pairs can lose in weight
        gain = (float(weights.max()) + 1.0) * (min(n_rows, n_cols) + 1) - weights
    # left: the rows, then a stand-in for each column; right: the columns, then a stand-in per row
    left = np.concatenate([rows, np.arange(n_rows), n_rows + np.arange(n_cols), n_rows + cols])
    right = np.concatenate([cols, n_cols + np.arange(n_rows), np.arange(n_cols), n_cols + rows])
    value = np.concatenate([gain + 1.0, np.ones(n_rows + n_cols + len(rows))])
    size = n_rows + n_cols
    graph = csr_matrix((value, (left, right)), shape=(size, size))
    matched_left, matched_right = min_weight_full_bipartite_matching(graph, maximize=True)
    real = (matched_left < n_rows) & (matched_right < n_cols)
    return matched_left[real], matched_right[real]


def _pairs_within(a_um: np.ndarray, b_um: np.ndarray,
                  tol_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j) with |a_i - b_j| <= tol_um; returns (i, j, distance_um)."""
    if len(a_um) == 0 or len(b_um) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty, np.zeros(0)
    dist = cKDTree(a_um).sparse_distance_matrix(cKDTree(b_um), tol_um, output_type="coo_matrix")
    return dist.row.astype(int), dist.col.astype(int), dist.data.astype(float)


def match_points(pred_um: np.ndarray, truth_um: np.ndarray, tol_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching of two point sets (N, 3) and (M, 3) in µm within ``tol_um``.

    Maximises the number of pairs, then minimises their total distance. Returns index arrays
    ``(pred_rows, truth_rows)`` of the matched pairs.
    """
    pred_um = np.asarray(pred_um, float).reshape(-1, 3)
    truth_um = np.asarray(truth_um, float).reshape(-1, 3)
    i, j, d = _pairs_within(pred_um, truth_um, tol_um)
    return sparse_assignment(i, j, d, len(pred_um), len(truth_um), maximize=False)


def _prepare(table: pd.DataFrame, source: str) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{source} must be a pandas DataFrame (a spine table), got {type(table).__name__}.")
    if len(table) == 0:
        missing = [c for c in ("t", "z", "y", "x") if c not in table.columns]
        if missing:
            raise InputError(f"{source} lacks the column(s) {', '.join(missing)}.")
        return pd.DataFrame({"track_id": pd.Series(dtype="int64"), "t": pd.Series(dtype="int64"),
                             "z": pd.Series(dtype=float), "y": pd.Series(dtype=float),
                             "x": pd.Series(dtype=float)})
    return validate_spine_table(table, source=source)[["track_id", "t", "z", "y", "x"]].reset_index(drop=True)


def evaluate_tracks(pred: pd.DataFrame, truth: pd.DataFrame, voxel_size_um: Sequence[float] | float,
                    tol_um: float = 1.0) -> dict:
    """Score predicted spine tracks against true ones (see the module docstring for definitions).

    Parameters
    ----------
    pred, truth
        Spine tables (columns ``track_id, t, z, y, x``; z, y, x in voxels of each session's grid).
    voxel_size_um
        ``(z, y, x)`` voxel size in µm, used to measure distances in µm.
    tol_um
        Largest distance in µm at which a prediction matches a true spine.

    Returns
    -------
    dict
        Plain JSON: ``precision, recall, f1, tp, fp, fn, n_pred, n_true, idf1, idp, idr, idtp, idfp,
        idfn, association_accuracy, link_recall, n_true_links, n_links_evaluable, n_links_correct,
        n_pred_tracks, n_true_tracks, tol_um, sessions`` (a list of per-session
        ``{t, n_pred, n_true, tp, fp, fn}``).
    """
    scale = parse_voxel_size(voxel_size_um)
    if not np.isfinite(tol_um) or tol_um <= 0:
        raise InputError(f"tol_um must be a positive distance in µm, got {tol_um!r}.")
    pred = _prepare(pred, "predicted spine table")
    truth = _prepare(truth, "true spine table")
    pred_um = pred[["z", "y", "x"]].to_numpy(float) * scale
    truth_um = truth[["z", "y", "x"]].to_numpy(float) * scale
    pred_t, truth_t = pred["t"].to_numpy(), truth["t"].to_numpy()

    # global row index of the prediction matched to each true row (-1: missed)
    truth_match = np.full(len(truth), -1, dtype=int)
    id_rows: list[np.ndarray] = []
    id_cols: list[np.ndarray] = []
    sessions = []
    for t in np.union1d(np.unique(pred_t), np.unique(truth_t)):
        p_rows = np.flatnonzero(pred_t == t)
        g_rows = np.flatnonzero(truth_t == t)
        i, j, d = _pairs_within(pred_um[p_rows], truth_um[g_rows], tol_um)
        mi, mj = sparse_assignment(i, j, d, len(p_rows), len(g_rows), maximize=False)
        truth_match[g_rows[mj]] = p_rows[mi]
        id_rows.append(p_rows[i])
        id_cols.append(g_rows[j])
        tp = len(mi)
        sessions.append({"t": int(t), "n_pred": len(p_rows), "n_true": len(g_rows), "tp": tp,
                         "fp": len(p_rows) - tp, "fn": len(g_rows) - tp})
    tp = sum(s["tp"] for s in sessions)
    n_pred, n_true = len(pred), len(truth)
    precision, recall = _ratio(tp, n_pred), _ratio(tp, n_true)

    idtp = _identity_true_positives(pred, truth, id_rows, id_cols)
    idp, idr = _ratio(idtp, n_pred), _ratio(idtp, n_true)

    links = _true_links(truth)
    matched_a, matched_b = truth_match[links[:, 0]], truth_match[links[:, 1]]
    evaluable = (matched_a >= 0) & (matched_b >= 0)
    pred_ids = pred["track_id"].to_numpy()
    correct = evaluable.copy()
    correct[evaluable] = pred_ids[matched_a[evaluable]] == pred_ids[matched_b[evaluable]]
    n_eval, n_correct = int(evaluable.sum()), int(correct.sum())

    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, n_pred + n_true),
        "tp": int(tp),
        "fp": int(n_pred - tp),
        "fn": int(n_true - tp),
        "n_pred": int(n_pred),
        "n_true": int(n_true),
        "idf1": _ratio(2 * idtp, n_pred + n_true),
        "idp": idp,
        "idr": idr,
        "idtp": int(idtp),
        "idfp": int(n_pred - idtp),
        "idfn": int(n_true - idtp),
        "association_accuracy": _ratio(n_correct, n_eval),
        "link_recall": _ratio(n_correct, len(links)),
        "n_true_links": len(links),
        "n_links_evaluable": n_eval,
        "n_links_correct": n_correct,
        "n_pred_tracks": int(pred["track_id"].nunique()),
        "n_true_tracks": int(truth["track_id"].nunique()),
        "tol_um": float(tol_um),
        "sessions": sessions,
    }


def _identity_true_positives(pred: pd.DataFrame, truth: pd.DataFrame,
                             id_rows: list[np.ndarray], id_cols: list[np.ndarray]) -> int:
    """IDTP: the largest total, over one-to-one matchings of predicted to true track ids, of the
    number of sessions in which the two tracks lie within the tolerance (rows paired in ``id_rows``,
    ``id_cols``)."""
    rows = np.concatenate(id_rows) if id_rows else np.zeros(0, dtype=int)
    cols = np.concatenate(id_cols) if id_cols else np.zeros(0, dtype=int)
    if len(rows) == 0:
        return 0
    p_codes, p_ids = pd.factorize(pred["track_id"])
    g_codes, g_ids = pd.factorize(truth["track_id"])
    pair = pd.DataFrame({"p": p_codes[rows], "g": g_codes[cols]})
    # each track has one point per session, so each (pred id, true id) pair counts each session once
    counts = pair.value_counts().reset_index(name="n")
    r, c = sparse_assignment(counts["p"].to_numpy(), counts["g"].to_numpy(), counts["n"].to_numpy(float),
                                len(p_ids), len(g_ids), maximize=True)
    n_sessions = counts.set_index(["p", "g"])["n"]
    return int(n_sessions.loc[list(zip(r, c, strict=True))].sum()) if len(r) else 0


def _true_links(truth: pd.DataFrame) -> np.ndarray:
    """(L, 2) row indices of consecutive appearances of each true spine (gaps do not break a link)."""
    if len(truth) == 0:
        return np.zeros((0, 2), dtype=int)
    order = truth.sort_values(["track_id", "t"], kind="stable").index.to_numpy()
    ids = truth["track_id"].to_numpy()[order]
    same = ids[1:] == ids[:-1]
    return np.stack([order[:-1][same], order[1:][same]], axis=1)
