"""Spine dynamics from a spine table: counts, gains, losses, turnover, survival, lifetimes, density.

Conventions (every statistic below follows them):

* Sessions are ``0 .. n_sessions - 1``; ``n_sessions`` defaults to ``max(t) + 1`` but should be the
  series length when known, so that empty trailing sessions count (everything lost there).
* A spine is *observed* in a session when the table has a row for its ``track_id`` there.
* A spine is *present* in a session when it is observed, or when the session lies in a gap of at
  most ``max_gap`` sessions between two observations of the same track (default 1): such a gap is
  a spine the annotator or the detector missed, not a loss followed by a regrowth. ``max_gap=0``
  takes the rows literally. Gaps at the start or end of the series are never filled (there is no
  observation on both sides). A longer gap is a loss, and the reappearance a new gain.
* Between consecutive sessions ``t-1`` and ``t``: *gained* = present at ``t`` but not at ``t-1``,
  *lost* = present at ``t-1`` but not at ``t``, *stable* = present at both. Session 0 has none.
* *Turnover ratio* ``(gained + lost) / (2 x total)``; ``total`` is the number of spines present at
  the earlier session ``t-1`` (``turnover_total="previous"``, the usual chronic-imaging choice) or
  the mean of the counts at ``t-1`` and ``t`` (``"mean"``).
* *Survival* of a cohort (the spines present in session 0, or those gained in session ``s``) at
  session ``t`` = the fraction of the cohort present in *every* session from its start to ``t``
  (filled gaps count as present). A spine lost and regained later does not survive; its regrowth
  is a new gain.
* *Lifetime* of a spine = the number of sessions it is present (in all its runs). It is censored
  when the spine is present in the first or the last session (its real lifetime is longer).
* *Density* = present spines per µm of dendrite.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError

log = logging.getLogger(__name__)

TURNOVER_TOTALS = ("previous", "mean")


@dataclass(frozen=True)
class SpinePresence:
    """Which spine exists in which session.

    ``track_ids`` (N,) int; ``observed`` and ``present`` (N, T) bool, rows in ``track_ids`` order,
    columns sessions ``0 .. T-1``. ``present`` is ``observed`` with short gaps filled.
    """

    track_ids: np.ndarray
    observed: np.ndarray
    present: np.ndarray
    max_gap: int

    @property
    def n_sessions(self) -> int:
        return int(self.present.shape[1])


def spine_presence(table: pd.DataFrame, n_sessions: int | None = None, max_gap: int = 1) -> SpinePresence:
    """Presence matrix of a spine table (``track_id``, ``t`` columns); see the module conventions."""
    for col in ("track_id", "t"):
        if col not in table.columns:
            raise InputError(f"the spine table lacks the column {col!r}; it needs track_id and t.")
    if max_gap < 0:
        raise InputError(f"max_gap must be >= 0 sessions (got {max_gap}).")
    t = table["t"].to_numpy(dtype=np.int64)
    if len(t) and t.min() < 0:
        raise InputError(f"session index t must be >= 0 (found {t.min()}).")
    max_t = int(t.max()) + 1 if len(t) else 0
    if n_sessions is None:
        n_sessions = max_t
    elif n_sessions < max_t:
        raise InputError(f"the table has spines in session {max_t - 1} but the series has only "
                         f"{n_sessions} sessions: check that the table belongs to this series.")
    track_ids, rows = np.unique(table["track_id"].to_numpy(dtype=np.int64), return_inverse=True)
    observed = np.zeros((len(track_ids), n_sessions), dtype=bool)
    observed[rows, t] = True
    return SpinePresence(track_ids, observed, fill_gaps(observed, max_gap), max_gap)


def fill_gaps(observed: np.ndarray, max_gap: int) -> np.ndarray:
    """(N, T) bool -> (N, T) bool with internal runs of at most ``max_gap`` False sessions set True."""
    present = observed.copy()
    if max_gap <= 0:
        return present
    n_sessions = observed.shape[1]
    seen_before = np.maximum.accumulate(observed, axis=1)
    seen_after = np.maximum.accumulate(observed[:, ::-1], axis=1)[:, ::-1]
    inside = seen_before & seen_after & ~observed
    # length of each internal gap: sessions since the last observation + until the next one - 1
    idx = np.arange(n_sessions)
    last_seen = np.maximum.accumulate(np.where(observed, idx, -1), axis=1)
    next_seen = np.minimum.accumulate(np.where(observed, idx, n_sessions)[:, ::-1], axis=1)[:, ::-1]
    gap_len = next_seen - last_seen - 1
    present[inside & (gap_len <= max_gap)] = True
    return present


def _transitions(presence: SpinePresence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gained, lost, stable counts per session (T,), 0 for session 0."""
    p = presence.present
    gained = np.zeros(presence.n_sessions, dtype=np.int64)
    lost, stable = gained.copy(), gained.copy()
    gained[1:] = (~p[:, :-1] & p[:, 1:]).sum(axis=0)
    lost[1:] = (p[:, :-1] & ~p[:, 1:]).sum(axis=0)
    stable[1:] = (p[:, :-1] & p[:, 1:]).sum(axis=0)
    return gained, lost, stable


