"""Pure correction functions of core/edits.py (no GUI)."""

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.core import edits
from napari_spine_tracker.errors import InputError


def _points(rows):
    """rows: (track_id, t, z, y, x, score, status)."""
    table = pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x", "score", "status"])
    return edits.points_from_table(table)


@pytest.fixture
def two_spines():
    # spine 1 in sessions 0-2, spine 2 in sessions 0-1
    return _points([
        (1, 0, 2, 10, 10, 0.9, "predicted"),
        (1, 1, 2, 11, 10, 0.4, "predicted"),
        (1, 2, 2, 11, 11, 0.7, "predicted"),
        (2, 0, 3, 30, 30, 0.2, "predicted"),
        (2, 1, 3, 30, 31, 0.6, "confirmed"),
    ])


def _ids(features):
    return features["track_id"].tolist()


def test_table_round_trip_keeps_extra_columns():
    table = pd.DataFrame(dict(track_id=[3, 1], t=[1, 0], z=[1.5, 2], y=[3, 4], x=[5, 6], score=[0.5, 1.0],
                              status=["predicted", "added"], head_radius_um=[0.3, 0.4]))
    data, features = edits.points_from_table(table)
    assert data.shape == (2, 4)
    assert list(features.columns) == ["track_id", "score", "status", "head_radius_um"]
    assert features["track_id"].dtype == np.int64
    back = edits.table_from_points(data, features)
    pd.testing.assert_frame_equal(back, edits.table_from_points(*edits.points_from_table(back)))
    assert back["head_radius_um"].tolist() == [0.3, 0.4]
    assert back["t"].tolist() == [1, 0]


def test_empty_layer_gives_empty_table():
    table = edits.table_from_points(*edits.empty_points())
    assert list(table.columns)[:7] == ["track_id", "t", "z", "y", "x", "score", "status"] and table.empty


def test_add_spine_new_id_and_continue(two_spines):
    data, features = edits.add_spine(*two_spines, [1, 5, 50, 50])
    assert _ids(features)[-1] == 3 and features["status"].iloc[-1] == "added"
    assert features["score"].iloc[-1] == 1.0 and data[-1].tolist() == [1, 5, 50, 50]
    data, features = edits.add_spine(data, features, [2.2, 3, 30, 32], track_id=2)
    assert _ids(features)[-1] == 2 and data[-1, 0] == 2
    with pytest.raises(InputError, match="already has a point in session 2"):
        edits.add_spine(data, features, [2, 3, 3, 3], track_id=2)
    assert len(two_spines[0]) == 5, "inputs must not change"


def test_delete_and_move(two_spines):
    data, features = edits.delete_spines(*two_spines, [0, 3])
    assert _ids(features) == [1, 1, 2] and data[:, 0].tolist() == [1, 2, 1]
    data, features = edits.move_spine(*two_spines, 1, [2.5, 12, 9])
    assert data[1].tolist() == [1, 2.5, 12, 9] and features["status"].iloc[1] == "edited"
    assert two_spines[0][1].tolist() == [1, 2, 11, 10]
    data, features = edits.add_spine(*two_spines, [0, 1, 1, 1])
    _, features = edits.mark_edited(data, features, [5])
    assert features["status"].iloc[5] == "added", "a hand-placed point stays 'added' when moved"
    with pytest.raises(InputError, match="no spine selected"):
        edits.delete_spines(*two_spines, [])


def test_confirm_keeps_human_statuses(two_spines):
    data, features = edits.add_spine(*two_spines, [0, 1, 1, 1])
    _, features = edits.confirm_spines(data, features, [0, 4, 5])
    assert features["status"].tolist() == ["confirmed", "predicted", "predicted", "predicted",
                                           "confirmed", "added"]


