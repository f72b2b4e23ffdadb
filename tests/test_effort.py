"""The oracle review: the table it ends with is the truth, and its counts are those of its edits."""

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.core import edits
from napari_spine_tracker.core.effort import ReviewEffort, quick_review, review_effort
from napari_spine_tracker.core.metrics import evaluate_tracks
from napari_spine_tracker.errors import InputError

VOXEL = (1.0, 1.0, 1.0)


def _table(rows):
    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"]).assign(score=0.9, status="predicted")


@pytest.fixture
def truth():
    # spines 1-3 in sessions 0-2, 20 voxels apart; spine 4 only in session 1
    rows = [(k, t, 5.0, 20.0 * k, 20.0) for k in (1, 2, 3) for t in range(3)]
    return _table([*rows, (4, 1, 5.0, 80.0, 60.0)])


def test_a_perfect_detection_needs_only_checking(truth):
    predicted = truth.assign(y=truth["y"] + 0.5)  # within the tolerance
    effort = review_effort(predicted, truth, VOXEL)
    assert (effort.checked, effort.corrections, effort.sessions) == (10, 0, 3)
    assert effort.review == (10 + 3, 0, 10)  # N for each, R for each session; a decision each
    assert (effort.true_points, effort.true_links) == (10, 6)
    assert effort.by_hand == (12, 16, 10)
    assert ReviewEffort.seconds(effort.review) < ReviewEffort.seconds(effort.by_hand)
    scores = evaluate_tracks(effort.table, truth, VOXEL)
    assert scores["f1"] == scores["idf1"] == 1.0


def test_every_kind_of_error_is_fixed_and_counted(truth):
    rows = [
        (1, 0, 5.0, 20.0, 20.0), (1, 1, 5.0, 20.0, 20.0),            # spine 1, missed in session 2
        (2, 0, 5.0, 40.0, 20.0), (2, 1, 5.0, 60.0, 20.0), (2, 2, 5.0, 60.0, 20.0),  # switches to 3
        (3, 0, 5.0, 60.0, 20.0), (3, 1, 5.0, 40.0, 20.0),            # ... and 3 to 2; 2 missed in 2
        (9, 2, 5.0, 100.0, 100.0),                                   # a false detection
    ]                                                                # spine 4 missed
    predicted = _table(rows)
    # a suggestion on spine 2 in session 2 (the tracker expected track 3 there), one on nothing
    suggestions = pd.DataFrame({"t": [2, 2], "z": [5.0, 5.0], "y": [40.3, 120.0], "x": [20.0, 120.0],
                                "score": [0.3, 0.25], "track_id": [3, 0]})
    effort = review_effort(predicted, truth, VOXEL, suggestions)
    assert (effort.checked, effort.deleted) == (8, 1)
    assert (effort.suggestions_visited, effort.accepted) == (2, 1)
    # spine 1 in session 2 continues track 1 (link mode); spine 4 is new
    assert (effort.added_linked, effort.added_new) == (1, 1)
    # tracks 2 and 3 each switch spine after session 0: two splits, two merges
    assert (effort.splits, effort.merges) == (2, 2)
    assert effort.corrections == 1 + 1 + 2 + 2 + 2
    scores = evaluate_tracks(effort.table, truth, VOXEL)
    assert scores["f1"] == scores["idf1"] == 1.0
    keys, clicks, decisions = effort.review
    assert keys == 8 + 1 + 2 + 1 + 1 + 1 + 2 * 2 + 2 + 3
    assert clicks == 1 + 2 + 2 + 2 * 2
    assert decisions == 8 + 2 + 1 + 1 + 2 + 2


def test_a_track_that_holds_three_spines_is_cut_twice(truth):
    # one predicted track over spine 1, then 2, then 1 again; spines 2 and 3 otherwise right
    rows = [(1, 0, 5.0, 20.0, 20.0), (1, 1, 5.0, 40.0, 20.0), (1, 2, 5.0, 20.0, 20.0),
            (2, 0, 5.0, 40.0, 20.0), (2, 2, 5.0, 40.0, 20.0), (5, 1, 5.0, 20.0, 20.0),
            (3, 0, 5.0, 60.0, 20.0), (3, 1, 5.0, 60.0, 20.0), (3, 2, 5.0, 60.0, 20.0),
            (4, 1, 5.0, 80.0, 60.0)]
    effort = review_effort(_table(rows), truth, VOXEL)
    assert effort.splits == 2
    assert effort.merges == 3  # spine 1: two parts of track 1 and track 5; spine 2: track 2 and the middle
    scores = evaluate_tracks(effort.table, truth, VOXEL)
    assert scores["f1"] == scores["idf1"] == 1.0


def test_an_empty_truth_is_refused(truth):
    with pytest.raises(InputError, match="empty"):
        review_effort(truth, truth.iloc[:0], VOXEL)


