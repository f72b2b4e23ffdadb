"""link_detections: drift, gaps, displacement, gating, empty input, ids, cancel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.core.link import AUTO_GATE, FIXED_GATE_UM, link_detections, parse_gate
from napari_spine_tracker.core.metrics import evaluate_tracks
from napari_spine_tracker.errors import Cancelled, InputError
from napari_spine_tracker.io.tables import REQUIRED_COLUMNS

VOXEL = (0.5, 0.1, 0.1)  # µm


def detections_from(truth: pd.DataFrame) -> pd.DataFrame:
    """Shuffled detections (no track ids) made from a truth table."""
    det = truth.drop(columns="track_id").assign(score=0.9)
    return det.sample(frac=1.0, random_state=0).reset_index(drop=True)


def same_partition(linked: pd.DataFrame, truth: pd.DataFrame) -> bool:
    """True when the linked ids group the rows exactly as the true ids (up to renaming)."""
    key = ["t", "z", "y", "x"]
    merged = linked.merge(truth, on=key, suffixes=("_pred", "_true"))
    assert len(merged) == len(truth)
    pairs = merged[["track_id_pred", "track_id_true"]].drop_duplicates()
    return pairs["track_id_pred"].is_unique and pairs["track_id_true"].is_unique


def grid_truth(drift_vox: np.ndarray, n_spines: int = 6, spacing_vox: float = 10.0) -> pd.DataFrame:
    """Spines on a line 1 µm apart (10 voxels of 0.1 µm), moved by the drift in every session."""
    rows = []
    for t, d in enumerate(drift_vox):
        for k in range(n_spines):
            p = np.array([4.0, 50.0, 20.0 + spacing_vox * k]) + d
            rows.append((k + 1, t, *p))
    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])


def test_perfect_linking_with_drift():
    # 3 µm drift between sessions: three times the spacing of the spines
    drift = np.array([[0, 0, 0], [1, 5, 30], [1, -10, 60], [0, -10, 90]], dtype=float)
    truth = grid_truth(drift)
    linked = link_detections(detections_from(truth), VOXEL, drift_vox=drift)
    assert list(linked.columns[:7]) == list(REQUIRED_COLUMNS)
    assert (linked["status"] == "predicted").all()
    assert same_partition(linked, truth)
    assert evaluate_tracks(linked, truth, VOXEL)["idf1"] == 1.0
    # without registration the same detections are mislinked
    unregistered = link_detections(detections_from(truth), VOXEL)
    assert not same_partition(unregistered, truth)


def test_ids_start_at_one_in_order_of_first_appearance_and_extra_columns_kept():
    det = pd.DataFrame({"t": [1, 0, 0, 1], "z": [0.0, 0, 0, 0], "y": [0.0, 0, 50, 50],
                        "x": [0.0, 0, 0, 0], "score": [0.5, 0.6, 0.7, 0.8], "head_radius_um": [1, 2, 3, 4]})
    linked = link_detections(det, VOXEL)
    assert linked["track_id"].tolist() == [1, 2, 1, 2]
    assert linked["t"].tolist() == [0, 0, 1, 1]
    assert linked["head_radius_um"].tolist() == [2, 3, 1, 4]
    assert linked["score"].tolist() == [0.6, 0.7, 0.5, 0.8]


@pytest.mark.parametrize(("gap", "kept"), [(1, True), (2, True), (3, False)])
def test_gap_closing_keeps_id_up_to_max_gap(gap, kept):
    drift = np.cumsum(np.full((6, 3), [0.0, 4.0, 8.0]), axis=0)  # 0.9 µm per session
    truth = grid_truth(drift, n_spines=3)
    # spine 2 is missed in sessions 1 .. gap
    missed = (truth["track_id"] == 2) & truth["t"].between(1, gap)
    truth = truth[~missed]
    linked = link_detections(detections_from(truth), VOXEL, drift_vox=drift, max_gap=2)
    spine2 = linked.merge(truth, on=["t", "z", "y", "x"]).query("track_id_y == 2")
    assert (spine2["track_id_x"].nunique() == 1) == kept
    # the other spines are never disturbed
    others = linked.merge(truth, on=["t", "z", "y", "x"]).query("track_id_y != 2")
    assert others.groupby("track_id_y")["track_id_x"].nunique().eq(1).all()


def test_gap_gate_grows_modestly():
    det = pd.DataFrame({"t": [0, 2], "z": [0.0, 0.0], "y": [0.0, 0.0], "x": [0.0, 16.0], "score": 1.0})
    # 1.6 µm after one missed session: beyond gate 1.5, within 1.5 + 0.25
    assert link_detections(det, VOXEL, gate_um=1.5)["track_id"].nunique() == 1
    assert link_detections(det, VOXEL, gate_um=1.5, gap_gate_growth_um=0.0)["track_id"].nunique() == 2


def test_swapped_neighbours_resolved_by_displacement():
    # two spines 0.4 µm apart trade places (say, a deformation the rigid drift does not explain);
    # registration alone links by proximity, the predicted displacement knows better
    det = pd.DataFrame({
        "t": [0, 0, 1, 1],
        "z": [2.0, 2.0, 2.0, 2.0], "y": [10.0, 10.0, 10.0, 10.0], "x": [10.0, 14.0, 10.5, 13.5],
        "score": 0.9,
        # in session 1: the point at x=10.5 came from x=14, the one at 13.5 from x=10
        "dz": [np.nan, np.nan, 0.0, 0.0], "dy": [np.nan, np.nan, 0.0, 0.0], "dx": [np.nan, np.nan, 3.5, -3.5],
    })
    linked = link_detections(det, VOXEL)
    ids = linked.set_index(["t", "x"])["track_id"]
    assert ids[(1, 10.5)] == ids[(0, 14.0)] and ids[(1, 13.5)] == ids[(0, 10.0)]
    by_proximity = link_detections(det.drop(columns=["dz", "dy", "dx"]), VOXEL)
    ids = by_proximity.set_index(["t", "x"])["track_id"]
    assert ids[(1, 10.5)] == ids[(0, 10.0)]
    assert {"dz", "dy", "dx"} <= set(linked.columns)


def test_gating_rejects_far_jumps():
    det = pd.DataFrame({"t": [0, 1, 2], "z": [0.0, 0.0, 0.0], "y": [0.0, 0.0, 0.0], "x": [0.0, 14.0, 34.0],
                        "score": 1.0})
    linked = link_detections(det, VOXEL, gate_um=1.5)
    # 1.4 µm: linked; then 2.0 µm: a new track
    assert linked["track_id"].tolist() == [1, 1, 2]
    # how far each link reached: NaN where a track starts
    np.testing.assert_allclose(linked["link_um"], [np.nan, 1.4, np.nan])


def test_link_distance_of_gap_closing():
    # one spine seen in sessions 0 and 2 (missed in 1), 0.3 µm further along x
    det = pd.DataFrame({"t": [0, 2, 0, 1, 2], "z": 0.0, "y": [0.0, 0.0, 50.0, 50.0, 50.0],
                        "x": [0.0, 3.0, 0.0, 0.0, 0.0], "score": 1.0})
    linked = link_detections(det, VOXEL, gate_um=1.0)
    assert linked["track_id"].tolist() == [1, 2, 2, 1, 2]
    np.testing.assert_allclose(linked["link_um"], [np.nan, np.nan, 0.0, 0.3, 0.0], atol=1e-9)


def jittered_grid(sigma_um: float, sessions: int = 4, seed: int = 0) -> pd.DataFrame:
    """A truth table: 36 spines 3 µm apart in y and x, found each session within ``sigma_um``
    (per axis) of their place, without drift."""
    rng = np.random.default_rng(seed)
    place = np.array([[4.0, 30.0 * i, 30.0 * j] for i in range(6) for j in range(6)])
    rows = []
    for t in range(sessions):
        found = place + rng.normal(0.0, sigma_um, place.shape) / np.array(VOXEL)
        rows += [(k + 1, t, *p) for k, p in enumerate(found)]
    return pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])


def test_auto_gate_is_four_medians_of_the_series_links():
    truth = jittered_grid(0.12)
    linked = link_detections(detections_from(truth), VOXEL, local_scale_um=None)
    assert same_partition(linked, truth)
    # every probe link is right here, so the median is that of each spine's step between sessions
    steps = truth.sort_values(["track_id", "t"]).groupby("track_id")[["z", "y", "x"]].diff().dropna()
    median = float(np.median(np.linalg.norm(steps.to_numpy() * VOXEL, axis=1)))
    assert 0.2 < 4 * median < 1.4 - 0.2  # inside the range, so the rule itself is what is checked
    assert linked.attrs == {"gate_um": pytest.approx(4 * median), "gate_auto": True}
    # within the range: tightly localised spines get the narrowest gate, poorly localised the widest
    assert link_detections(detections_from(jittered_grid(0.02)), VOXEL).attrs["gate_um"] == 0.8
    assert link_detections(detections_from(jittered_grid(0.4)), VOXEL).attrs["gate_um"] == 1.4
    # too few links to measure: the fixed gate; a gate given is used as it is
    few = detections_from(grid_truth(np.zeros((3, 3))))
    assert link_detections(few, VOXEL).attrs == {"gate_um": FIXED_GATE_UM, "gate_auto": True}
    assert link_detections(few, VOXEL, gate_um=0.9).attrs == {"gate_um": 0.9, "gate_auto": False}


def test_auto_gate_keeps_a_new_spine_from_taking_a_lost_neighbours_id():
    truth = jittered_grid(0.02)
    # spine 8 is lost after session 1 and a new spine (37) grows 1 µm beside where it was
    lost = (truth["track_id"] == 8) & (truth["t"] >= 2)
    born = truth[lost].assign(track_id=37, x=lambda d: d["x"] + 10.0)
    truth = pd.concat([truth[~lost], born], ignore_index=True)
    auto = link_detections(detections_from(truth), VOXEL)
    assert auto.attrs["gate_um"] == 0.8 and same_partition(auto, truth)
    assert evaluate_tracks(auto, truth, VOXEL)["idf1"] == 1.0
    # a fixed 1.2 µm gate hides both the loss and the gain: the new spine carries on the lost one's id
    fixed = link_detections(detections_from(truth), VOXEL, gate_um=1.2)
    assert not same_partition(fixed, truth)
    assert fixed["track_id"].nunique() == 36
    # and that link is the one that reached farthest, the first the review's J key visits
    merged = fixed.merge(truth, on=["t", "z", "y", "x"], suffixes=("", "_true"))
    assert merged.loc[merged["link_um"].idxmax(), ["t", "track_id_true"]].tolist() == [2, 37]
    assert merged["link_um"].max() == pytest.approx(1.0, abs=0.1)


def test_parse_gate():
    assert parse_gate("auto") == parse_gate(" AUTO ") == AUTO_GATE
    assert parse_gate("0.9") == 0.9
    for bad in ("0", "-1", "far", "nan"):
        with pytest.raises(InputError, match=rf"gate_um must be 'auto' or a positive distance in µm, got '{bad}'"):
            parse_gate(bad)


def test_empty_input_gives_empty_table():
    empty = pd.DataFrame({"t": [], "z": [], "y": [], "x": [], "score": []})
    linked = link_detections(empty, VOXEL)
    assert len(linked) == 0 and list(linked.columns[:7]) == list(REQUIRED_COLUMNS)
    assert linked.attrs == {"gate_um": FIXED_GATE_UM, "gate_auto": True}


def test_progress_cancel_and_bad_input():
    det = detections_from(grid_truth(np.zeros((3, 3))))
    calls = []
    link_detections(det, VOXEL, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(Cancelled):
        link_detections(det, VOXEL, should_stop=lambda: True)
    with pytest.raises(InputError, match="drift_vox"):
        link_detections(det, VOXEL, drift_vox=np.zeros((2, 3)))
    with pytest.raises(InputError, match="column"):
        link_detections(det.drop(columns="z"), VOXEL)
    with pytest.raises(InputError, match="finite"):
        link_detections(det.assign(z=np.nan), VOXEL)


def test_local_correction_follows_smooth_deformation():
    # 16 spines 4 µm apart; the tissue moves 1.3 µm more than the registration says, and every
    # other spine 0.35 µm further still (1.65 µm: beyond the 1.5 µm gate)
    yx = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 40.0 + 20
    first = pd.DataFrame({"t": 0, "z": 4.0, "y": yx[:, 0], "x": yx[:, 1], "score": 1.0})
    extra = 13.0 + np.where(np.arange(16) % 2 == 0, 3.5, -3.5)
    second = first.assign(t=1, x=first["x"] + extra)
    truth = pd.concat([first.assign(track_id=np.arange(1, 17)), second.assign(track_id=np.arange(1, 17))])
    det = pd.concat([first, second], ignore_index=True)
    corrected = link_detections(det, VOXEL)
    assert same_partition(corrected, truth)
    rigid_only = link_detections(det, VOXEL, local_scale_um=None)
    assert rigid_only["track_id"].nunique() == 16 + 8


def scattered_spines(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) voxels: spines scattered over a 12 x 12 µm field, at least 1 µm apart."""
    rng = np.random.default_rng(seed)
    points: list[np.ndarray] = []
    while len(points) < n:
        p = np.array([4.0, *rng.uniform(10, 130, 2)])
        if all(np.linalg.norm((p - q) * VOXEL) >= 1.0 for q in points):
            points.append(p)
    return np.array(points)