def turnover_ratio(presence: SpinePresence, turnover_total: str = "previous") -> np.ndarray:
    """(T,) turnover ratio between sessions ``t-1`` and ``t``; NaN for session 0 or an empty total."""
    if turnover_total not in TURNOVER_TOTALS:
        raise InputError(f"turnover_total must be one of {TURNOVER_TOTALS}, got {turnover_total!r}.")
    gained, lost, _ = _transitions(presence)
    counts = presence.present.sum(axis=0).astype(float)
    ratio = np.full(presence.n_sessions, np.nan)
    if presence.n_sessions < 2:
        return ratio
    total = counts[:-1] if turnover_total == "previous" else (counts[:-1] + counts[1:]) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio[1:] = np.where(total > 0, (gained[1:] + lost[1:]) / (2 * total), np.nan)
    return ratio


def cohort_survival(presence: SpinePresence, cohort_session: int = 0) -> tuple[int, np.ndarray]:
    """Survival of the spines present in session 0 (``cohort_session=0``) or gained in session s.

    Returns ``(cohort size, (T,) fraction surviving)``; NaN before the cohort's session and when
    the cohort is empty.
    """
    p = presence.present
    n_sessions = presence.n_sessions
    if not 0 <= cohort_session < n_sessions:
        raise InputError(f"cohort session {cohort_session} is outside the series (0..{n_sessions - 1}).")
    members = p[:, cohort_session].copy()
    if cohort_session > 0:
        members &= ~p[:, cohort_session - 1]
    fraction = np.full(n_sessions, np.nan)
    n_cohort = int(members.sum())
    if n_cohort:
        alive = np.logical_and.accumulate(p[members, cohort_session:], axis=1)
        fraction[cohort_session:] = alive.sum(axis=0) / n_cohort
    return n_cohort, fraction


def survival_table(presence: SpinePresence) -> pd.DataFrame:
    """Survival of every cohort, long format.

    Columns: ``cohort`` (0: the spines present in session 0; s >= 1: the spines gained in s),
    ``t`` (>= cohort), ``sessions_since`` (t - cohort), ``n_cohort``, ``n_surviving``, ``fraction``.
    Empty cohorts are left out.
    """
    rows = []
    for cohort in range(presence.n_sessions):
        n_cohort, fraction = cohort_survival(presence, cohort)
        if n_cohort == 0:
            continue
        for t in range(cohort, presence.n_sessions):
            rows.append((cohort, t, t - cohort, n_cohort, round(fraction[t] * n_cohort), fraction[t]))
    columns = ["cohort", "t", "sessions_since", "n_cohort", "n_surviving", "fraction"]
    return pd.DataFrame(rows, columns=columns).astype(
        {"cohort": "int64", "t": "int64", "sessions_since": "int64", "n_cohort": "int64",
         "n_surviving": "int64", "fraction": "float64"})


