"""Training patches and batches (core/batches.py): crops, labels carried into patches, batch arrays."""

import numpy as np
import pandas as pd
import pytest

from napari_spine_tracker.core.batches import (
    PatchOptions,
    PreparedSeries,
    _positions_in,
    crop,
    make_batch,
    sample_patch,
)
from napari_spine_tracker.core.targets import SessionPoints, make_targets

VOXEL = (0.5, 0.1, 0.1)


def test_crop_fills_what_lies_outside_the_volume():
    volume = np.arange(4 * 5 * 6, dtype=np.float16).reshape(4, 5, 6)
    inside = crop(volume, (1, 1, 2), (2, 3, 3))
    np.testing.assert_array_equal(inside, volume[1:3, 1:4, 2:5].astype(np.float32))
    assert inside.dtype == np.float32
    edge = crop(volume, (-1, 3, 4), (3, 4, 4), fill=-7.0)
    assert np.all(edge[0] == -7) and np.all(edge[:, 2:] == -7) and np.all(edge[:, :, 2:] == -7)
    np.testing.assert_array_equal(edge[1:, :2, :2], volume[:2, 3:5, 4:6])
    out = np.full((2, 2, 2), 99, np.float32)  # a reused buffer: every voxel is written
    assert crop(volume, (10, 0, 0), (2, 2, 2), fill=0.5, out=out) is out
    assert np.all(out == 0.5)
    crop(volume, (3, 4, 5), (2, 2, 2), fill=0.0, out=out)
    assert out[0, 0, 0] == volume[3, 4, 5] and np.count_nonzero(out) == 1


@pytest.mark.parametrize("seed", range(5))
def test_positions_in_agrees_with_a_dictionary_lookup(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, size=rng.integers(0, 25))  # repeats on purpose
    wanted = rng.integers(1, 40, size=20)
    found, where = _positions_in(ids, wanted)
    lookup = {track: i for i, track in enumerate(ids)}  # the last occurrence wins
    assert found.tolist() == [w in lookup for w in wanted]
    assert where.tolist() == [lookup[w] for w in wanted if w in lookup]


def _series(labels: pd.DataFrame, sessions: int = 3, shape=(16, 48, 48)) -> PreparedSeries:
    image = np.zeros((sessions, *shape), np.float16)
    return PreparedSeries(image, labels, np.zeros((sessions, 3)), np.ones(sessions, bool))


def test_patch_labels_carry_their_displacement_to_the_previous_session():
    labels = pd.DataFrame({
        "track_id": [1, 1, 2, 1, 3],
        "t": [0, 1, 1, 2, 2],
        "z": [8.0, 8.0, 9.0, 7.0, 8.0],
        "y": [24.0, 26.0, 30.0, 27.0, 20.0],
        "x": [24.0, 25.0, 18.0, 25.0, 20.0],
        "radius_um": [0.4, 0.45, 0.3, 0.5, np.nan],
    })
    # position in the previous session minus here, µm (z, y, x); NaN where the spine is new
    expected = {(1, 1): [0.0, -0.2, -0.1], (1, 2): [0.5, -0.1, 0.0], (2, 1): [np.nan] * 3, (3, 2): [np.nan] * 3}
    options = PatchOptions(shape=(16, 48, 48), sessions=3, jitter_um=0.0, near_label_fraction=1.0, augment=False)
    rng = np.random.default_rng(0)
    for _ in range(5):
        image, points, labelled = sample_patch(_series(labels), rng, options, VOXEL)
        assert image.shape == (3, 1, 16, 48, 48) and labelled.tolist() == [True] * 3
        assert np.isnan(points[0].displacement_um).all()  # the first session of a patch has no previous one
        # no drift and no jitter: every session is cut at the same origin
        origin = np.array([8.0, 24.0, 24.0]) - points[0].zyx[0]
        seen = set()
        for t in (1, 2):
            for zyx, disp, radius in zip(points[t].zyx, points[t].displacement_um, points[t].radius_um):
                row = labels[(labels["t"] == t) & np.all(np.isclose(labels[["z", "y", "x"]], zyx + origin), axis=1)]
                assert len(row) == 1
                track = int(row["track_id"].iloc[0])
                np.testing.assert_allclose(disp, expected[(track, t)], atol=1e-9)
                np.testing.assert_equal(radius, row["radius_um"].iloc[0])
                seen.add((track, t))
        assert seen == set(expected)


