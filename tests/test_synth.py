"""The synthetic data engine: determinism, truth semantics, physics sanity, presets, randomisation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from napari_spine_tracker.core.link import DEFAULT_MAX_GAP
from napari_spine_tracker.core.synth import (
    KEPT_ID_GAP,
    PRESETS,
    RANDOM_RANGES,
    SynthConfig,
    SynthSeries,
    session_counts,
    synthesize_series,
)
from napari_spine_tracker.core.synth_geometry import SPINE_KINDS
from napari_spine_tracker.errors import InputError
from napari_spine_tracker.io.tables import REQUIRED_COLUMNS, validate_spine_table

SMALL = dict(sessions=4, shape=(16, 80, 80))


@pytest.fixture(scope="module")
def series() -> SynthSeries:
    return synthesize_series(SynthConfig.preset("default", seed=3, **SMALL))


def _filled_existence(truth: pd.DataFrame) -> dict[int, set[int]]:
    """Sessions in which each track exists: its rows with single-session gaps filled."""
    return {tid: set(range(g["t"].min(), g["t"].max() + 1)) for tid, g in truth.groupby("track_id")}


def test_same_seed_same_series_and_other_seed_differs():
    a = synthesize_series(SynthConfig.preset("tiny", seed=5))
    b = synthesize_series(SynthConfig.preset("tiny", seed=5))
    c = synthesize_series(SynthConfig.preset("tiny", seed=6))
    np.testing.assert_array_equal(a.image, b.image)
    pd.testing.assert_frame_equal(a.truth, b.truth)
    pd.testing.assert_frame_equal(a.distractors, b.distractors)
    np.testing.assert_array_equal(a.drift_um, b.drift_um)
    assert not np.array_equal(a.image, c.image)


def test_shapes_dtypes_and_columns(series):
    cfg = series.config
    assert series.image.shape == (cfg.sessions, *cfg.shape)
    assert series.image.dtype == np.uint16
    assert series.voxel_size_um == cfg.voxel_size_um
    assert series.drift_um.shape == (cfg.sessions, 3)
    truth = series.truth
    assert list(truth.columns[: len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    for col in ("head_radius_um", "kind", "dendrite_id"):
        assert col in truth.columns
    assert (truth["score"] == 1.0).all()
    assert (truth["status"] == "confirmed").all()
    assert set(truth["kind"]) <= set(SPINE_KINDS)
    assert truth["head_radius_um"].between(0.05, 2.0).all()
    pd.testing.assert_frame_equal(validate_spine_table(truth), truth)   # a valid spine table as it stands
    assert list(series.distractors.columns[:5]) == ["t", "z", "y", "x", "kind"]
    assert set(series.distractors["kind"]) <= {"bouton", "varicosity"}
    assert len(truth) > 5
    assert series.dendrite_length_um > 0


def test_truth_and_distractors_lie_inside_the_volume(series):
    shape = np.array(series.config.shape)
    for table in (series.truth, series.distractors):
        zyx = table[["z", "y", "x"]].to_numpy()
        assert (zyx >= 0).all()
        assert (zyx <= shape - 1).all()
        assert table["t"].between(0, series.config.sessions - 1).all()


def test_track_ids_persist_and_follow_the_gap_rule():
    cfg = SynthConfig.preset("default", seed=11, sessions=7, shape=(12, 64, 64), spine_gain_probability=0.2,
                             spine_loss_probability=0.2, transient_miss_probability=0.3)
    truth = synthesize_series(cfg).truth
    ids = np.sort(truth["track_id"].unique())
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    assert not truth.duplicated(["track_id", "t"]).any()
    gaps = 0
    for _, g in truth.groupby("track_id"):
        steps = np.diff(np.sort(g["t"].to_numpy()))
        assert (steps <= KEPT_ID_GAP + 1).all(), "a track may only miss up to KEPT_ID_GAP sessions"
        gaps += int((steps == 2).sum())
    assert gaps > 0, "with a 30% miss rate some spines must be missed"
    # a miss is never two sessions in a row and never the first or last of a track (by construction of
    # the rows, a gap always has rows on both sides); what is filled is the existence
    existence = _filled_existence(truth)
    rows = truth.groupby("track_id")["t"].apply(set).to_dict()
    for tid, sessions in existence.items():
        missing = sessions - rows[tid]
        assert all(t - 1 in rows[tid] and t + 1 in rows[tid] for t in missing)


def test_a_spine_out_of_the_field_keeps_its_id_over_two_sessions_not_three():
    # a small field under large drift: spines leave the field and come back (no transient misses,
    # so every gap is time spent outside the field)
    cfg = SynthConfig.preset("large_drift", seed=0, sessions=8, shape=(12, 64, 64), transient_miss_probability=0.0)
    truth = synthesize_series(cfg).truth
    assert KEPT_ID_GAP == DEFAULT_MAX_GAP, "the truth keeps ids over the gap the tracker closes"
    kept = split = 0
    for _, g in truth.groupby("spine_id"):
        g = g.sort_values("t")
        steps = np.diff(g["t"].to_numpy())
        new_id = np.diff(g["track_id"].to_numpy()) != 0
        np.testing.assert_array_equal(new_id, steps > KEPT_ID_GAP + 1)
        kept += int((steps == KEPT_ID_GAP + 1).sum())
        split += int(new_id.sum())
    assert kept > 0 and split > 0, "this series has both kinds of absence"
    assert truth.groupby("track_id")["spine_id"].nunique().eq(1).all()


def test_without_misses_or_motion_every_track_is_one_unbroken_run():
    cfg = SynthConfig.preset("default", seed=2, sessions=6, shape=(12, 64, 64), transient_miss_probability=0.0,
                             drift_um=0.0, drift_z_um=0.0, deformation_um=0.0, spine_loss_probability=0.3,
                             spine_gain_probability=0.3)
    series = synthesize_series(cfg)
    for _, g in series.truth.groupby("track_id"):
        ts = np.sort(g["t"].to_numpy())
        np.testing.assert_array_equal(ts, np.arange(ts[0], ts[-1] + 1))
    meta = series.metadata()
    assert meta["gained"] > 0 and meta["lost"] > 0
    # without motion a track is exactly one spine: gains and losses are biology, not the field of view
    assert series.truth.groupby("track_id")["spine_id"].nunique().eq(1).all()


def test_metadata_counts_match_the_truth_table(series):
    meta = series.metadata()
    json.dumps(meta)   # JSON-able
    truth = series.truth
    existence = _filled_existence(truth)
    first = {tid: min(s) for tid, s in existence.items()}
    last = {tid: max(s) for tid, s in existence.items()}
    for entry in meta["sessions"]:
        t = entry["t"]
        assert entry["present"] == int((truth["t"] == t).sum())
        assert entry["gained"] == (sum(1 for v in first.values() if v == t) if t else 0)
        assert entry["lost"] == (sum(1 for v in last.values() if v == t - 1) if t else 0)
    assert meta["tracks"] == truth["track_id"].nunique()
    assert meta["rows"] == len(truth)
    assert meta["gained"] == sum(e["gained"] for e in meta["sessions"])
    assert SynthConfig(**meta["config"]) == series.config   # the config round-trips through JSON
    assert session_counts(truth, series.config.sessions) == meta["sessions"]


def test_drift_moves_truth_exactly_by_drift_um_without_deformation():
    cfg = SynthConfig.preset("large_drift", seed=4, sessions=4, shape=(16, 96, 96), deformation_um=0.0,
                             head_radius_change_fraction=0.0, transient_miss_probability=0.0)
    series = synthesize_series(cfg)
    voxel = np.array(series.voxel_size_um)
    um = series.truth.assign(zu=series.truth.z * voxel[0], yu=series.truth.y * voxel[1],
                             xu=series.truth.x * voxel[2])
    checked = 0
    for _, g in um.groupby("spine_id"):
        g = g.sort_values("t")
        for (_, a), (_, b) in zip(g.iloc[:-1].iterrows(), g.iloc[1:].iterrows(), strict=True):
            moved = np.array([b.zu - a.zu, b.yu - a.yu, b.xu - a.xu])
            np.testing.assert_allclose(moved, series.drift_um[b.t] - series.drift_um[a.t], atol=1e-6)
            checked += 1
    assert checked > 5
    np.testing.assert_array_equal(series.drift_um[0], 0.0)
    steps = np.linalg.norm(np.diff(series.drift_um[:, 1:], axis=0), axis=1)
    assert ((steps >= 1.5 - 1e-9) & (steps <= 4.5 + 1e-9)).all()   # 3 µm x U(0.5, 1.5) between sessions


def test_deformation_is_small_next_to_drift(series):
    voxel = np.array(series.voxel_size_um)
    errors = []
    for _, g in series.truth.groupby("spine_id"):
        g = g.sort_values("t")
        pos = g[["z", "y", "x"]].to_numpy() * voxel - series.drift_um[g["t"].to_numpy()]
        errors.append(np.linalg.norm(pos - pos[0], axis=1).max())
    # head-size changes and a smooth deformation of ~0.2 µm RMS: well under a micrometre
    assert np.median(errors) < 0.6


def test_heads_are_brighter_than_background(series):
    for t in range(series.config.sessions):
        image = ndi.gaussian_filter(series.image[t].astype(np.float32), (0.5, 1, 1))
        rows = series.truth[series.truth["t"] == t]
        at_heads = image[tuple(np.rint(rows[["z", "y", "x"]].to_numpy()).astype(int).T)]
        background = np.percentile(image, 50)
        noise = image[image < np.percentile(image, 50)].std() + 1
        assert np.median(at_heads) > background + 20 * noise
        assert np.percentile(at_heads, 10) > background + 5 * noise


def test_voxel_size_scales_the_objects():
    common = dict(seed=8, sessions=1, transient_miss_probability=0.0)
    fine = synthesize_series(SynthConfig.preset("default", shape=(12, 96, 96), voxel_size_um=(0.5, 0.1, 0.1), **common))
    coarse = synthesize_series(SynthConfig.preset("default", shape=(12, 48, 48), voxel_size_um=(0.5, 0.2, 0.2),
                                                  **common))
    # the same tissue (the field is the same in µm): the same spines at half the voxel coordinates
    merged = fine.truth.merge(coarse.truth, on=["spine_id", "t"], suffixes=("_f", "_c"))
    assert len(merged) >= 0.8 * min(len(fine.truth), len(coarse.truth)) > 3
    np.testing.assert_allclose(merged["x_c"] * 0.2, merged["x_f"] * 0.1, atol=1e-9)
    np.testing.assert_allclose(merged["y_c"] * 0.2, merged["y_f"] * 0.1, atol=1e-9)

    def bright_area(image):
        mip = ndi.gaussian_filter(image[0].max(axis=0).astype(np.float32), 1.0)
        base = np.percentile(mip, 10)
        return np.count_nonzero(mip > base + 0.3 * (mip.max() - base))

    ratio = bright_area(fine.image) / bright_area(coarse.image)
    assert 2.5 < ratio < 6.0   # 4 for an exact 2x scaling in x and y


def test_spines_point_sideways_and_up_or_down_in_z():
    truth = synthesize_series(SynthConfig.preset("default", seed=1, sessions=1, shape=(24, 128, 128))).truth
    assert (truth["pointing_z"] > 0.8).any()
    assert (truth["pointing_z"] < 0.3).any()


def test_head_sizes_change_between_sessions(series):
    changes = series.truth.groupby("spine_id")["head_radius_um"].agg(lambda r: r.max() / r.min())
    assert (changes > 1.02).mean() > 0.5


def test_preset_names_and_errors():
    for name in ("default", "large_drift", "low_snr", "crowded", "tiny", "sample", "other_microscope",
                 "second_microscope"):
        assert name in PRESETS
        assert SynthConfig.preset(name, seed=1).seed == 1
    assert SynthConfig.preset("tiny").shape == (12, 64, 64)
    assert SynthConfig.preset("large_drift").drift_um == 3.0
    with pytest.raises(InputError, match=r"default.*other_microscope"):
        SynthConfig.preset("nonsense")
    with pytest.raises(InputError, match="unknown SynthConfig parameter"):
        SynthConfig.preset("default", no_such_thing=1)
    with pytest.raises(InputError, match="must lie in"):
        SynthConfig(spine_loss_probability=1.5)
    with pytest.raises(InputError, match="sessions"):
        synthesize_series(sessions=0)
    with pytest.raises(InputError, match="low, high"):
        SynthConfig(head_radius_um_range=(0.5, 0.2))
    assert SynthConfig(shape=[4, 32, 32]).shape == (4, 32, 32)   # lists (from JSON) become tuples


@pytest.mark.parametrize("name", ["tiny", "other_microscope", "second_microscope"])
def test_presets_render(name):
    cfg = SynthConfig.preset(name, seed=2, sessions=2)
    series = synthesize_series(cfg)
    assert series.image.shape == (2, *cfg.shape)
    assert series.image.max() > series.image.min()


def test_faint_is_low_snr_light_with_small_heads_only():
    faint, low = SynthConfig.preset("faint", seed=3), SynthConfig.preset("low_snr", seed=3)
    assert (faint.brightness_photons, faint.background_photons) == (low.brightness_photons, low.background_photons)
    series = synthesize_series(faint.replace(sessions=2, shape=(12, 96, 96)))
    radius = series.truth["head_radius_um"]
    assert len(radius) > 5
    # drawn from 0.15-0.32 µm, then changed by at most head_radius_change_fraction between sessions
    assert radius.max() <= 0.32 * (1 + 3 * faint.head_radius_change_fraction)
    assert radius.median() < SynthConfig().head_radius_um_range[0] + 0.05


def test_random_is_deterministic_and_covers_its_ranges():
    assert SynthConfig.random(7) == SynthConfig.random(7)
    assert SynthConfig.random(7) != SynthConfig.random(8)
    assert SynthConfig.random(7, shape=(8, 32, 32), sessions=2).shape == (8, 32, 32)
    configs = [SynthConfig.random(seed) for seed in range(300)]

    def check(values, lo, hi):
        values = np.asarray(values, float)
        assert values.min() >= lo - 1e-9 and values.max() <= hi + 1e-9
        span = hi - lo
        assert values.min() < lo + 0.15 * span and values.max() > hi - 0.15 * span, (lo, hi)

    check([c.voxel_size_um[2] for c in configs], *RANDOM_RANGES["voxel_size_xy_um"])
    check([c.voxel_size_um[0] for c in configs], *RANDOM_RANGES["voxel_size_z_um"])
    assert all(c.voxel_size_um[1] == c.voxel_size_um[2] for c in configs)
    check([c.psf_fwhm_z_um / c.psf_fwhm_xy_um for c in configs], *RANDOM_RANGES["psf_fwhm_z_to_xy"])
    for name in ("psf_fwhm_xy_um", "brightness_photons", "background_photons", "gain_adu_per_photon",
                 "read_noise_adu", "offset_adu", "spine_density_per_um", "drift_um", "deformation_um",
                 "spine_gain_probability", "spine_loss_probability", "transient_miss_probability",
                 "haze_fraction", "noise_smoothing_px", "dendrites", "axons"):
        check([getattr(c, name) for c in configs], *RANDOM_RANGES[name])
    for name, key in (("head_radius_um_range", "head_radius_um"), ("shaft_radius_um_range", "shaft_radius_um"),
                      ("neck_length_um_range", "neck_length_um"), ("bouton_radius_um_range", "bouton_radius_um")):
        pairs = np.array([getattr(c, name) for c in configs])
        assert (pairs[:, 0] <= pairs[:, 1]).all()
        check(pairs.ravel(), *RANDOM_RANGES[key])
    fractions = np.array([c.spine_kind_fractions for c in configs])
    np.testing.assert_allclose(fractions.sum(axis=1), 1.0)
    assert (fractions.max(axis=0) > 0.5).all()   # each kind sometimes dominates... or nearly


def test_default_inside_and_other_microscope_outside_the_random_ranges():
    default, other = SynthConfig(), SynthConfig.preset("other_microscope")

    def inside(value, key):
        lo, hi = RANDOM_RANGES[key]
        return lo <= value <= hi

    for cfg, expected in ((default, True), (other, False)):
        assert inside(cfg.voxel_size_um[2], "voxel_size_xy_um") is expected
        assert inside(cfg.voxel_size_um[0], "voxel_size_z_um") is expected
        assert inside(cfg.psf_fwhm_xy_um, "psf_fwhm_xy_um") is expected
        assert inside(cfg.psf_fwhm_z_um / cfg.psf_fwhm_xy_um, "psf_fwhm_z_to_xy") is expected
        assert inside(cfg.gain_adu_per_photon, "gain_adu_per_photon") is expected
        assert inside(cfg.read_noise_adu, "read_noise_adu") is expected
        assert inside(cfg.offset_adu, "offset_adu") is expected
        assert inside(cfg.background_photons, "background_photons") is expected
        assert inside(cfg.shaft_radius_um_range[0], "shaft_radius_um") is expected
        assert inside(cfg.spine_density_per_um, "spine_density_per_um") is expected


def test_random_configs_render():
    for seed in range(6):
        cfg = SynthConfig.random(seed, sessions=2, shape=(8, 48, 48))
        series = synthesize_series(cfg)
        assert series.image.shape == (2, 8, 48, 48)
        assert validate_spine_table(series.truth) is not None


def test_config_is_frozen_and_replace_validates():
    cfg = SynthConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    assert cfg.replace(seed=3).seed == 3
    with pytest.raises(InputError):
        cfg.replace(voxel_size_um=(0.5, 0.0, 0.1))


def test_rotation_turns_each_session_about_the_field_centre():
    cfg = SynthConfig.preset("default", seed=2, sessions=3, shape=(12, 128, 128), deformation_um=0.0,
                             rotation_deg=2.0, transient_miss_probability=0.0, head_radius_change_fraction=0.0)
    series = synthesize_series(cfg)
    angles = np.radians(series.rotation_deg)
    assert angles[0] == 0 and np.all(np.abs(angles) <= np.radians(2.0)) and np.any(angles != 0)
    assert series.metadata()["rotation_deg"] == list(np.round(series.rotation_deg, 4))
    voxel = np.array(series.voxel_size_um)
    centre = 0.5 * (np.array(cfg.shape) - 1) * voxel
    truth = series.truth.set_index("spine_id")
    checked = 0
    for t in (1, 2):
        a, b = truth[truth.t == 0], truth[truth.t == t]
        common = a.index.intersection(b.index)
        p = a.loc[common, ["z", "y", "x"]].to_numpy() * voxel - centre
        c, s = np.cos(angles[t]), np.sin(angles[t])
        expected = np.column_stack([p[:, 0], c * p[:, 1] - s * p[:, 2], s * p[:, 1] + c * p[:, 2]])
        expected += centre + series.drift_um[t]
        np.testing.assert_allclose(b.loc[common, ["z", "y", "x"]].to_numpy() * voxel, expected, atol=1e-6)
        checked += len(common)
    assert checked > 10
    # without rotation the series is what it was before rotation existed (the angles are drawn last)
    plain = synthesize_series(cfg.replace(rotation_deg=0.0))
    assert not plain.rotation_deg.any()
    np.testing.assert_array_equal(plain.drift_um, series.drift_um)


def test_the_noise_free_series_is_the_same_series_before_the_detector():
    config = SynthConfig.preset("default", seed=3, **SMALL)
    noisy, clean = synthesize_series(config), synthesize_series(config, noise_free=True)
    assert clean.image.dtype == np.float32 and clean.image.shape == noisy.image.shape
    pd.testing.assert_frame_equal(clean.truth, noisy.truth)
    pd.testing.assert_frame_equal(clean.distractors, noisy.distractors)
    np.testing.assert_array_equal(clean.drift_um, noisy.drift_um)
    # the detector turns expected photons into ADU: on average gain x photons + offset, and the
    # noise averages out over a smoothed neighbourhood (the PMT's low-pass is a weighted mean)
    expected = clean.image * config.gain_adu_per_photon + config.offset_adu
    smooth = ndi.uniform_filter(noisy.image.astype(np.float64), 5)
    assert np.corrcoef(smooth.ravel(), ndi.uniform_filter(expected, 5).ravel())[0, 1] > 0.95
    assert noisy.image.mean() == pytest.approx(expected.mean(), rel=0.02)
