"""The work of turning a detection into the truth with the review, against labelling by hand.

A reviewer who knows the truth (an oracle) corrects a predicted spine table with the edit functions
the widget calls (:mod:`core.edits`), in the widget's order of work, and each step is counted as the
keys, clicks and decisions the widget needs for it:

1. **Check** every prediction: **N** jumps to it and selects it (a key and a decision); a false one
   is deleted (**Delete**, a key).
2. **Suggestions**: **G** visits the open suggestions in its order (``edits.review_order``; a key
   and a decision each); a missed spine among them is accepted with **Y** (a key), keeping the id of the track
   the tracker expected there. The reviewer visits them all, or stops after a number of them in a
   row were not spines (``suggestion_patience``).
3. **Add** the misses left: where the spine's track has a point in another session and none in
   this one, with link mode (a click to select that point, **L**, a click to place: the id goes on);
   otherwise a new spine (**P**, a click). A decision each (finding it).
4. **Identity**: every track that holds two true spines is split where the spine changes (**J** to
   find it, a click to select, **X**), and the parts of one true spine are merged (two clicks to
   select, **M**). A decision each.
5. **R** marks each session reviewed.

The result is checked, not assumed: :func:`review_effort` returns the corrected table, which
scores F1 and IDF1 1.0 against the truth (tested). Labelling the same series by hand takes a
click and a decision per spine per session, and a click and two keys (select mode, add mode) to
carry a spine's id on to each later session with link mode.

Seconds come from the keystroke-level model (Card, Moran and Newell 1980, "The keystroke-level
model for user performance time with interactive systems"): a key 0.28 s, pointing and clicking
1.3 s (1.1 + 0.2), a mental act 1.35 s per decision. It leaves out scrolling through z and time
and is a model, not a study of users: the counts are what it rests on.

:func:`quick_review` is the pass of a reviewer who trusts the table where it looks right: **N**
in its order (least certain first) until ``patience`` predictions in a row were right, **G** until
``suggestion_patience`` suggestions in a row were not spines, **J** (the links farthest from where
their track was expected first) until ``patience`` links in a row were right, and nothing placed
by hand. Its table is not the truth: score it (``benchmarks/review_effort.py`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from . import edits
from .metrics import match_points, parse_voxel_size

#: seconds per keystroke, pointing-and-click and decision (keystroke-level model, average user)
KEY_S, CLICK_S, DECISION_S = 0.28, 1.3, 1.35


@dataclass
class ReviewEffort:
    """What one series' review took; see the module docstring for what each step costs."""

    checked: int = 0           # predictions visited with N
    deleted: int = 0           # of them false, deleted
    suggestions_visited: int = 0
    accepted: int = 0          # misses accepted from suggestions (Y)
    added_new: int = 0         # misses placed by hand as a new spine
    added_linked: int = 0      # misses placed by hand with link mode, continuing a track
    splits: int = 0
    merges: int = 0
    links_checked: int = 0     # links visited with J and found right (quick_review; a wrong one is a split)
    sessions: int = 0
    true_points: int = 0       # spine-sessions of the truth
    true_links: int = 0        # a true spine's consecutive appearances (what link mode carries on)
    table: pd.DataFrame = field(default=None, repr=False)  # the corrected table

    @property
    def review(self) -> tuple[int, int, int]:
        """(keys, clicks, decisions) of the review."""
        keys = (self.checked + self.deleted + self.suggestions_visited + self.accepted + self.added_new
                + self.added_linked + 2 * self.splits + self.merges + self.links_checked + self.sessions)
        clicks = self.added_new + 2 * self.added_linked + self.splits + 2 * self.merges
        decisions = (self.checked + self.suggestions_visited + self.added_new + self.added_linked
                     + self.splits + self.merges + self.links_checked)
        return keys, clicks, decisions

    @property
    def by_hand(self) -> tuple[int, int, int]:
        """(keys, clicks, decisions) of labelling the series by hand."""
        return 2 * self.true_links, self.true_points + self.true_links, self.true_points

    @property
    def corrections(self) -> int:
        """Edits that change the table (deletions, additions, splits, merges)."""
        return (self.deleted + self.accepted + self.added_new + self.added_linked + self.splits
                + self.merges)

    @staticmethod
    def seconds(counts: tuple[int, int, int]) -> float:
        keys, clicks, decisions = counts
        return keys * KEY_S + clicks * CLICK_S + decisions * DECISION_S


