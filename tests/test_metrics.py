"""evaluate_tracks: hand-computed cases, an independent brute force on random tiny cases, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.cli import main
from napari_spine_tracker.core.metrics import evaluate_tracks, match_points
from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.tables import write_spine_table


def table(rows: list[tuple]) -> pd.DataFrame:
    """rows of (track_id, t, z, y, x)."""
    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"]).astype(
        {"z": float, "y": float, "x": float})


TRUTH = table([
    (1, 0, 2, 10, 10), (1, 1, 2, 10, 10), (1, 2, 2, 10, 10),
    (2, 0, 4, 30, 30), (2, 1, 4, 30, 30), (2, 2, 4, 30, 30),
])


def test_perfect_prediction_scores_one():
    s = evaluate_tracks(TRUTH, TRUTH, (1.0, 0.1, 0.1))
    assert (s["f1"], s["idf1"], s["association_accuracy"]) == (1.0, 1.0, 1.0)
    assert (s["tp"], s["fp"], s["fn"], s["n_true_links"]) == (6, 0, 0, 4)
    json.dumps(s)  # plain JSON


def test_distance_is_measured_in_um():
    # 5 voxels off in x: 0.5 µm at 0.1 µm/voxel (a match), 5 µm at 1 µm/voxel (no match)
    pred = TRUTH.assign(x=TRUTH["x"] + 5)
    assert evaluate_tracks(pred, TRUTH, (1.0, 0.1, 0.1), tol_um=1.0)["f1"] == 1.0
    s = evaluate_tracks(pred, TRUTH, (1.0, 1.0, 1.0), tol_um=1.0)
    assert (s["tp"], s["fp"], s["fn"], s["f1"]) == (0, 6, 6, 0.0)
    # z voxels are 1 µm: 2 voxels off in z is 2 µm
    assert evaluate_tracks(TRUTH.assign(z=TRUTH["z"] + 2), TRUTH, (1.0, 0.1, 0.1))["tp"] == 0


def test_identity_swap_halfway():
    # ids swapped from session 1 on: detection perfect; IDTP = 4 of 6 (best: keep sessions 1, 2)
    pred = TRUTH.copy()
    late = pred["t"] >= 1
    pred.loc[late, "track_id"] = 3 - pred.loc[late, "track_id"]
    s = evaluate_tracks(pred, TRUTH, (1.0, 0.1, 0.1))
    assert s["f1"] == 1.0
    assert s["idtp"] == 4
    assert s["idf1"] == pytest.approx(2 * 4 / (6 + 6))
    # links 0->1 are broken for both spines, links 1->2 kept
    assert (s["n_links_evaluable"], s["n_links_correct"]) == (4, 2)
    assert s["association_accuracy"] == 0.5


def test_false_positive_miss_and_fragmented_track():
    pred = table([
        (1, 0, 2, 10, 10), (1, 1, 2, 10, 10),   # spine 1 in sessions 0, 1
        (7, 2, 2, 10, 11),                      # spine 1 in session 2, under a new id
        (2, 0, 4, 30, 30), (2, 2, 4, 30, 30),   # spine 2 missed in session 1
        (9, 1, 4, 80, 80),                      # a false positive
    ])
    s = evaluate_tracks(pred, TRUTH, (1.0, 0.1, 0.1))
    assert (s["tp"], s["fp"], s["fn"]) == (5, 1, 1)
    assert s["precision"] == pytest.approx(5 / 6) and s["recall"] == pytest.approx(5 / 6)
    # IDTP: id 1 -> spine 1 (2 sessions) + id 2 -> spine 2 (2 sessions) = 4
    assert s["idtp"] == 4 and s["idp"] == pytest.approx(4 / 6) and s["idr"] == pytest.approx(4 / 6)
    # spine 1: 0->1 correct, 1->2 broken; spine 2: both links have a missed end
    assert (s["n_true_links"], s["n_links_evaluable"], s["n_links_correct"]) == (4, 2, 1)
    assert s["association_accuracy"] == 0.5 and s["link_recall"] == 0.25
    per = {d["t"]: d for d in s["sessions"]}
    assert (per[1]["tp"], per[1]["fp"], per[1]["fn"]) == (1, 1, 1)


def test_gap_in_truth_is_one_link():
    truth = table([(1, 0, 0, 0, 0), (1, 3, 0, 0, 0)])
    same = evaluate_tracks(truth, truth, (1, 1, 1))
    assert (same["n_true_links"], same["association_accuracy"]) == (1, 1.0)
    split = evaluate_tracks(truth.assign(track_id=[1, 2]), truth, (1, 1, 1))
    assert split["association_accuracy"] == 0.0 and split["idtp"] == 1


def test_hungarian_beats_greedy():
    # greedy nearest-first would pair p0-g1 (0.5) and leave p1, g0 unmatched (1.5 apart)
    truth = table([(1, 0, 0, 0, 0.0), (2, 0, 0, 0, 1.0)])
    pred = table([(1, 0, 0, 0, 0.5 + 1e-9), (2, 0, 0, 0, 1.6)])
    s = evaluate_tracks(pred, truth, (1, 1, 1), tol_um=1.0)
    assert s["tp"] == 2


def test_empty_inputs_give_zeros():
    empty = TRUTH.iloc[:0]
    s = evaluate_tracks(empty, TRUTH, (1, 1, 1))
    assert (s["f1"], s["idf1"], s["association_accuracy"], s["fn"], s["n_pred"]) == (0.0, 0.0, 0.0, 6, 0)
    s = evaluate_tracks(TRUTH, empty, (1, 1, 1))
    assert (s["precision"], s["fp"], s["n_true"]) == (0.0, 6, 0)
    s = evaluate_tracks(empty, empty, (1, 1, 1))
    assert s["f1"] == 0.0 and s["sessions"] == []
    # a table without track_id columns but with no rows is still empty predictions
    assert evaluate_tracks(pd.DataFrame(columns=["t", "z", "y", "x"]), TRUTH, (1, 1, 1))["fn"] == 6


def test_bad_input_is_explained():
    with pytest.raises(InputError, match="voxel_size_um"):
        evaluate_tracks(TRUTH, TRUTH, (1, 1))
    with pytest.raises(InputError, match="tol_um"):
        evaluate_tracks(TRUTH, TRUTH, (1, 1, 1), tol_um=0)
    with pytest.raises(InputError, match="track_id"):
        evaluate_tracks(TRUTH.drop(columns="track_id"), TRUTH, (1, 1, 1))


# ---------------------------------------------------------------------------------------------
# independent brute force on random tiny cases


def brute_tp(p: np.ndarray, g: np.ndarray, tol: float) -> int:
    """Largest number of pairs within tol over all one-to-one matchings (enumerated)."""
    best = 0
    slots = list(range(len(g))) + [None] * len(p)
    for perm in itertools.permutations(slots, len(p)):
        n = sum(1 for i, j in enumerate(perm) if j is not None and np.linalg.norm(p[i] - g[j]) <= tol)
        best = max(best, n)
    return best


def brute_idtp(pred: pd.DataFrame, truth: pd.DataFrame, scale: np.ndarray, tol: float) -> int:
    """Largest identity-TP count over every partial one-to-one map of predicted to true ids."""
    def score(pid, gid):
        a = pred[pred.track_id == pid].set_index("t")
        b = truth[truth.track_id == gid].set_index("t")
        n = 0
        for t in a.index.intersection(b.index):
            zyx = ["z", "y", "x"]
            d = (a.loc[t, zyx].to_numpy(float) - b.loc[t, zyx].to_numpy(float)) * scale
            n += np.linalg.norm(d) <= tol
        return n

    pids, gids = sorted(pred.track_id.unique()), sorted(truth.track_id.unique())
    s = {(a, b): score(a, b) for a in pids for b in gids}
    best = 0
    for perm in itertools.permutations(gids + [None] * len(pids), len(pids)):
        best = max(best, sum(s[(a, b)] for a, b in zip(pids, perm, strict=True) if b is not None))
    return best


def random_tracks(rng: np.random.Generator, n_ids: int, n_sessions: int) -> pd.DataFrame:
    rows = []
    for tid in range(1, n_ids + 1):
        for t in range(n_sessions):
            if rng.random() < 0.75:
                rows.append((tid, t, *rng.integers(0, 3, size=3)))
    return table(rows)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_tiny_cases(seed):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 0.5, 0.5])
    tol = 1.1
    pred = random_tracks(rng, int(rng.integers(1, 5)), 3)
    truth = random_tracks(rng, int(rng.integers(1, 5)), 3)
    s = evaluate_tracks(pred, truth, scale, tol_um=tol)

    tp = 0
    for t in range(3):
        p = pred[pred.t == t][["z", "y", "x"]].to_numpy(float) * scale
        g = truth[truth.t == t][["z", "y", "x"]].to_numpy(float) * scale
        tp += brute_tp(p, g, tol)
        mi, mj = match_points(p, g, tol)
        assert len(set(mi)) == len(mi) and len(set(mj)) == len(mj)
        assert np.all(np.linalg.norm(p[mi] - g[mj], axis=1) <= tol)
    assert s["tp"] == tp
    idtp = brute_idtp(pred, truth, scale, tol)
    assert s["idtp"] == idtp
    assert s["idf1"] == pytest.approx(2 * idtp / (len(pred) + len(truth)) if len(pred) + len(truth) else 0.0)
    assert 0.0 <= s["association_accuracy"] <= 1.0


def test_cli_evaluate_truth_against_itself(tmp_path, capsys):
    path = write_spine_table(TRUTH, tmp_path / "truth.csv")
    assert main(["evaluate", str(path), str(path), "--voxel-size", "1", "0.1", "0.1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["f1"] == 1.0 and out["idf1"] == 1.0


@pytest.mark.parametrize("maximize", [True, False])
def test_sparse_assignment_is_optimal_against_a_dense_solver(maximize):
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    from napari_spine_tracker.core.metrics import sparse_assignment

    rng = np.random.default_rng(7)
    for _ in range(60):
        n_a, n_b = (int(v) for v in rng.integers(0, 25, 2))
        a, b = rng.uniform(0, 6, (n_a, 3)), rng.uniform(0, 6, (n_b, 3))
        tol = float(rng.uniform(0.5, 3.0))
        pairs = (cKDTree(a).sparse_distance_matrix(cKDTree(b), tol, output_type="coo_matrix")
                 if n_a and n_b else None)
        i, j, d = (pairs.row, pairs.col, pairs.data) if pairs is not None else ([], [], [])
        i, j, d = np.asarray(i, int), np.asarray(j, int), np.asarray(d, float)
        weights = tol - d + 1e-9 if maximize else d
        rows, cols = sparse_assignment(i, j, weights, n_a, n_b, maximize=maximize)
        edge = {(r, c): w for r, c, w in zip(i.tolist(), j.tolist(), weights.tolist(), strict=True)}
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert all((r, c) in edge for r, c in zip(rows.tolist(), cols.tolist(), strict=True))
        got = [edge[p] for p in zip(rows.tolist(), cols.tolist(), strict=True)]
        # the same problem, dense: an absent pair weighs 0 (maximise) or more than any set of
        # real pairs (count first), then dropped from the answer
        if maximize:
            dense = np.zeros((n_a, n_b))
            dense[i, j] = weights
            r, c = linear_sum_assignment(dense, maximize=True)
            best = dense[r, c][dense[r, c] > 0]
            assert sum(got) == pytest.approx(best.sum(), abs=1e-9)
        else:
            big = 1e6
            dense = np.full((n_a, n_b), big)
            dense[i, j] = weights
            r, c = linear_sum_assignment(dense)
            best = dense[r, c][dense[r, c] < big]
            assert len(got) == len(best)
            assert sum(got) == pytest.approx(best.sum(), abs=1e-9)