def test_assign_track_swaps_on_conflict(two_spines):
    # point 1 (spine 1, session 1) -> spine 2, which has point 4 in session 1: they swap
    _, features = edits.assign_track(*two_spines, 1, 2)
    assert _ids(features) == [1, 2, 1, 2, 1]
    assert features["status"].iloc[1] == "edited" and features["status"].iloc[4] == "confirmed"
    # a free id just relabels
    _, features = edits.assign_track(*two_spines, 2, 7)
    assert _ids(features) == [1, 1, 7, 2, 2]


def test_merge_and_split(two_spines):
    data, features = edits.split_track(*two_spines, 1, 2)
    assert _ids(features) == [1, 1, 3, 2, 2]
    with pytest.raises(InputError, match="both have a point"):
        edits.merge_tracks(data, features, 1, 2)
    data, features = edits.merge_tracks(data, features, 2, 3)
    assert _ids(features) == [1, 1, 2, 2, 2]
    with pytest.raises(InputError, match="no points both before"):
        edits.split_track(*two_spines, 1, 0)


def test_next_unconfirmed_in_rising_score(two_spines):
    data, features = two_spines
    order = []
    index = None
    for _ in range(5):
        index = edits.next_unconfirmed(features, after=index)
        order.append(index)
    # predicted scores: 0:0.9, 1:0.4, 2:0.7, 3:0.2; then it wraps around
    assert order == [3, 1, 2, 0, 3]
    _, features = edits.confirm_spines(data, features, [0, 1, 2, 3])
    assert edits.next_unconfirmed(features) is None


def test_next_unconfirmed_after_the_visited_point_was_deleted(two_spines):
    data, features = two_spines
    # scores 0:0.9, 1:0.4, 2:0.7, 3:0.2: N shows 3, then 1, which the user deletes
    visited = edits.next_unconfirmed(features, after=3)
    assert visited == 1
    kept = (float(features["score"].iloc[visited]), visited)
    data, features = edits.delete_spines(data, features, [visited])
    # the points after it moved up one: 0.9, 0.7, 0.2. By its (score, index) N goes on to 0.7;
    # by its old index it would have skipped to 0.9
    assert features["score"].iloc[edits.next_unconfirmed(features, after=kept)] == 0.7
    assert features["score"].iloc[edits.next_unconfirmed(features, after=visited)] == 0.9


def _with_links(two_spines, link_um=(np.nan, 0.2, 0.9, np.nan, 0.5)):
    data, features = two_spines
    return data, features.assign(link_um=list(link_um))


def test_next_doubtful_link_farthest_first_and_only_predicted(two_spines):
    data, features = _with_links(two_spines, (np.nan, 0.2, 0.9, np.nan, 0.5))
    order, after = [], None
    for _ in range(3):
        index = edits.next_doubtful_link(features, after=after)
        order.append(index)
        after = (features["link_um"].iloc[index], index)
    # predicted links: 1 (0.2 µm) and 2 (0.9); 4 is confirmed, 0 and 3 start their tracks
    assert order == [2, 1, 2]
    # ties: in index order; a table without link distances has no links to visit
    tied = features.assign(link_um=[np.nan, 0.5, 0.5, np.nan, np.nan])
    assert edits.next_doubtful_link(tied) == 1 and edits.next_doubtful_link(tied, after=(0.5, 1)) == 2
    assert edits.next_doubtful_link(features.drop(columns="link_um")) is None
    _, confirmed = edits.confirm_spines(data, features, [1, 2])
    assert edits.next_doubtful_link(confirmed) is None


def test_a_corrected_identity_loses_its_link_distance(two_spines):
    data, features = _with_links(two_spines)
    # split spine 1 before session 2: point 2 starts a new track, so its link is gone
    _, split = edits.split_track(data, features, 1, 2)
    assert np.isnan(split["link_um"].iloc[2]) and split["link_um"].iloc[1] == 0.2
    assert edits.next_doubtful_link(split) == 1
    # re-assigned points (both sides of the swap) and merged tracks likewise
    _, assigned = edits.assign_track(data, features, 1, 2)
    assert assigned["link_um"].isna().tolist() == [True, True, False, True, True]
    _, merged = edits.merge_tracks(*edits.split_track(data, features, 1, 2), 1, 3)
    assert np.isnan(merged["link_um"].iloc[2])
    # a pasted point is the user's: it does not take the copied point's link
    _, pasted = edits.paste_spines(data, features, data[[2]], features.iloc[[2]], session=3)
    assert np.isnan(pasted["link_um"].iloc[-1]) and pasted["status"].iloc[-1] == "added"


