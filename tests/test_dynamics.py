"""Spine dynamics (core/dynamics.py) on hand-made tables and synthetic truth; the report and the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.cli import main
from napari_spine_tracker.core.dynamics import (
    compute_dynamics,
    default_report_dir,
    fill_gaps,
    run_dynamics_report,
    session_table,
    spine_lifetimes,
    spine_presence,
    survival_table,
)
from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.tables import write_spine_table

# sessions observed per track (4 sessions, 0..3):
#   1: 0 1 2 3    stable throughout
#   2: 0 1        lost in 2
#   3:     2 3    a late track, gained in 2
#   4: 0   2      missed once in 1 (filled with max_gap=1), lost in 3
#   5: 0     3    away for 2 sessions: lost in 1, regained in 3 (a new gain)
#   6:   1 2      gained in 1, lost in 3 (its whole life seen)
OBSERVED = {1: [0, 1, 2, 3], 2: [0, 1], 3: [2, 3], 4: [0, 2], 5: [0, 3], 6: [1, 2]}


def hand_table(observed: dict[int, list[int]] = OBSERVED) -> pd.DataFrame:
    rows = [(tid, t, 1.0, 2.0 * tid, 3.0) for tid, ts in observed.items() for t in ts]
    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])


def test_presence_fills_single_gaps_only():
    presence = spine_presence(hand_table())
    assert presence.track_ids.tolist() == [1, 2, 3, 4, 5, 6]
    expected = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]], bool)
    np.testing.assert_array_equal(presence.present, expected)
    assert presence.observed.sum() == 14 and presence.present.sum() == 15


def test_fill_gaps_respects_max_gap_and_edges():
    observed = np.array([[1, 0, 0, 1, 0, 1, 0]], bool)
    np.testing.assert_array_equal(fill_gaps(observed, 0), observed)
    np.testing.assert_array_equal(fill_gaps(observed, 1)[0], [1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(fill_gaps(observed, 2)[0], [1, 1, 1, 1, 1, 1, 0])  # the end stays open


def test_session_statistics_by_hand():
    sessions = session_table(spine_presence(hand_table()))
    assert sessions["t"].tolist() == [0, 1, 2, 3]
    assert sessions["n_observed"].tolist() == [4, 3, 4, 3]
    assert sessions["n_present"].tolist() == [4, 4, 4, 3]
    assert sessions["n_missed"].tolist() == [0, 1, 0, 0]
    assert sessions["gained"].tolist() == [0, 1, 1, 1]
    assert sessions["lost"].tolist() == [0, 1, 1, 2]
    assert sessions["stable"].tolist() == [0, 3, 3, 2]
    # turnover: (gained + lost) / (2 x spines present in the previous session)
    np.testing.assert_allclose(sessions["turnover"], [np.nan, 2 / 8, 2 / 8, 3 / 8])
    # survival of the 4 spines present in session 0 (1, 2, 4, 5); 5 regrows in 3 but did not survive
    np.testing.assert_allclose(sessions["survival"], [1, 3 / 4, 2 / 4, 1 / 4])
    # spines gained in t-1 still present in t: track 6 (gained in 1) in 2, track 3 (gained in 2) in 3
    np.testing.assert_allclose(sessions["new_survival"], [np.nan, np.nan, 1.0, 1.0])


def test_turnover_with_mean_total():
    sessions = session_table(spine_presence(hand_table()), turnover_total="mean")
    np.testing.assert_allclose(sessions["turnover"], [np.nan, 2 / 8, 2 / 8, 3 / 7])
    with pytest.raises(InputError, match="turnover_total"):
        session_table(spine_presence(hand_table()), turnover_total="first")


def test_max_gap_changes_what_counts_as_a_loss():
    literal = session_table(spine_presence(hand_table(), max_gap=0))
    assert literal["n_present"].tolist() == literal["n_observed"].tolist() == [4, 3, 4, 3]
    assert literal["lost"].tolist() == [0, 2, 1, 2]      # track 4 lost in 1 ...
    assert literal["gained"].tolist() == [0, 1, 2, 1]    # ... and gained again in 2
    patient = session_table(spine_presence(hand_table(), max_gap=2))
    np.testing.assert_allclose(patient["survival"], [1, 1, 3 / 4, 2 / 4])  # track 5 was only missed


def test_survival_of_every_cohort():
    survival = survival_table(spine_presence(hand_table()))
    cohort1 = survival[survival["cohort"] == 1]          # track 6, gained in 1, lost in 3
    assert cohort1["t"].tolist() == [1, 2, 3]
    assert cohort1["n_cohort"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(cohort1["fraction"], [1, 1, 0])
    cohort3 = survival[survival["cohort"] == 3]          # track 5 regrowing
    assert cohort3["n_cohort"].tolist() == [1]
    cohort0 = survival[survival["cohort"] == 0]
    assert cohort0["n_surviving"].tolist() == [4, 3, 2, 1]


def test_lifetimes_by_hand():
    spines = spine_lifetimes(spine_presence(hand_table())).set_index("track_id")
    assert spines.loc[1, ["lifetime_sessions", "censored"]].tolist() == [4, True]
    assert spines.loc[4, ["first_session", "last_session", "sessions_observed", "sessions_missed",
                          "lost_in"]].tolist() == [0, 2, 2, 1, 3]
    assert spines.loc[5, ["n_runs", "lifetime_sessions", "gained_in", "lost_in"]].tolist() == [2, 2, -1, -1]
    assert spines.loc[3, ["gained_in", "lost_in", "censored"]].tolist() == [2, -1, True]
    assert spines.loc[6, ["gained_in", "lost_in", "lifetime_sessions", "censored"]].tolist() == [1, 3, 2, False]


def test_trailing_empty_sessions_and_density():
    result = compute_dynamics(hand_table(), n_sessions=6, dendrite_length_um=20.0)
    sessions = result.sessions
    assert sessions["n_present"].tolist() == [4, 4, 4, 3, 0, 0]
    assert sessions["lost"].tolist()[4] == 3
    assert np.isnan(sessions["turnover"].iloc[5])        # nothing present before: undefined
    np.testing.assert_allclose(sessions["density_per_um"], np.array([4, 4, 4, 3, 0, 0]) / 20.0)
    per_session = compute_dynamics(hand_table(), dendrite_length_um=np.array([10.0, 20.0, 40.0, 30.0]))
    np.testing.assert_allclose(per_session.sessions["density_per_um"], [0.4, 0.2, 0.1, 0.1])


def test_bad_input():
    with pytest.raises(InputError, match="only 2 sessions"):
        spine_presence(hand_table(), n_sessions=2)
    with pytest.raises(InputError, match="track_id"):
        spine_presence(pd.DataFrame({"t": [0]}))
    empty = compute_dynamics(hand_table({}), n_sessions=3)
    assert empty.sessions["n_present"].tolist() == [0, 0, 0] and empty.spines.empty


def test_sizes_summaries():
    sizes = pd.DataFrame({"track_id": [1, 1, 1, 2, 2], "t": [0, 1, 2, 0, 1],
                          "head_size_um3": [0.2, 0.3, 0.4, 0.5, 0.25]})
    sizes["size_change"] = sizes["head_size_um3"] / sizes["track_id"].map({1: 0.2, 2: 0.5})
    result = compute_dynamics(hand_table({1: [0, 1, 2], 2: [0, 1]}), sizes=sizes)
    np.testing.assert_allclose(result.sessions["median_size_change"], [np.nan, (1.5 + 0.5) / 2, 2.0])
    spines = result.spines.set_index("track_id")
    np.testing.assert_allclose(spines["size_change_last"], [2.0, 0.5])


# --------------------------------------------------------------------------------------------
# against the synthetic generator's own record


@pytest.fixture(scope="module")
def synthetic():
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    config = SynthConfig.preset("tiny", seed=3, sessions=8, spine_gain_probability=0.2,
                                spine_loss_probability=0.2, transient_miss_probability=0.2)
    return synthesize_series(config)


def test_truth_dynamics_match_the_generator(synthetic):
    truth, record = synthetic.truth, synthetic.metadata()["sessions"]
    result = compute_dynamics(truth, n_sessions=synthetic.image.shape[0])
    sessions = result.sessions
    assert sessions["gained"].tolist() == [s["gained"] for s in record]
    assert sessions["lost"].tolist() == [s["lost"] for s in record]
    assert sessions["n_observed"].tolist() == [s["present"] for s in record]
    assert sum(s["gained"] + s["lost"] for s in record) > 0, "the series should have some turnover"
    # independently: a truth track exists from its first to its last row (single gaps are misses)
    span = truth.groupby("track_id")["t"].agg(["min", "max", "count"])
    assert sessions["n_missed"].sum() == int((span["max"] - span["min"] + 1 - span["count"]).sum())
    assert sessions["n_missed"].sum() > 0, "the series should have transient misses"
    founders = span[span["min"] == 0]
    expected = [(founders["max"] >= t).mean() for t in range(len(sessions))]
    np.testing.assert_allclose(sessions["survival"], expected)
    lifetimes = result.spines.set_index("track_id")
    np.testing.assert_array_equal(lifetimes.loc[span.index, "lifetime_sessions"], span["max"] - span["min"] + 1)


# --------------------------------------------------------------------------------------------
# report and command line


def test_report_from_a_table(tmp_path):
    path = write_spine_table(hand_table(), tmp_path / "cell.spines.csv")
    assert default_report_dir(path) == tmp_path / "cell.dynamics"
    written = run_dynamics_report(path)
    assert {p.name for p in written} == {"sessions.csv", "spines.csv", "survival.csv", "dynamics.png"}
    assert all(p.parent == tmp_path / "cell.dynamics" for p in written)
    sessions = pd.read_csv(tmp_path / "cell.dynamics" / "sessions.csv")
    assert sessions["gained"].tolist() == [0, 1, 1, 1]
    assert (tmp_path / "cell.dynamics" / "dynamics.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "cell.dynamics").glob(".*.tmp"))


def test_cli_with_image(tmp_path, synthetic):
    from napari_spine_tracker.io.series import write_series_tiff

    image = write_series_tiff(tmp_path / "series.tif", synthetic.image, synthetic.voxel_size_um)
    truth = write_spine_table(synthetic.truth, tmp_path / "truth.csv")
    assert main(["dynamics", str(truth), "--image", str(image), "--out", str(tmp_path / "report")]) == 0
    sessions = pd.read_csv(tmp_path / "report" / "sessions.csv")
    assert sessions["gained"].tolist() == [s["gained"] for s in synthetic.metadata()["sessions"]]
    assert {"dendrite_length_um", "density_per_um", "median_size_change"} <= set(sessions.columns)
    sizes = pd.read_csv(tmp_path / "report" / "sizes.csv")
    assert len(sizes) == len(synthetic.truth)
    first = sizes.sort_values("t").groupby("track_id").first()
    np.testing.assert_allclose(first["size_change"].dropna(), 1.0)


def test_cli_bad_input(tmp_path, capsys, synthetic):
    bad = tmp_path / "bad.csv"
    bad.write_text("track_id,t\n1,0\n")
    assert main(["dynamics", str(bad)]) == 2
    assert "lacks the required column" in capsys.readouterr().err
    from napari_spine_tracker.io.series import write_series_tiff

    image = write_series_tiff(tmp_path / "series.tif", synthetic.image[:2], synthetic.voxel_size_um)
    late = write_spine_table(hand_table({1: [0, 5]}), tmp_path / "late.csv")
    assert main(["dynamics", str(late), "--image", str(image)]) == 2
    assert "only 2 sessions" in capsys.readouterr().err
    assert main(["dynamics", str(tmp_path / "missing.csv")]) == 2