def review_effort(predicted: pd.DataFrame, truth: pd.DataFrame, voxel_size_um: Sequence[float],
                  suggestions: pd.DataFrame | None = None, tol_um: float = 1.0,
                  suggestion_patience: int | None = None) -> ReviewEffort:
    """Correct ``predicted`` into ``truth`` as an oracle reviewer would, counting the work.

    ``predicted`` and ``truth`` are spine tables (``track_id, t, z, y, x``, voxels of each session);
    ``suggestions`` are the detection's suggestions of missed spines (``t, z, y, x`` and the
    expected ``track_id``, as ``detect_series(return_suggestions=True)`` returns them). A
    prediction is right where it lies within ``tol_um`` of a true spine of its session (the
    metrics' matching); right ones are kept where they are. The suggestions are visited as **G**
    visits them (``edits.review_order``), all of them, or until ``suggestion_patience`` in a row
    were not spines; the misses left are placed by hand.
    """
    scale, truth, data, features, effort = _start(predicted, truth, voxel_size_um)
    effort.checked = len(data)
    false = _true_ids(data, truth, scale, tol_um) == 0
    if false.any():
        data, features = edits.delete_spines(data, features, np.flatnonzero(false))
    effort.deleted = int(false.sum())
    data, features = _visit_suggestions(data, features, truth, scale, tol_um, suggestions, suggestion_patience, effort)
    data, features = _add_misses(data, features, truth, scale, tol_um, effort)
    data, features = _fix_identities(data, features, truth, scale, tol_um, effort)
    effort.table = edits.table_from_points(data, features)
    return effort


def quick_review(predicted: pd.DataFrame, truth: pd.DataFrame, voxel_size_um: Sequence[float],
                 suggestions: pd.DataFrame | None = None, tol_um: float = 1.0, patience: int = 10,
                 suggestion_patience: int | None = 5) -> ReviewEffort:
    """A pass over ``predicted`` that stops where the table looks right, counting the work (the
    module docstring says how): **N** in rising score, deleting the false predictions, until
    ``patience`` in a row were right; **G** as in :func:`review_effort`; **J** in falling
    ``link_um`` until ``patience`` links in a row were right, cutting a track where the link is
    wrong (**X**) and joining the cut-off part to the track of its own spine where they fit
    together (**M**); nothing placed by hand. The returned table (``.table``) keeps the errors the
    pass did not reach."""
    if patience < 1:
        raise InputError(f"patience must be at least 1 (got {patience}).")
    scale, truth, data, features, effort = _start(predicted, truth, voxel_size_um)
    true_ids = _true_ids(data, truth, scale, tol_um)
    false, run = [], 0
    for row in edits.unconfirmed_order(features):
        if run >= patience:
            break
        effort.checked += 1
        if true_ids[row] == 0:
            false.append(row)
            run = 0
        else:
            run += 1
    if false:
        data, features = edits.delete_spines(data, features, false)
    effort.deleted = len(false)
    data, features = _visit_suggestions(data, features, truth, scale, tol_um, suggestions, suggestion_patience, effort)
    data, features = _check_links(data, features, truth, scale, tol_um, patience, effort)
    effort.table = edits.table_from_points(data, features)
    return effort


def _start(predicted, truth, voxel_size_um):
    """(scale, truth, data, features, effort): what both reviews begin with."""
    scale = parse_voxel_size(voxel_size_um)
    truth = truth.reset_index(drop=True)
    if len(truth) == 0:
        raise InputError("the true spine table is empty: there is nothing to review against.")
    data, features = edits.points_from_table(predicted)
    effort = ReviewEffort(true_points=len(truth))
    effort.sessions = len({int(t) for t in truth["t"]} | {int(t) for t in edits.sessions_of(data)})
    effort.true_links = int(sum(len(g) - 1 for _, g in truth.groupby("track_id")))
    return scale, truth, data, features, effort