def test_local_motion_corrects_a_registration_error_and_deformation():
    # registration says nothing moved; in fact the field moved 1.1 µm in x plus a smooth
    # deformation of up to 0.4 µm in y: many spines land nearer a neighbour's old place
    first = scattered_spines(40)
    second = first.copy()
    second[:, 2] += 11.0
    second[:, 1] += 4.0 * np.sin(first[:, 2] / 140 * np.pi)
    truth = pd.concat([pd.DataFrame(first, columns=["z", "y", "x"]).assign(t=0, track_id=np.arange(1, 41)),
                       pd.DataFrame(second, columns=["z", "y", "x"]).assign(t=1, track_id=np.arange(1, 41))])
    det = detections_from(truth)
    assert same_partition(link_detections(det, VOXEL), truth)
    rigid = link_detections(det, VOXEL, local_scale_um=None)
    assert evaluate_tracks(rigid, truth, VOXEL)["idf1"] < 0.9


def test_a_missed_spine_is_carried_with_its_neighbours():
    # the unregistered field moves 1 µm per session; spine 1 is missed in session 1 and is 2 µm
    # from its last place in session 2: beyond the gap gate (1.75 µm) unless its expected
    # position moves with the spines around it
    base = scattered_spines(20, seed=1)
    rows = []
    for t in range(3):
        for k, p in enumerate(base):
            if not (t == 1 and k == 0):
                rows.append((k + 1, t, p[0], p[1], p[2] + 10.0 * t))
    truth = pd.DataFrame(rows, columns=["track_id", "t", "z", "y", "x"])
    linked = link_detections(detections_from(truth), VOXEL, max_gap=1)
    assert same_partition(linked, truth)
    rigid = link_detections(detections_from(truth), VOXEL, max_gap=1, local_scale_um=None)
    assert rigid["track_id"].nunique() > 20


