"""Dendrite length and spine head size from images (core/morphology.py).

Run as a script for the accuracy study reported to the lead (several seeds and presets, minutes)::

    .venv/bin/python tests/test_morphology.py --seeds 6 --presets default crowded low_snr
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats
from skimage.draw import line_nd

from napari_spine_tracker.core.morphology import (
    DendriteSkeleton,
    dendrite_skeleton,
    measure_series,
    skeleton_length_um,
    spine_head_sizes,
)
from napari_spine_tracker.errors import Cancelled, InputError

VOXEL = (0.5, 0.1, 0.1)


def draw(shape, *segments) -> np.ndarray:
    skeleton = np.zeros(shape, bool)
    for start, stop in segments:
        skeleton[line_nd(start, stop, endpoint=True)] = True
    return skeleton


@pytest.mark.parametrize(("stop", "length_um"), [
    ((2, 5, 80), 7.5),                       # along x
    ((2, 85, 85), 80 * np.sqrt(2) * 0.1),    # diagonal in y, x: a staircase of voxel steps
    ((18, 5, 45), np.hypot(16 * 0.5, 40 * 0.1)),  # z steps are five times longer
])
def test_skeleton_length_of_lines(stop, length_um):
    skeleton = draw((20, 90, 90), ((2, 5, 5), stop))
    measured, points, pieces = skeleton_length_um(skeleton, VOXEL)
    assert pieces == 1 and len(points) == skeleton.sum()
    assert measured == pytest.approx(length_um, rel=0.03)


def test_pruning_removes_short_spurs_and_pieces():
    main, spur = ((5, 10, 5), (5, 10, 85)), ((5, 10, 40), (5, 22, 40))   # spur: 1.2 µm
    far = ((5, 60, 10), (5, 60, 25))                                      # a 1.5 µm piece
    skeleton = draw((10, 70, 90), main, spur, far)
    total, _, pieces = skeleton_length_um(skeleton, VOXEL, smooth_um=0)
    assert pieces == 2 and total == pytest.approx(8.0 + 1.2 + 1.5, abs=0.15)
    pruned, points, pieces = skeleton_length_um(skeleton, VOXEL, prune_um=2.0, min_piece_um=2.0, smooth_um=0)
    assert pieces == 1 and pruned == pytest.approx(8.0, abs=0.1)
    assert points[:, 1].max() == 10  # the spur's voxels are gone


def test_a_spine_next_to_the_end_does_not_take_the_end_with_it():
    # the shaft (4.5 µm) ends 0.5 µm after a 1.5 µm spur: the shorter branch goes, the spur then
    # is the shaft's end and stays (pruning both would cut the shaft to 4.0 µm)
    skeleton = draw((10, 40, 90), ((5, 10, 5), (5, 10, 50)), ((5, 10, 45), (5, 25, 45)))
    pruned, _, _ = skeleton_length_um(skeleton, VOXEL, prune_um=2.0, smooth_um=0)
    assert pruned == pytest.approx(4.0 + 1.5, abs=0.05)


def tube_phantom(head_radii_um, rng, *, brightness=1000.0, offset=100.0):
    """A straight shaft along x (radius 0.5 µm) with spines (neck 0.8 µm) of the given head radii."""
    shape = (24, 80, 40 + 40 * len(head_radii_um))
    z, y, x = (np.indices(shape) * np.reshape(VOXEL, (3, 1, 1, 1)))
    centre_z, centre_y = 6.0, 2.0
    volume = (np.hypot(z - centre_z, y - centre_y) <= 0.5).astype(float)
    heads = []
    for i, radius in enumerate(head_radii_um):
        x_um = 4.0 + 4.0 * i
        head_y = centre_y + 0.5 + 0.8 + radius
        volume[(np.abs(x - x_um) <= 0.07) & (np.abs(z - centre_z) <= 0.1) & (y > centre_y) & (y < head_y)] = 1
        volume[(z - centre_z) ** 2 + (y - head_y) ** 2 + (x - x_um) ** 2 <= radius**2] = 1
        heads.append((centre_z / VOXEL[0], head_y / VOXEL[1], x_um / VOXEL[2]))
    volume = ndimage.gaussian_filter(volume, np.array([0.9, 0.15, 0.15]) / VOXEL)
    image = rng.poisson(offset + brightness * volume).astype(np.float32)
    return image, np.array(heads)


def test_head_size_grows_with_the_head_and_ignores_brightness(rng):
    radii = np.array([0.2, 0.3, 0.4, 0.5, 0.6])
    image, heads = tube_phantom(radii, rng)
    skeleton = dendrite_skeleton(image, VOXEL)
    assert skeleton.length_um == pytest.approx(image.shape[2] * VOXEL[2], rel=0.15)
    sizes = spine_head_sizes(image, heads, VOXEL, skeleton=skeleton)
    assert list(sizes.columns) == ["head_integrated", "shaft_brightness", "head_size_um3"]
    assert stats.spearmanr(sizes["head_size_um3"], radii).statistic == pytest.approx(1.0)
    assert stats.pearsonr(sizes["head_size_um3"], radii**3).statistic > 0.95
    # a session twice as bright (same offset): the same sizes, twice the integrated fluorescence
    brighter, _ = tube_phantom(radii, np.random.default_rng(1), brightness=2000.0)
    twice = spine_head_sizes(brighter, heads, VOXEL, skeleton=dendrite_skeleton(brighter, VOXEL))
    np.testing.assert_allclose(twice["head_size_um3"], sizes["head_size_um3"], rtol=0.1)
    np.testing.assert_allclose(twice["head_integrated"], 2 * sizes["head_integrated"], rtol=0.15)


def test_head_size_without_a_shaft_is_nan(rng):
    image = rng.poisson(100.0, (10, 30, 30)).astype(np.float32)
    empty = DendriteSkeleton(np.zeros((0, 3)), 0.0, 0)
    sizes = spine_head_sizes(image, [[5, 15, 15]], VOXEL, skeleton=empty)
    assert np.isnan(sizes["head_size_um3"]).all() and np.isfinite(sizes["head_integrated"]).all()


def test_bad_input(rng):
    with pytest.raises(InputError, match=r"\(Z, Y, X\)"):
        dendrite_skeleton(np.zeros((10, 10)), VOXEL)
    with pytest.raises(InputError, match="voxel size"):
        dendrite_skeleton(np.zeros((4, 10, 10)), (0.5, 0.1))
    with pytest.raises(InputError, match=r"\(T, Z, Y, X\)"):
        measure_series(np.zeros((4, 10, 10)), VOXEL)


@pytest.fixture(scope="module")
def synthetic():
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    return synthesize_series(SynthConfig.preset("default", seed=2, sessions=2, shape=(24, 200, 200)))


def test_length_and_sizes_on_a_synthetic_series(synthetic):
    calls = []
    lengths, sizes = measure_series(synthetic.image, synthetic.voxel_size_um, synthetic.truth,
                                    progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]
    np.testing.assert_allclose(lengths, synthetic.session_dendrite_length_um, rtol=0.15)
    assert len(sizes) == len(synthetic.truth)
    merged = sizes.merge(synthetic.truth[["track_id", "t", "head_radius_um"]], on=["track_id", "t"])
    assert stats.spearmanr(merged["head_size_um3"], merged["head_radius_um"] ** 3).statistic > 0.6
    first = merged.sort_values("t").groupby("track_id").first()
    np.testing.assert_allclose(first["size_change"], 1.0)


def test_measure_series_stops_when_asked(synthetic):
    with pytest.raises(Cancelled):
        measure_series(synthetic.image, synthetic.voxel_size_um, should_stop=lambda: True)


# --------------------------------------------------------------------------------------------
# accuracy study (not a test): python tests/test_morphology.py


def accuracy_study(seeds: int, presets: list[str]) -> pd.DataFrame:
    """Relative dendrite-length error and head-size correlations, per preset and seed."""
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    rows = []
    for preset in presets:
        for seed in range(seeds):
            series = synthesize_series(SynthConfig.preset(preset, seed=seed))
            lengths, sizes = measure_series(series.image, series.voxel_size_um, series.truth)
            merged = sizes.merge(series.truth[["track_id", "t", "head_radius_um"]], on=["track_id", "t"])
            merged = merged.dropna(subset=["head_size_um3"]).sort_values(["track_id", "t"])
            cube = merged["head_radius_um"] ** 3
            # change relative to the spine's first session, against the generator's volume ratio
            by_track = merged.groupby("track_id")
            later = merged[merged["t"] > by_track["t"].transform("min")]
            true_change = (later["head_radius_um"] / by_track["head_radius_um"].transform("first")[later.index]) ** 3
            error = lengths / series.session_dendrite_length_um - 1
            rows.append({"preset": preset, "seed": seed, "sessions": len(lengths),
                         "length_error_mean": error.mean(), "length_error_abs_mean": np.abs(error).mean(),
                         "length_error_abs_max": np.abs(error).max(), "spines": len(merged),
                         "pearson_r3": stats.pearsonr(merged["head_size_um3"], cube).statistic,
                         "spearman_r3": stats.spearmanr(merged["head_size_um3"], cube).statistic,
                         "pearson_change": stats.pearsonr(later["size_change"], true_change).statistic,
                         "spearman_change": stats.spearmanr(later["size_change"], true_change).statistic})
            row = rows[-1]
            print(f"{preset} seed {seed}: length error mean {row['length_error_mean']:+.3f} "
                  f"(|max| {row['length_error_abs_max']:.3f}); head size vs r^3: Pearson "
                  f"{row['pearson_r3']:.3f}, Spearman {row['spearman_r3']:.3f} ({row['spines']} spine-sessions); "
                  f"size change: Pearson {row['pearson_change']:.3f}, Spearman {row['spearman_change']:.3f}")
    return pd.DataFrame(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--presets", nargs="+", default=["default"])
    args = parser.parse_args()
    table = accuracy_study(args.seeds, args.presets)
    summary = table.groupby("preset").agg(
        sessions=("sessions", "sum"), length_error_mean=("length_error_mean", "mean"),
        length_error_abs_mean=("length_error_abs_mean", "mean"), length_error_abs_max=("length_error_abs_max", "max"),
        pearson_r3=("pearson_r3", "mean"), spearman_r3=("spearman_r3", "mean"),
        pearson_change=("pearson_change", "mean"), spearman_change=("spearman_change", "mean"))
    print("\nper preset (means over seeds; errors relative to the generator's dendrite_length_um):")
    print(summary.to_string(float_format="%.3f"))