def _visit_suggestions(data, features, truth, scale, tol_um, suggestions, patience, effort: ReviewEffort):
    """G through the open suggestions in its order, Y on each missed spine, until ``patience`` in a
    row were not spines (None: all of them)."""
    if suggestions is not None and len(suggestions):
        offered = edits.review_order(suggestions[edits.open_suggestions(data, suggestions, scale)])
        hits = np.zeros(len(offered), bool)  # the offered suggestions that are missed spines
        missed = _missed(data, truth, scale, tol_um)
        for t in np.unique(offered["t"].to_numpy()):
            mine = np.flatnonzero(offered["t"].to_numpy() == t)
            theirs = missed[truth["t"].to_numpy()[missed] == t]
            hit, _ = match_points(offered.loc[mine, ["z", "y", "x"]].to_numpy(float) * scale,
                                  truth.loc[theirs, ["z", "y", "x"]].to_numpy(float) * scale, tol_um)
            hits[mine[hit]] = True
        passed = 0
        for row in offered.itertuples():  # in G's order
            if patience is not None and passed >= patience:
                break
            effort.suggestions_visited += 1
            if hits[row.Index]:
                expected = int(getattr(row, "track_id", 0) or 0)
                data, features = edits.accept_suggestion(data, features, (row.t, row.z, row.y, row.x), expected)
                effort.accepted += 1
                passed = 0
            else:
                passed += 1
    return data, features


def _check_links(data, features, truth, scale, tol_um, patience: int, effort: ReviewEffort):
    """J through the predicted links, farthest from where their track was expected first
    (``edits.doubtful_link_order``), until ``patience`` in a row were right. A link is wrong where
    the point and its track's point in the nearest earlier session are different true spines: the
    track is cut there, and then the tracks that each of the two spines is now alone on are joined
    where they share no session. A false point met on the way is deleted."""
    order = edits.doubtful_link_order(features)
    if not len(order):
        return data, features
    true_ids, sessions = _true_ids(data, truth, scale, tol_um), edits.sessions_of(data)
    false, run = [], 0
    for row in order:
        if run >= patience:
            break
        if features["status"].iat[row] != "predicted":  # edited by a cut before J got here
            continue
        ids = features["track_id"].to_numpy()
        track, t = int(ids[row]), int(sessions[row])
        earlier = np.flatnonzero((ids == track) & (sessions < t))
        before = earlier[np.argmax(sessions[earlier])] if len(earlier) else None
        if true_ids[row] == 0:
            effort.links_checked += 1
            false.append(row)
            run = 0
        elif before is None or true_ids[before] in (0, true_ids[row]):
            effort.links_checked += 1
            run += 1
        else:
            data, features = edits.split_track(data, features, track, t)
            effort.splits += 1
            run = 0
            for spine in (true_ids[row], true_ids[before]):
                data, features = _join_parts(data, features, true_ids, sessions, spine, effort)
    if false:
        data, features = edits.delete_spines(data, features, false)
        effort.deleted += len(false)
    return data, features


def _matches(data: np.ndarray, truth: pd.DataFrame, scale: np.ndarray, tol_um: float):
    """Per session ``t`` of the truth: (t, rows of ``data``, rows of ``truth``) matched."""
    sessions = edits.sessions_of(data)
    for t in sorted(int(t) for t in truth["t"].unique()):
        pred_rows = np.flatnonzero(sessions == t)
        truth_rows = np.flatnonzero(truth["t"].to_numpy() == t)
        i, j = match_points(data[pred_rows, 1:] * scale,
                            truth.loc[truth_rows, ["z", "y", "x"]].to_numpy(float) * scale, tol_um)
        yield t, pred_rows[i], truth_rows[j]