def test_linking_follows_a_rotation_given_as_motion():
    from napari_spine_tracker.core.register import RigidMotion

    # spines 3 µm apart over a 100 µm field; session 1 is turned by 3 degrees about the centre
    # (up to 3.7 µm at the corners, three gates) and shifted
    voxel = np.array([0.5, 0.2, 0.2])
    yy, xx = np.meshgrid(np.arange(25, 500, 15.0), np.arange(25, 500, 15.0), indexing="ij")
    first = np.column_stack([np.full(yy.size, 8.0), yy.ravel(), xx.ravel()])
    motion = RigidMotion(np.array([[0, 0, 0], [1.0, 6.0, -4.0]]), np.radians([0.0, 3.0]),
                         np.array([15.5, 255.5, 255.5]), voxel)
    truth = pd.DataFrame({"track_id": np.tile(np.arange(1, len(first) + 1), 2), "t": np.repeat([0, 1], len(first))})
    truth[["z", "y", "x"]] = np.vstack([first, motion.to_session(first, 1)])
    linked = link_detections(detections_from(truth), voxel, motion=motion)
    assert same_partition(linked, truth)
    # the same translation without the turn loses the far spines
    translated = link_detections(detections_from(truth), voxel, drift_vox=motion.drift_vox)
    assert not same_partition(translated, truth)
    with pytest.raises(InputError, match="motion covers 2 sessions"):
        link_detections(detections_from(truth).assign(t=lambda d: d.t * 2), voxel, motion=motion)