def test_paste_into_next_session_keeps_free_ids(two_spines):
    data, features = two_spines
    copied = [0, 3]  # session 0 of spines 1 and 2
    data, features = edits.paste_spines(data, features, data[copied], features.iloc[copied], session=2)
    # spine 1 already has a point in session 2 -> new id 3; spine 2 continues
    assert _ids(features)[-2:] == [3, 2] and data[-2:, 0].tolist() == [2, 2]
    assert set(features["status"].iloc[-2:]) == {"added"}


def test_merge_predictions_keeps_human_points_and_ids():
    data, features = _points([
        (5, 0, 2, 10, 10, 0.9, "confirmed"),
        (6, 0, 2, 40, 40, 0.3, "predicted"),   # not vetted: replaced
        (7, 1, 2, 60, 60, 1.0, "added"),
        (8, 2, 2, 80, 80, 0.5, "predicted"),   # session 2 reviewed: kept
    ])
    predictions = pd.DataFrame(dict(
        track_id=[1, 1, 2, 3, 3], t=[0, 1, 0, 1, 2], z=[2, 2, 2, 2, 2],
        y=[10.5, 11, 41, 60.2, 20], x=[10, 11, 41, 60, 20], score=[0.8, 0.7, 0.6, 0.5, 0.9],
        status=["predicted"] * 5))
    data, features = edits.merge_predictions(data, features, predictions, voxel_size_um=(0.5, 0.1, 0.1),
                                             tol_um=0.2, reviewed_sessions=[2])
    table = edits.table_from_points(data, features).sort_values(["t", "y"]).reset_index(drop=True)
    rows = list(table[["track_id", "t", "y", "status"]].itertuples(index=False, name=None))
    # new track 1 matched human spine 5 in session 0 -> continues as 5 in session 1;
    # new track 3 matched human spine 7 in session 1; its session-2 point falls in a reviewed session;
    # new track 2 gets a fresh id above the kept ids
    assert rows == [(5, 0, 10.0, "confirmed"), (9, 0, 41.0, "predicted"), (5, 1, 11.0, "predicted"),
                    (7, 1, 60.0, "added"), (8, 2, 80.0, "predicted")]


def test_merge_predictions_conflicting_vote_gets_new_id():
    data, features = _points([(4, 0, 0, 0, 0, 1.0, "added"), (4, 1, 0, 50, 50, 1.0, "added")])
    predictions = pd.DataFrame(dict(track_id=[1, 1], t=[0, 1], z=[0, 0], y=[0, 10], x=[0, 10],
                                    score=[0.9, 0.9], status=["predicted"] * 2))
    _, features = edits.merge_predictions(data, features, predictions, voxel_size_um=(1, 1, 1), tol_um=1)
    # the session-1 prediction cannot join spine 4 (it has a hand point there) -> its own id
    assert _ids(features) == [4, 4, 5]


