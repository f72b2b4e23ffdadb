"""Where training batches come from: the synthetic pool, batch sources and their workers."""

import numpy as np
import pytest

from napari_spine_tracker.core.batches import PatchOptions
from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION
from napari_spine_tracker.core.sources import (
    COARSE_VOXEL_UM,
    DEFAULT_PRESETS,
    HARD_NEGATIVE_KINDS,
    REALISTIC_PRESETS,
    WORKER_SEED_STRIDE,
    SourceSpec,
    SyntheticPool,
    default_workers,
    pool_first_seed,
    worker_source,
)
from napari_spine_tracker.core.train import MODEL_VOXEL_UM


def _source_spec(**changes):

    values = dict(pool_size=2, pool_seed=0, seed=0, rank=0, model_voxel_um=MODEL_VOXEL_UM,
                  normalization=DEFAULT_NORMALIZATION, patch=PatchOptions(shape=(8, 32, 32), sessions=2),
                  realistic_fraction=0.5, presets=DEFAULT_PRESETS, coarse_fraction=0.0, user_series=[],
                  synthetic_fraction=1.0,
                  batch_size=2, out_shape=(8, 16, 16),
                  stride=(1, 2, 2), out_voxel_um=(0.5, 0.2, 0.2), refresh_every=2)
    values.update(changes)
    return SourceSpec(**values)


def _drawn_presets(monkeypatch, presets, count=400):
    """Which preset each draw of a pool (all from the presets) picks, in order."""
    from napari_spine_tracker.core import synth

    picked = []

    class Picked(Exception):
        pass

    def preset(name, seed=0, **overrides):
        picked.append(name)
        raise Picked  # the choice is made; no need to render the series

    monkeypatch.setattr(synth.SynthConfig, "preset", staticmethod(preset))
    pool = SyntheticPool(1, MODEL_VOXEL_UM, None, 0, PatchOptions(), realistic_fraction=1.0,
                               presets=presets)
    for _ in range(count):
        with pytest.raises(Picked):
            pool._make()
    return picked


def test_the_preset_mix_follows_its_weights(monkeypatch):
    picked = _drawn_presets(monkeypatch, (("default", 1.0), ("faint", 3.0)))
    assert set(picked) == {"default", "faint"}
    assert 0.68 < picked.count("faint") / len(picked) < 0.82  # 0.75 expected; sd 0.022 for 400 draws


def test_equal_weights_draw_the_presets_as_before_weights_existed(monkeypatch):
    """The default mix picks what the pools that trained the shipped model picked."""

    picked = _drawn_presets(monkeypatch, DEFAULT_PRESETS, count=50)
    old = []  # the draw before weights: random() for the realistic share, then integers(4)
    for seed in range(pool_first_seed(0), pool_first_seed(0) + 50):
        draw = np.random.default_rng(seed)
        draw.random()
        old.append(REALISTIC_PRESETS[draw.integers(4)])
    assert picked == old


def test_pool_series_of_a_turning_preset_carry_their_true_turns():
    patch = PatchOptions(shape=(8, 32, 32), sessions=2)
    turned = SyntheticPool(1, MODEL_VOXEL_UM, DEFAULT_NORMALIZATION, 0, patch,
                                 realistic_fraction=1.0, presets=(("rotated", 1.0),))._make()
    assert turned.motion is not None and np.abs(turned.motion.angle_rad).max() > 0
    plain = SyntheticPool(1, MODEL_VOXEL_UM, DEFAULT_NORMALIZATION, 0, patch,
                                realistic_fraction=1.0, presets=(("default", 1.0),))._make()
    assert plain.motion is None  # no turns: patches follow the drift alone, as before