def test_votes_of_zero_weight_change_no_mode():
    from napari_spine_tracker.core.link import _mean_shift

    rng = np.random.default_rng(3)
    n, m = 40, 12
    votes = rng.normal(0, 1.0, (3, n, m))
    weights = rng.random((n, m)) * (rng.random((n, m)) > 0.3)
    start = rng.normal(0, 0.5, (n, 3))
    modes = _mean_shift(votes, weights, start, (1.0, 0.5))
    # the same votes among many silent ones, in shuffled columns
    junk = rng.normal(0, 5.0, (3, n, 3 * m))
    padded_votes = np.concatenate([junk, votes], axis=2)
    padded_weights = np.concatenate([np.zeros((n, 3 * m)), weights], axis=1)
    order = rng.permutation(4 * m)
    padded = _mean_shift(padded_votes[:, :, order], padded_weights[:, order], start, (1.0, 0.5))
    np.testing.assert_allclose(padded, modes, atol=1e-5)  # float32 sums in another order
    assert np.abs(modes - start).max() > 0.1  # the climb did move the points
    silent = _mean_shift(votes, np.zeros((n, m)), start, (1.0,))
    np.testing.assert_array_equal(silent, start)  # nothing heard: each point keeps its start
    # each point climbs on its own: its mode does not depend on which others climb beside it
    alone = _mean_shift(votes[:, :7], weights[:7], start[:7], (1.0, 0.5))
    np.testing.assert_array_equal(alone, modes[:7])