def _missed(data: np.ndarray, truth: pd.DataFrame, scale: np.ndarray, tol_um: float) -> np.ndarray:
    """Rows of ``truth`` that no point of ``data`` matches, session by session."""
    missed = [np.setdiff1d(np.flatnonzero(truth["t"].to_numpy() == t), truth_rows)
              for t, _, truth_rows in _matches(data, truth, scale, tol_um)]
    return np.concatenate(missed).astype(int) if missed else np.zeros(0, dtype=int)


def _true_ids(data: np.ndarray, truth: pd.DataFrame, scale: np.ndarray, tol_um: float) -> np.ndarray:
    """The true track id each point of ``data`` matches (0: none)."""
    ids = np.zeros(len(data), dtype=np.int64)
    for _, pred_rows, truth_rows in _matches(data, truth, scale, tol_um):
        ids[pred_rows] = truth["track_id"].to_numpy()[truth_rows]
    return ids


def _add_misses(data, features, truth, scale, tol_um, effort: ReviewEffort):
    """Place every true spine still unmatched: with link mode where its true track already has a
    point (nearest session first) whose id is free in this session, as a new spine otherwise."""
    # matched once; each point placed lies on its own true spine and is appended (add_spine)
    true_ids, sessions = _true_ids(data, truth, scale, tol_um), edits.sessions_of(data)
    for row in _missed(data, truth, scale, tol_um):
        spine = truth.loc[row]
        ids = features["track_id"].to_numpy()
        same = np.flatnonzero(true_ids == spine["track_id"])
        carry = None
        for index in same[np.argsort(np.abs(sessions[same] - int(spine["t"])), kind="stable")]:
            if not edits.track_has_point(data, features, int(ids[index]), int(spine["t"])):
                carry = int(ids[index])
                break
        point = (spine["t"], spine["z"], spine["y"], spine["x"])
        data, features = edits.add_spine(data, features, point, track_id=carry)
        true_ids, sessions = np.append(true_ids, spine["track_id"]), np.append(sessions, int(spine["t"]))
        if carry is None:
            effort.added_new += 1
        else:
            effort.added_linked += 1
    return data, features


def _join_parts(data, features, true_ids, sessions, spine: int, effort: ReviewEffort):
    """Join (M) the tracks that hold true spine ``spine`` alone, where they share no session."""
    ids = features["track_id"].to_numpy()
    alone = [k for k in dict.fromkeys(int(i) for i in ids[true_ids == spine]) if (true_ids[ids == k] == spine).all()]
    for other in alone[1:]:
        ids = features["track_id"].to_numpy()
        if not set(sessions[ids == alone[0]]) & set(sessions[ids == other]):
            data, features = edits.merge_tracks(data, features, alone[0], other)
            effort.merges += 1
    return data, features


def _fix_identities(data, features, truth, scale, tol_um, effort: ReviewEffort):
    """Split each track where its true spine changes, then merge the parts of each true spine."""
    true_ids = _true_ids(data, truth, scale, tol_um)
    if (true_ids == 0).any():
        raise AssertionError("a point matches no true spine after the review's additions")
    sessions = edits.sessions_of(data)
    for track_id in np.unique(features["track_id"].to_numpy()):
        rows = np.flatnonzero(features["track_id"].to_numpy() == track_id)
        rows = rows[np.argsort(sessions[rows], kind="stable")]
        changes = rows[1:][true_ids[rows[1:]] != true_ids[rows[:-1]]]
        for row in changes[::-1]:  # from the last change back, so each split cuts one true spine off
            data, features = edits.split_track(data, features, int(track_id), int(sessions[row]))
            effort.splits += 1
    ids = features["track_id"].to_numpy()
    for true_id in np.unique(true_ids):
        parts = list(dict.fromkeys(int(i) for i in ids[true_ids == true_id]))
        for other in parts[1:]:
            data, features = edits.merge_tracks(data, features, parts[0], other)
            effort.merges += 1
        ids = features["track_id"].to_numpy()
    return data, features