def test_history_undo_redo_and_merge_key(two_spines):
    history = edits.EditHistory(limit=3)
    states = [edits.SpineState(*two_spines)]
    history.reset(states[0])
    assert history.undo() is None
    for _ in range(2):
        states.append(edits.SpineState(*edits.delete_spines(states[-1].data, states[-1].features, [0])))
        history.push(states[-1])
    assert len(history.current.data) == 3
    assert history.undo() is states[1] and history.undo() is states[0] and not history.can_undo
    assert history.redo() is states[1]
    moved = edits.SpineState(*edits.move_spine(states[1].data, states[1].features, 0, [0, 0, 0]))
    history.push(moved, merge_key=("move", (0,)))
    moved2 = edits.SpineState(*edits.move_spine(states[1].data, states[1].features, 0, [1, 1, 1]))
    history.push(moved2, merge_key=("move", (0,)))
    assert history.current is moved2 and not history.can_redo
    assert history.undo() is states[1], "two moves of one drag are one undo step"
    for _ in range(5):
        history.push(states[0])
    steps = 0
    while history.undo() is not None:
        steps += 1
    assert steps == 3, "history keeps at most `limit` undo steps"


def test_a_suggestion_is_open_until_a_spine_lies_near_it_in_its_session():
    voxel = (0.5, 0.1, 0.1)
    suggestions = pd.DataFrame({"t": [0, 0, 1], "z": [2.0, 2.0, 2.0], "y": [10.0, 30.0, 10.0],
                                "x": [10.0, 10.0, 10.0], "score": [0.3, 0.3, 0.3]})
    assert edits.open_suggestions(np.zeros((0, 4)), suggestions, voxel).all()
    # a spine 0.4 µm (4 pixels) from the first, in its session: closed; the same place in session 2: no matter
    data = np.array([[0, 2, 14, 10], [2, 2, 10, 10]], float)
    np.testing.assert_array_equal(edits.open_suggestions(data, suggestions, voxel), [False, True, True])
    # 0.5 µm away (one z step) is far enough
    np.testing.assert_array_equal(edits.open_suggestions(np.array([[1, 3, 10, 10]], float), suggestions, voxel),
                                  [True, True, True])
    point = suggestions.loc[2, ["t", "z", "y", "x"]].to_numpy(float)
    added, _ = edits.add_spine(data, pd.DataFrame({"track_id": [1, 2], "score": [0.9, 0.9],
                                                   "status": ["predicted"] * 2}), point)
    np.testing.assert_array_equal(edits.open_suggestions(added, suggestions, voxel), [False, True, False])
    np.testing.assert_array_equal(point, [1, 2, 10, 10])  # add_spine leaves the caller's point as it was


def test_an_accepted_suggestion_continues_its_expected_track_where_that_track_is_free():
    data = np.array([[0, 2, 10, 10], [1, 2, 10, 11], [1, 2, 30, 30]], float)
    features = pd.DataFrame({"track_id": [1, 1, 2], "score": [0.9] * 3, "status": ["predicted"] * 3})
    # track 2 has no point in session 0: the suggestion there continues it
    data2, features2 = edits.accept_suggestion(data, features, (0, 2, 30, 31), track_id=2)
    np.testing.assert_array_equal(data2[-1], [0, 2, 30, 31])
    assert features2["track_id"].iloc[-1] == 2 and features2["status"].iloc[-1] == "added"
    # track 1 has one in session 1 already, and 0 means none was expected: new ids
    _, features3 = edits.accept_suggestion(data, features, (1, 2, 50, 50), track_id=1)
    _, features4 = edits.accept_suggestion(data, features, (1, 2, 50, 50))
    assert features3["track_id"].iloc[-1] == 3 and features4["track_id"].iloc[-1] == 3


def test_g_visits_suggestions_where_a_track_expected_a_spine_first():
    suggestions = pd.DataFrame({"t": [0, 1, 2, 3], "z": [1.0] * 4, "y": [1.0] * 4, "x": [1.0] * 4,
                                "score": [0.38, 0.31, 0.25, 0.22], "track_id": [0, 3, 0, 7]})
    ordered = edits.review_order(suggestions)
    assert list(ordered["t"]) == [1, 3, 0, 2] and list(ordered.index) == [0, 1, 2, 3]
    # without expected tracks: most likely first
    assert list(edits.review_order(suggestions.drop(columns="track_id"))["t"]) == [0, 1, 2, 3]