def _deformed_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """(sources, targets) µm of three session pairs: a field moved and deformed, each by its own
    amount, with a tenth of the targets gone and some new; and a pair too small to vote."""
    rng = np.random.default_rng(5)
    pairs = []
    for k, n in enumerate((60, 90, 45)):
        sources = scattered_spines(n, seed=10 + k) * VOXEL
        moved = sources + [0.2 * k, 1.1 - 0.4 * k, 0.8] + 0.4 * np.sin(sources[:, [2, 1, 1]] / 6.0)
        kept = moved[rng.random(n) > 0.1]
        pairs.append((sources, np.vstack([kept, scattered_spines(5, seed=20 + k) * VOXEL])))
    pairs.append((pairs[0][0][:2], pairs[0][1]))
    return pairs


def test_local_motion_of_all_pairs_at_once_on_torch_gives_each_pairs_own():
    torch = pytest.importorskip("torch")
    from napari_spine_tracker.core.link import _local_motion, _local_motions, _local_motions_on

    pairs = _deformed_pairs()
    each = [_local_motion(s, t, 3.0, 4.0) for s, t in pairs]
    assert all(np.abs(m).max() > 0.5 for m in each[:3]) and not each[3].any()
    np.testing.assert_array_equal(np.vstack(_local_motions(pairs, 3.0, 4.0)), np.vstack(each))  # threads
    # votes padded to one width, in calls of a few rows: the same modes within the climb's 1e-3 µm stop
    for rows in (1 << 15, 7):
        together = _local_motions_on(torch.device("cpu"), pairs, 3.0, 4.0, rows_per_call=rows)
        assert [m.shape for m in together] == [m.shape for m in each]
        np.testing.assert_allclose(np.vstack(together), np.vstack(each), atol=2e-3)