def _patches(rng, count=3, sessions=2, points=4):
    patches = []
    for i in range(count):
        pts = []
        for _ in range(sessions):
            disp = rng.normal(size=(points, 3))
            disp[rng.random(points) < 0.3] = np.nan  # spines new in this session
            radius = rng.uniform(0.2, 0.5, points)
            radius[rng.random(points) < 0.3] = np.nan  # unknown head sizes
            pts.append(SessionPoints(rng.uniform(0, 1, (points, 3)) * [8, 16, 16], disp, radius))
        pts[0] = SessionPoints(np.vstack([pts[0].zyx, pts[0].zyx[:1] + 0.1]),  # two spines in one centre voxel
                               np.vstack([pts[0].displacement_um, [[np.nan] * 3]]), np.append(pts[0].radius_um, 0.3))
        image = rng.normal(size=(sessions, 1, 8, 16, 16)).astype(np.float32)
        patches.append((image, pts, np.array([True, i > 0])))
    return patches


def test_batch_targets_at_the_centres_hold_what_the_dense_targets_hold():
    patches = _patches(np.random.default_rng(1))
    batch = make_batch(patches, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2))
    assert batch["centre"].shape[1] == 5 and batch["centre"].dtype == np.int64
    for i, (image, points, mask) in enumerate(patches):
        dense = make_targets(points, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2))
        np.testing.assert_array_equal(batch["heatmap"][i], dense["heatmap"])
        np.testing.assert_array_equal(batch["image"][i], image)
        np.testing.assert_array_equal(batch["labelled"][i], mask.astype(np.float32))
        rows = batch["centre"][:, 0] == i
        t, z, y, x = batch["centre"][rows, 1:].T
        # every centre voxel once, and nothing outside them
        assert len(set(zip(t, z, y, x))) == rows.sum() == dense["centre"].sum()
        for name in ("offset", "displacement", "size", "has_previous", "has_size"):
            channels = dense[name].shape[1]
            at_centres = np.moveaxis(dense[name], 1, -1)[t, z, y, x].reshape(-1, channels)
            np.testing.assert_array_equal(batch[name][rows].reshape(-1, channels), at_centres, err_msg=name)
    assert batch["has_size"].sum() > 0 and 0 < batch["has_previous"].sum() < len(batch["has_previous"])


def test_a_batch_without_spines_has_no_centres():
    patches = [(np.zeros((2, 1, 8, 16, 16), np.float32), [SessionPoints.empty()] * 2, np.array([True, True]))]
    batch = make_batch(patches, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2))
    assert batch["centre"].shape == (0, 5) and batch["offset"].shape == (0, 3) and batch["size"].shape == (0,)
    assert not batch["heatmap"].any()
    # and the loss of such a batch (a fine-tuning patch drawn where nobody marked a spine) is the
    # heatmap's alone: it once failed to reshape the empty size rows
    import torch

    from napari_spine_tracker.core.train import compute_loss

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    outputs = {name: torch.zeros((1, 2, c, 8, 8, 8)) for name, c in
               (("heatmap", 1), ("offset", 3), ("displacement", 3), ("size", 1))}
    loss, parts = compute_loss(outputs, tensors)
    assert torch.isfinite(loss) and parts["offset"] == parts["displacement"] == parts["size"] == 0.0
    assert parts["focal"] > 0


def _batch_and_outputs(seed: int):
    """Random patches, their batch as tensors, and random network outputs of the batch's shape."""
    import torch

    rng = np.random.default_rng(seed)
    patches = _patches(rng)
    batch = {k: torch.from_numpy(v) for k, v in make_batch(patches, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2)).items()}
    outputs = {name: torch.from_numpy(rng.normal(size=(3, 2, c, 8, 8, 8)).astype(np.float32))
               for name, c in (("heatmap", 1), ("offset", 3), ("displacement", 3), ("size", 1))}
    return patches, batch, outputs


def test_the_loss_at_the_centres_equals_the_loss_over_dense_targets():
    """compute_loss reads the heads at the centres; the dense masked mean it replaced gives the same."""
    import torch

    from napari_spine_tracker.core.train import compute_loss

    patches, batch, outputs = _batch_and_outputs(2)
    _, parts = compute_loss(outputs, batch)
    dense = {name: torch.from_numpy(np.stack([make_targets(p, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2))[name]
                                              for _, p, _ in patches]))
             for name in ("offset", "displacement", "size", "centre", "has_previous", "has_size")}
    session = batch["labelled"][:, :, None, None, None, None]
    for name, mask_name in (("offset", "centre"), ("displacement", "has_previous"), ("size", "has_size")):
        mask = dense[mask_name] * session
        expected = ((outputs[name] - dense[name]).abs() * mask).sum() / mask.sum().clamp(min=1.0)
        assert parts[name] == pytest.approx(float(expected), rel=1e-5), name