def test_a_reviewer_who_loses_patience_places_the_rest_by_hand(truth):
    predicted = truth[~((truth["track_id"] == 1) & (truth["t"] == 2))]  # spine 1 missed in session 2
    # in G's order: two suggestions on nothing, then the miss (no track expected anywhere)
    suggestions = pd.DataFrame({"t": [2, 2, 2], "z": [5.0] * 3, "y": [120.0, 140.0, 20.0], "x": [120.0] * 2 + [20.0],
                                "score": [0.35, 0.3, 0.25], "track_id": [0, 0, 0]})
    patient = review_effort(predicted, truth, VOXEL, suggestions)
    # accepted as a new spine, then merged into spine 1
    assert (patient.suggestions_visited, patient.accepted, patient.added_linked, patient.merges) == (3, 1, 0, 1)
    hasty = review_effort(predicted, truth, VOXEL, suggestions, suggestion_patience=2)
    assert (hasty.suggestions_visited, hasty.accepted, hasty.added_linked, hasty.merges) == (2, 0, 1, 0)
    # where the tracker expected spine 1, G shows that suggestion first
    expected = review_effort(predicted, truth, VOXEL, suggestions.assign(track_id=[0, 0, 1]), suggestion_patience=2)
    assert (expected.suggestions_visited, expected.accepted, expected.merges) == (3, 1, 0)
    for effort in (patient, hasty):
        scores = evaluate_tracks(effort.table, truth, VOXEL)
        assert scores["f1"] == scores["idf1"] == 1.0


def test_a_quick_pass_checks_the_least_certain_until_enough_in_a_row_are_right(truth):
    predicted = truth.assign(score=np.linspace(0.5, 0.9, len(truth)))
    false = _table([(9, 0, 5.0, 100.0, 100.0), (8, 1, 5.0, 120.0, 100.0)]).assign(score=[0.3, 0.99])
    predicted = pd.concat([predicted, false], ignore_index=True)
    # N starts where edits.next_unconfirmed starts: the least certain prediction
    _, features = edits.points_from_table(predicted)
    assert predicted["score"].iat[edits.next_unconfirmed(features)] == 0.3
    quick = quick_review(predicted, truth, VOXEL, patience=3)
    # the false detection at 0.3, then three right ones: the one at 0.99 is never reached
    assert (quick.checked, quick.deleted, quick.links_checked, quick.splits) == (4, 1, 0, 0)
    assert quick.review == (4 + 1 + 3, 0, 4)
    scores = evaluate_tracks(quick.table, truth, VOXEL)
    assert scores["precision"] == pytest.approx(10 / 11) and scores["recall"] == 1.0
    thorough = quick_review(predicted, truth, VOXEL, patience=20)
    assert (thorough.checked, thorough.deleted) == (12, 2)
    assert evaluate_tracks(thorough.table, truth, VOXEL)["f1"] == 1.0
    with pytest.raises(InputError, match="patience"):
        quick_review(predicted, truth, VOXEL, patience=0)
    nothing = quick_review(predicted.iloc[:0], truth, VOXEL)  # an empty detection: only R to press
    assert (nothing.checked, nothing.review, len(nothing.table)) == (0, (3, 0, 0), 0)


def test_a_quick_pass_cuts_the_links_farthest_from_where_they_were_expected(truth):
    rows = [
        (1, 0, 5.0, 20.0, 20.0), (1, 1, 5.0, 20.0, 20.0), (1, 2, 5.0, 20.0, 20.0),
        (2, 0, 5.0, 40.0, 20.0), (2, 1, 5.0, 60.0, 20.0), (2, 2, 5.0, 60.0, 20.0),  # switches to 3
        (3, 0, 5.0, 60.0, 20.0), (3, 1, 5.0, 40.0, 20.0), (3, 2, 5.0, 40.0, 20.0),  # ... and 3 to 2
        (4, 1, 5.0, 80.0, 60.0),
    ]
    link = [np.nan, 0.1, 0.2, np.nan, 1.1, 0.3, np.nan, 1.0, 0.25, np.nan]
    predicted = _table(rows).assign(link_um=link)
    before = evaluate_tracks(predicted, truth, VOXEL)
    assert before["idf1"] < 1.0
    quick = quick_review(predicted, truth, VOXEL, patience=2)
    # J: track 2 at session 1 (1.1 µm; cut, nothing to join yet), track 3 at session 1 (cut; now
    # spine 2's and spine 3's parts each join), then two right links (0.3, 0.25) and it stops
    assert (quick.splits, quick.merges, quick.links_checked) == (2, 2, 2)
    assert quick.checked == 2 and quick.deleted == 0
    scores = evaluate_tracks(quick.table, truth, VOXEL)
    assert scores["f1"] == scores["idf1"] == 1.0
    keys, clicks, decisions = quick.review
    assert (keys, clicks, decisions) == (2 + 2 * 2 + 2 + 2 + 3, 2 + 2 * 2, 2 + 2 + 2 + 2)
    hasty = quick_review(predicted, truth, VOXEL, patience=1)
    assert hasty.splits == 2  # each cut resets the count; the first right link ends it