@pytest.mark.cuda
def test_linking_with_its_local_motion_on_cuda_gives_the_cpu_links():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from napari_spine_tracker.core.link import _local_motion, _local_motions_on

    pairs = _deformed_pairs()
    on_gpu = _local_motions_on(torch.device("cuda"), pairs, 3.0, 4.0)
    np.testing.assert_allclose(np.vstack(on_gpu), np.vstack([_local_motion(s, t, 3.0, 4.0) for s, t in pairs]),
                               atol=2e-3)
    # three sessions of a field that moves and deforms each time (registration says nothing)
    first = scattered_spines(60, seed=4)
    step_y = 11.0 + 3.0 * np.sin(first[:, 2] / 40)  # voxels: 1.1 µm, and up to 0.3 µm more or less
    sessions = [first + t * np.column_stack([0 * step_y, step_y, 0 * step_y]) for t in range(3)]
    det = pd.concat([pd.DataFrame(p, columns=["z", "y", "x"]).assign(t=t, score=0.9) for t, p in enumerate(sessions)],
                    ignore_index=True)
    on_cpu = link_detections(det, VOXEL)
    assert on_cpu["track_id"].nunique() == 60  # (83 without the local motion)
    pd.testing.assert_frame_equal(link_detections(det, VOXEL, device=torch.device("cuda")), on_cpu, atol=1e-3)


def test_votes_heard_are_packed_row_by_row():
    from napari_spine_tracker.core.link import _heard

    # source 0 casts votes 0, 1; source 1 none; source 2 casts vote 2; source 3 casts votes 3, 4, 5
    valid = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=bool)
    # neighbours (slots 0, 1): 0 hears 0 and 3; 1 hears 1 and 2; 2 hears nobody; 3 hears 3 only
    near = np.array([[0, 3], [1, 2], [0, 0], [3, 0]])
    found = np.array([[1, 1], [1, 1], [0, 0], [1, 0]], dtype=bool)
    rows, places, slots, votes = _heard(valid, found, near)
    packed = np.full((4, places.max() + 1), -1)
    packed[rows, places] = votes
    np.testing.assert_array_equal(packed, [[0, 1, 3, 4, 5], [2, -1, -1, -1, -1],
                                           [-1, -1, -1, -1, -1], [3, 4, 5, -1, -1]])
    np.testing.assert_array_equal(slots, [0, 0, 1, 1, 1, 1, 0, 0, 0])