def test_coarse_fraction_renders_preset_series_at_coarser_voxels_and_changes_nothing_else():
    def pool(coarse, realistic=1.0):
        return SyntheticPool(1, MODEL_VOXEL_UM, DEFAULT_NORMALIZATION, 0, PatchOptions(),
                                   realistic_fraction=realistic, coarse_fraction=coarse)

    seeds = range(pool_first_seed(0), pool_first_seed(0) + 60)
    plain = [pool(0.0).config(n) for n in seeds]
    all_coarse = [pool(1.0).config(n) for n in seeds]
    half = [pool(0.5).config(n) for n in seeds]
    assert {c.voxel_size_um for c in plain} == {(0.5, 0.1, 0.1)}
    z_lo, z_hi = COARSE_VOXEL_UM["z"]
    yx_lo, yx_hi = COARSE_VOXEL_UM["yx"]
    for c in all_coarse:
        z, y, x = c.voxel_size_um
        assert z_lo <= z <= z_hi and yx_lo <= y <= yx_hi and y == x
    assert max(c.voxel_size_um[0] for c in all_coarse) > 1.2 and max(c.voxel_size_um[1] for c in all_coarse) > 0.2
    assert 15 < sum(c.voxel_size_um != (0.5, 0.1, 0.1) for c in half) < 45  # 30 expected
    # apart from the voxels, the same series: the preset draw and everything else are untouched
    for a, b in zip(plain, all_coarse, strict=True):
        assert a.replace(voxel_size_um=b.voxel_size_um) == b
    # the randomised share is left alone
    assert [pool(1.0, realistic=0.0).config(n) for n in seeds] == [pool(0.0, realistic=0.0).config(n)
                                                                     for n in seeds]


def test_a_coarse_preset_series_is_resampled_to_the_model_grid():
    patch = PatchOptions(shape=(8, 32, 32), sessions=2)
    series = SyntheticPool(1, MODEL_VOXEL_UM, DEFAULT_NORMALIZATION, 0, patch,
                                 realistic_fraction=1.0, coarse_fraction=1.0)._make()
    # room for the patch and its moves (8 + 8, 32 + 48) in model voxels, within rounding of the coarse grid
    assert series.image.shape[0] == 4
    assert 16 <= series.image.shape[1] <= 19 and 80 <= series.image.shape[2] <= 84
    assert len(series.labels) > 0 and series.labels["z"].between(-0.5, series.image.shape[1] - 0.5).all()


def test_batch_workers_draw_distinct_seeds_and_repeat_exactly():

    spec = _source_spec()
    first = worker_source(spec, 0, 2)
    second = worker_source(spec, 1, 2)
    assert second.pool.first_seed - first.pool.first_seed == WORKER_SEED_STRIDE
    again = worker_source(spec, 1, 2)
    for source in (first, second, again):
        source.fill()
    a, b, c = (s.next()["image"] for s in (first, second, again))
    assert a.shape == (2, 2, 1, 8, 32, 32)
    assert not np.array_equal(a, b)  # other series, other crops
    np.testing.assert_array_equal(b, c)  # the same worker of the same run: the same stream


def test_default_workers_only_beside_a_gpu():
    import torch


    assert default_workers(torch.device("cpu")) == 0
    assert 0 <= default_workers(torch.device("cuda")) <= 8


def test_pool_series_carry_their_boutons_onto_the_model_grid():
    from napari_spine_tracker.core.synth import synthesize_series

    pool = SyntheticPool(1, MODEL_VOXEL_UM, DEFAULT_NORMALIZATION, seed=3,
                         patch=PatchOptions(shape=(8, 32, 32), sessions=2), realistic_fraction=1.0,
                         presets=(("crowded", 1.0),))
    seed = pool.next_seed
    pool.fill()
    series = pool.series[0]
    synth = synthesize_series(pool.sized_config(seed))
    assert HARD_NEGATIVE_KINDS == ("bouton",)
    boutons = synth.distractors[synth.distractors["kind"] == "bouton"]
    assert len(series.distractors) == series.image.shape[0]
    assert sum(len(d) for d in series.distractors) == len(boutons) > 0
    assert len(boutons) < len(synth.distractors)  # the varicosities are left out
    first = boutons[boutons["t"] == 0][["z", "y", "x"]].to_numpy()
    scale = np.asarray(synth.voxel_size_um) / np.asarray(MODEL_VOXEL_UM)
    np.testing.assert_allclose(series.distractors[0], (first + 0.5) * scale - 0.5)