def session_table(
    presence: SpinePresence,
    dendrite_length_um: float | np.ndarray | None = None,
    turnover_total: str = "previous",
) -> pd.DataFrame:
    """Per-session statistics, one row per session.

    Columns: ``t``, ``n_observed`` (rows in the table), ``n_present`` (observed + filled gaps),
    ``n_missed`` (filled gaps), ``gained``, ``lost``, ``stable``, ``turnover``, ``survival`` (of the
    session-0 spines), ``new_survival`` (fraction of the spines gained in ``t-1`` still present in
    ``t``), and, when ``dendrite_length_um`` (a number or one per session) is given,
    ``dendrite_length_um`` and ``density_per_um``.
    """
    n_sessions = presence.n_sessions
    gained, lost, stable = _transitions(presence)
    n_present = presence.present.sum(axis=0)
    n_observed = presence.observed.sum(axis=0)
    new_survival = np.full(n_sessions, np.nan)
    for s in range(1, n_sessions - 1):
        n_cohort, fraction = cohort_survival(presence, s)
        if n_cohort:
            new_survival[s + 1] = fraction[s + 1]
    table = pd.DataFrame({
        "t": np.arange(n_sessions, dtype=np.int64),
        "n_observed": n_observed.astype(np.int64),
        "n_present": n_present.astype(np.int64),
        "n_missed": (n_present - n_observed).astype(np.int64),
        "gained": gained,
        "lost": lost,
        "stable": stable,
        "turnover": turnover_ratio(presence, turnover_total),
        "survival": cohort_survival(presence, 0)[1] if n_sessions else np.zeros(0),
        "new_survival": new_survival,
    })
    if dendrite_length_um is not None:
        length = np.broadcast_to(np.asarray(dendrite_length_um, dtype=float), (n_sessions,))
        table["dendrite_length_um"] = length
        with np.errstate(invalid="ignore", divide="ignore"):
            table["density_per_um"] = np.where(length > 0, n_present / length, np.nan)
    return table


def spine_lifetimes(presence: SpinePresence) -> pd.DataFrame:
    """Per-spine history, one row per track.

    Columns: ``track_id``, ``first_session``/``last_session`` present, ``sessions_observed``,
    ``sessions_present``, ``sessions_missed`` (filled gaps), ``n_runs`` (separate periods of
    presence; > 1 when the spine was lost and regrew), ``lifetime_sessions`` (= sessions present),
    ``gained_in`` (first session of its first run when > 0, else -1: present from the start),
    ``lost_in`` (session after its last run when inside the series, else -1: present at the end),
    ``censored`` (lifetime not fully seen: present in the first or the last session).
    """
    p = presence.present
    n_sessions = presence.n_sessions
    any_present = p.any(axis=1)
    first = np.where(any_present, np.argmax(p, axis=1), -1)
    last = np.where(any_present, n_sessions - 1 - np.argmax(p[:, ::-1], axis=1), -1)
    starts = p & ~np.concatenate([np.zeros((len(p), 1), bool), p[:, :-1]], axis=1)
    sessions_present = p.sum(axis=1)
    table = pd.DataFrame({
        "track_id": presence.track_ids.astype(np.int64),
        "first_session": first.astype(np.int64),
        "last_session": last.astype(np.int64),
        "sessions_observed": presence.observed.sum(axis=1).astype(np.int64),
        "sessions_present": sessions_present.astype(np.int64),
        "sessions_missed": (sessions_present - presence.observed.sum(axis=1)).astype(np.int64),
        "n_runs": starts.sum(axis=1).astype(np.int64),
        "lifetime_sessions": sessions_present.astype(np.int64),
        "gained_in": np.where(first > 0, first, -1).astype(np.int64),
        "lost_in": np.where((last >= 0) & (last < n_sessions - 1), last + 1, -1).astype(np.int64),
        "censored": (p[:, 0] | p[:, -1]) if n_sessions else np.zeros(0, bool),
    })
    return table


@dataclass
class DynamicsResult:
    """Every table of a dynamics report.

    ``sessions``: :func:`session_table` (+ ``median_size_change`` with sizes: the median head
    size relative to the spine's first session, over the spines seen before ``t``); ``spines``:
    :func:`spine_lifetimes` (+ head-size summary with sizes); ``survival``: :func:`survival_table`;
    ``sizes``: one row per spine and session (see ``core.morphology.measure_series``) or None.
    """

    sessions: pd.DataFrame
    spines: pd.DataFrame
    survival: pd.DataFrame
    sizes: pd.DataFrame | None = None