def test_a_suggestion_takes_the_track_expected_where_it_lies():
    from napari_spine_tracker.core.link import suggested_tracks
    from napari_spine_tracker.core.register import RigidMotion

    voxel = (0.5, 0.1, 0.1)
    # spine 1 is missed in session 1; spine 2 is seen throughout; spine 3 is lost after session 0;
    # spine 4 is first seen in session 3: expected in session 1 only if one session may be missed between
    spines = pd.DataFrame({"track_id": [1, 1, 2, 2, 2, 3, 4], "t": [0, 2, 0, 1, 2, 0, 3],
                           "z": [5.0] * 7, "y": [10.0, 14.0, 40.0, 40.0, 40.0, 70.0, 100.0],
                           "x": [10.0] * 7})
    suggestions = pd.DataFrame({"t": [1, 1, 1, 1, 1], "z": [5.0] * 5, "y": [12.5, 40.0, 71.0, 100.0, 150.0],
                                "x": [10.0] * 5, "score": [0.3] * 5})
    # spine 1 expected at y 12 (between 10 and 14); 2 has a point there; 3 where it was; 4 too far in time
    found = suggested_tracks(spines, suggestions, voxel, gate_um=1.0, max_gap=0)
    np.testing.assert_array_equal(found, [1, 0, 3, 0, 0])
    np.testing.assert_array_equal(suggested_tracks(spines, suggestions, voxel, gate_um=1.0, max_gap=1),
                                  [1, 0, 3, 4, 0])
    # one suggestion per track: of two near spine 1's expected place, the nearer takes it
    two = pd.concat([suggestions.iloc[:1], suggestions.iloc[:1].assign(y=12.1)], ignore_index=True)
    np.testing.assert_array_equal(suggested_tracks(spines, two, voxel, gate_um=1.0, max_gap=0), [0, 1])
    # the field moved 30 pixels in y in session 1: registration moves the expected places with it
    motion = RigidMotion.translation(np.array([[0, 0, 0], [0, 30, 0], [0, 0, 0], [0, 0, 0]], float), voxel)
    moved = suggestions.assign(y=suggestions["y"] + 30)
    np.testing.assert_array_equal(suggested_tracks(spines, moved, voxel, motion=motion, gate_um=1.0, max_gap=0),
                                  [1, 0, 3, 0, 0])
    # without it, the one moved onto spine 3's old place would be taken for spine 3
    np.testing.assert_array_equal(suggested_tracks(spines, moved, voxel, gate_um=1.0, max_gap=0), [0, 3, 0, 0, 0])
    assert len(suggested_tracks(spines, suggestions.iloc[:0], voxel)) == 0


def test_a_track_vouches_for_its_dim_sessions_when_its_mean_score_is_high():
    from napari_spine_tracker.core.link import vouched_by_track

    table = pd.DataFrame({"track_id": [1, 1, 1, 2, 2, 3, 3, 4],
                          "score": [0.6, 0.6, 0.35, 0.35, 0.38, 0.42, 0.30, 0.36]})
    # 1: mean 0.52 keeps its 0.35; 2: dim throughout; 3: one strong peak does not vouch for a weak
    # one (mean 0.36); 4: a lone dim peak
    assert vouched_by_track(table, 0.4).tolist() == [True, True, True, False, False, True, False, False]
    assert vouched_by_track(table, 0.4, mean_above=0.15).tolist() == [True, True, False, False, False, True,
                                                                      False, False]


def _pool_works_in_a_child(queue):
    from napari_spine_tracker.core.devices import thread_pool

    queue.put(list(thread_pool().map(abs, [-1, -2, -3])))


def test_linking_threads_are_kept_and_a_forked_process_gets_its_own():
    """The pool linking's local motion runs on is made once per process; a forked batch worker
    cannot use its parent's (its threads are not in the child) and gets a working one."""
    import multiprocessing
    import queue as queues
    import threading

    from napari_spine_tracker.core.devices import thread_pool, usable_cores

    pool = thread_pool()
    assert thread_pool() is pool and pool._max_workers == usable_cores()
    together = threading.Barrier(usable_cores())

    def met(k):  # every thread of the pool started at once, all idle after
        together.wait(timeout=30)
        return k

    assert list(pool.map(met, range(usable_cores()))) == list(range(usable_cores()))
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this platform")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_pool_works_in_a_child, args=(results,))
    child.start()
    try:
        assert results.get(timeout=30) == [1, 2, 3]
    except queues.Empty:
        pytest.fail("the forked process's jobs never ran: it was given its parent's threads")
    finally:
        child.kill()
        child.join(timeout=30)