def test_hard_negatives_weigh_the_negative_term_at_their_place_only():
    from napari_spine_tracker.core.targets import negative_weights

    sessions = [SessionPoints(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.array([[4.0, 8.5, 8.5]])),
                SessionPoints.empty()]
    into = np.empty((2, 1, 8, 8, 8), np.float32)
    weights = negative_weights(sessions, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2), 5.0, into)
    # the point lies exactly on output voxel (4, 4, 4): full weight there, falling off around it
    assert weights[0, 0, 4, 4, 4] == pytest.approx(5.0)
    assert 1.0 < weights[0, 0, 4, 4, 5] < 5.0 and 1.0 < weights[0, 0, 5, 4, 4] < 5.0
    assert weights[0, 0, 0, 0, 0] == pytest.approx(1.0, abs=1e-3) and np.all(weights[1] == 1.0)
    assert weights.min() >= 1.0


def test_a_batch_carries_negative_weights_only_when_asked():
    patches = _patches(np.random.default_rng(3))
    negatives = [(image, [SessionPoints(p.zyx, p.displacement_um, p.radius_um, np.array([[3.0, 6.5, 6.5]]))
                          for p in points], mask) for image, points, mask in patches]
    plain = make_batch(negatives, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2))
    weighted = make_batch(negatives, (8, 8, 8), (1, 2, 2), (0.5, 0.2, 0.2), negative_weight=3.0)
    assert "negative_weight" not in plain
    assert weighted["negative_weight"].shape == weighted["heatmap"].shape
    assert weighted["negative_weight"].max() == pytest.approx(3.0)
    for name, value in plain.items():  # nothing else changes
        np.testing.assert_array_equal(weighted[name], value, err_msg=name)


def test_the_negative_weight_scales_the_negative_loss_voxel_by_voxel():
    import torch

    from napari_spine_tracker.core.train import compute_loss

    _, batch, outputs = _batch_and_outputs(4)
    _, plain = compute_loss(outputs, batch)
    _, ones = compute_loss(outputs, {**batch, "negative_weight": torch.ones_like(batch["heatmap"])})
    assert ones == plain
    # one background voxel of a labelled session weighted 10x: the focal loss grows by 9x its term
    b, t = map(int, np.argwhere(batch["labelled"].numpy() > 0)[0])
    voxel = (b, t, 0, *map(int, np.argwhere(batch["heatmap"][b, t, 0].numpy() == 0)[0]))
    weight = torch.ones_like(batch["heatmap"])
    weight[voxel] = 10.0
    _, weighted = compute_loss(outputs, {**batch, "negative_weight": weight})
    logit = outputs["heatmap"][voxel]
    term = -torch.nn.functional.logsigmoid(-logit) * torch.sigmoid(logit) ** 2
    n_pos = float((batch["heatmap"] >= 1.0).float().mul(batch["labelled"][:, :, None, None, None, None]).sum())
    assert weighted["focal"] - plain["focal"] == pytest.approx(9 * float(term) / n_pos, rel=1e-4)
    assert {k: v for k, v in weighted.items() if k != "focal"} == {k: v for k, v in plain.items() if k != "focal"}


def test_patches_carry_the_series_distractors_where_the_image_has_them():
    """A distractor is a bright voxel here; through the crop, flips and swaps of many patches it
    stays on the patch's brightest voxel."""
    image = np.zeros((3, 16, 40, 40), np.float16)
    spots = np.array([[7.0, 20.0, 23.0], [8.0, 21.0, 22.0], [6.0, 19.0, 21.0]])  # one per session (drifting)
    for t, (z, y, x) in enumerate(spots.astype(int)):
        image[t, z, y, x] = 1.0
    labels = pd.DataFrame({"track_id": [1, 1, 1], "t": [0, 1, 2], "z": spots[:, 0], "y": spots[:, 1] + 4,
                           "x": spots[:, 2], "radius_um": np.nan})
    series = PreparedSeries(image, labels, drift_vox=spots - spots[0], labelled=np.ones(3, bool),
                            distractors=[s[None] for s in spots])
    rng = np.random.default_rng(5)
    seen = 0
    for _ in range(20):
        patch, points, _ = sample_patch(series, rng, PatchOptions(shape=(8, 16, 16), sessions=2, jitter_um=0.0),
                                        VOXEL)
        for t, p in enumerate(points):
            if len(p.negatives):
                seen += 1
                brightest = np.unravel_index(np.argmax(patch[t, 0]), patch.shape[2:])
                assert brightest == tuple(np.round(p.negatives[0]).astype(int))
    assert seen > 10