def compute_dynamics(
    table: pd.DataFrame,
    n_sessions: int | None = None,
    *,
    max_gap: int = 1,
    dendrite_length_um: float | np.ndarray | None = None,
    turnover_total: str = "previous",
    sizes: pd.DataFrame | None = None,
) -> DynamicsResult:
    """All statistics of a spine table (see the module conventions).

    ``dendrite_length_um``: one number or one per session (T,), for densities. ``sizes``: a
    per-spine-session table with ``track_id``, ``t``, ``head_size_um3``, ``size_change``.
    """
    presence = spine_presence(table, n_sessions=n_sessions, max_gap=max_gap)
    sessions = session_table(presence, dendrite_length_um=dendrite_length_um, turnover_total=turnover_total)
    spines = spine_lifetimes(presence)
    if sizes is not None and len(sizes):
        # a spine's first session is 1 by definition: the median is over spines seen before
        first_t = sizes.groupby("track_id")["t"].transform("min")
        per_session = sizes[sizes["t"] > first_t].groupby("t")["size_change"].median()
        sessions["median_size_change"] = sessions["t"].map(per_session).astype(float)
        ordered = sizes.dropna(subset=["head_size_um3"]).sort_values(["track_id", "t"])
        by_track = ordered.groupby("track_id")["head_size_um3"]
        summary = pd.DataFrame({
            "head_size_first_um3": by_track.first(),
            "head_size_last_um3": by_track.last(),
            "head_size_mean_um3": by_track.mean(),
        })
        summary["size_change_last"] = summary["head_size_last_um3"] / summary["head_size_first_um3"]
        spines = spines.merge(summary, left_on="track_id", right_index=True, how="left")
    return DynamicsResult(sessions, spines, survival_table(presence), sizes)


def default_report_dir(spines_path: str | os.PathLike) -> Path:
    """``dir/NAME.spines.csv`` (or ``dir/NAME.csv``) -> ``dir/NAME.dynamics``."""
    path = Path(spines_path)
    name = path.name
    for suffix in (".spines.csv", ".csv"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".dynamics")


def run_dynamics_report(
    spines_path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    voxel_size_um: tuple[float, float, float] | None = None,
    out_dir: str | os.PathLike | None = None,
    channel: int | None = None,
    *,
    max_gap: int = 1,
    turnover_total: str = "previous",
    progress=None,
    should_stop=None,
) -> list[Path]:
    """The ``dynamics`` command: statistics of a spine table written as CSV tables and a PNG figure.

    With ``image`` (the series the table was made on), the series length sets the number of
    sessions, and dendrite length (densities) and spine head sizes are measured on it. Writes into
    ``out_dir`` (default :func:`default_report_dir`) and returns the paths written.
    """
    from ..io.reports import write_dynamics_report
    from ..io.tables import read_spine_table

    table = read_spine_table(spines_path)
    if table.empty:
        raise InputError(f"{spines_path} holds no spines: there are no dynamics to report.")
    n_sessions = lengths = sizes = None
    if image is not None:
        from ..io.series import load_series
        from .morphology import measure_series

        series = load_series(image, voxel_size_um=voxel_size_um, channel=channel)
        n_sessions = series.n_sessions
        if table["t"].max() >= n_sessions:
            raise InputError(f"{spines_path} has spines in session {table['t'].max()} but {image} has only "
                             f"{n_sessions} sessions: is this the series the table was made on?")
        try:
            lengths, sizes = measure_series(series.data, series.voxel_size_um, table,
                                            session_shapes=series.session_shapes,
                                            progress=progress, should_stop=should_stop)
        finally:
            series.close()
    elif voxel_size_um is not None:
        log.warning("--voxel-size is used only with --image (dendrite length and head sizes); ignored.")
    result = compute_dynamics(table, n_sessions, max_gap=max_gap, dendrite_length_um=lengths,
                              turnover_total=turnover_total, sizes=sizes)
    out = Path(out_dir) if out_dir is not None else default_report_dir(spines_path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a folder for the dynamics report.")
    n_start = int(result.sessions["n_present"].iloc[0]) if len(result.sessions) else 0
    title = f"{Path(spines_path).name}: {n_start} spines in session 0, {len(result.sessions)} sessions"
    return write_dynamics_report(result, out, title=title)
