"""The training loop end to end on a tiny model: checkpoint, cancel, resume, training sets."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from napari_spine_tracker.core.batches import PatchOptions
from napari_spine_tracker.core.train import TrainOptions, train_model
from napari_spine_tracker.errors import Cancelled, InputError
from napari_spine_tracker.io.checkpoint import load_checkpoint


def tiny_options(out: Path, **changes) -> TrainOptions:
    values = dict(out=out, steps=4, size="tiny", batch_size=2, pool_size=2, val_every=2, pool_refresh_every=2,
                  patch=PatchOptions(shape=(8, 32, 32), sessions=2), validation=(("tiny", 1000),),
                  validation_shape={}, device="cpu")
    values.update(changes)
    return TrainOptions(**values)


@pytest.mark.slow
def test_tiny_training_writes_a_valid_checkpoint(tmp_path):
    records = []
    path = train_model(tiny_options(tmp_path / "m.pt"), on_log=records.append)
    checkpoint = load_checkpoint(path)
    training = checkpoint["training"]
    assert training["steps"] in (2, 4) and len(training["history"]) >= 1
    assert 0.0 <= checkpoint["decode"]["threshold"] <= 1.0
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("validation" in r for r in records)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert "validation F1" in sidecar["description"]
    assert not (tmp_path / "m.resume.pt").exists()  # a finished run leaves no resume state


def test_cancel_before_any_checkpoint_writes_nothing(tmp_path):
    with pytest.raises(Cancelled):
        train_model(tiny_options(tmp_path / "m.pt"), should_stop=lambda: True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "m.pt"
    calls = []

    def stop_after_first_validation():
        calls.append(1)
        return (tmp_path / "m.resume.pt").exists()

    with pytest.raises(Cancelled):
        train_model(tiny_options(out), should_stop=stop_after_first_validation)
    assert out.exists() and (tmp_path / "m.resume.pt").exists()
    import torch

    first_minutes = torch.load(tmp_path / "m.resume.pt", weights_only=True)["minutes"]
    assert first_minutes > 0
    records = []
    train_model(tiny_options(out, resume=True), on_log=records.append)
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [3, 4]  # it went on from step 2, where the first run validated and stopped
    training = load_checkpoint(out)["training"]
    assert training["steps"] in (2, 4)
    # the time recorded counts both parts of the run
    assert [h["step"] for h in training["history"]][:1] == [2]
    if training["steps"] == 4:
        assert training["history"][-1]["minutes"] > first_minutes


def test_out_must_be_a_pt_file(tmp_path):
    with pytest.raises(InputError, match=r"\.pt"):
        train_model(tiny_options(tmp_path / "model.bin"))


def test_training_set_without_reviewed_sessions_is_refused(tmp_path):
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.io.trainset import append_training_item

    synth = synthesize_series(SynthConfig.preset("tiny", seed=5))
    append_training_item(tmp_path / "set", "a", synth.image, synth.truth, synth.voxel_size_um, reviewed_sessions=[])
    with pytest.raises(InputError, match="no reviewed session"):
        train_model(tiny_options(tmp_path / "m.pt", datasets=[tmp_path / "set"]))


def test_fine_tuning_selection_penalises_forgetting():
    from napari_spine_tracker.core.train import FORGETTING_TOLERANCE, selection_score

    def result(synthetic, user):
        cases = [{"case": "default-1500", "f1": synthetic, "idf1": synthetic},
                 {"case": "user:set/a", "f1": user, "idf1": user}]
        return {"score": (synthetic + user) / 2, "cases": cases}

    # from scratch (no baseline): the mean over all cases
    assert selection_score(result(0.9, 0.5), None) == pytest.approx(0.7)
    # fine-tuning: the user's score while the synthetic one stays within the tolerance ...
    assert selection_score(result(0.9 - FORGETTING_TOLERANCE, 0.6), 0.9) == pytest.approx(0.6)
    # ... and a checkpoint that gained on the user's data by forgetting more ranks below one that did not
    assert selection_score(result(0.84, 0.7), 0.9) < selection_score(result(0.89, 0.6), 0.9)


def test_learning_from_training_sets_averages_the_weights_by_default(tmp_path):
    from napari_spine_tracker.core.train import FINE_TUNING_EMA

    assert TrainOptions(out=tmp_path / "a.pt").moving_average == 0.0
    assert TrainOptions(out=tmp_path / "a.pt", init="spinenet-synth").moving_average == 0.0
    given = TrainOptions(out=tmp_path / "a.pt", init="spinenet-synth", datasets=[tmp_path / "set"])
    assert given.moving_average == FINE_TUNING_EMA == 0.99
    assert dataclasses.replace(given, ema=0.0).moving_average == 0.0  # --ema 0 turns it off
    assert dataclasses.replace(given, ema=0.9).moving_average == 0.9


@pytest.mark.slow
def test_a_fine_tune_on_a_training_set_saves_the_moving_average(tmp_path):
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.io.trainset import append_training_item

    synth = synthesize_series(SynthConfig.preset("tiny", seed=5))
    append_training_item(tmp_path / "set", "a", synth.image, synth.truth, synth.voxel_size_um,
                         reviewed_sessions=[0, 1, 2])
    first = train_model(tiny_options(tmp_path / "first.pt", steps=2))
    assert load_checkpoint(first)["training"]["ema"] == 0.0
    tuned = train_model(tiny_options(tmp_path / "tuned.pt", steps=2, init=str(first), datasets=[tmp_path / "set"]))
    assert load_checkpoint(tuned)["training"]["ema"] == 0.99


def test_fine_tuning_validates_more_often(tmp_path):
    assert TrainOptions(out=tmp_path / "a.pt").validation_interval == 250
    assert TrainOptions(out=tmp_path / "a.pt", init="spinenet-synth").validation_interval == 100
    assert TrainOptions(out=tmp_path / "a.pt", init="spinenet-synth", val_every=7).validation_interval == 7


@pytest.mark.parametrize(("size", "added"), [("deep", ["down.1.1", "down.2.1"]), ("fine", ["up.0.0"])])
def test_a_lean_model_grows_into_a_larger_one(tmp_path, size, added):
    """--init with a larger --size: the initial weights are kept and the added blocks trained
    (how the shipped model was made from the earlier lean one)."""
    from napari_spine_tracker.core.model import build_config
    from napari_spine_tracker.core.models import load_model

    lean = train_model(tiny_options(tmp_path / "lean.pt", size="lean", steps=1, val_every=1))
    path = train_model(tiny_options(tmp_path / f"{size}.pt", init=str(lean), size=size, steps=2, val_every=2))
    checkpoint = load_checkpoint(path)
    assert checkpoint["config"]["preset"] == size and checkpoint["config"]["blocks"] == build_config(size)["blocks"]
    assert checkpoint["training"]["grown_blocks"] == added
    for block in added:
        assert checkpoint["state_dict"][f"{block}.expand.1.weight"].abs().sum() > 0, "the added blocks were trained"
    loaded = load_model(path, device="cpu")  # and loads for detection, the added blocks with it
    assert loaded.config["fine_blocks"] == build_config(size)["fine_blocks"]


def test_growing_into_other_widths_is_a_clear_error(tmp_path):
    first = train_model(tiny_options(tmp_path / "tiny.pt", steps=1, val_every=1))
    with pytest.raises(InputError, match=r"--size lean with --init .*only blocks can be added"):
        train_model(tiny_options(tmp_path / "b.pt", init=str(first), size="lean"))
    with pytest.raises(InputError, match="unknown model size 'huge'"):
        train_model(tiny_options(tmp_path / "c.pt", size="huge"))


def test_validation_cases_extend_the_fixed_six():
    from napari_spine_tracker.core.synth import PRESETS
    from napari_spine_tracker.core.train import SYNTHETIC_VALIDATION, validation_cases

    assert validation_cases(6) == SYNTHETIC_VALIDATION
    assert validation_cases(3) == SYNTHETIC_VALIDATION[:3]
    cases = validation_cases(26)
    assert cases[:6] == SYNTHETIC_VALIDATION and len(cases) == 26
    seeds = [seed for _, seed in cases]
    assert len(set(seeds)) == 26 and min(seeds) == 1500 and max(seeds) < 2000  # clear of tuning seeds
    assert all(name in PRESETS for name, _ in cases)
    assert {name for name, _ in cases[6:]} == {"default", "large_drift", "low_snr", "crowded"}
    for bad in (0, -1, 2.5, 501, "many"):
        with pytest.raises(InputError, match="--val-series"):
            validation_cases(bad)


def test_presets_parse_with_weights_and_refuse_what_is_not_a_preset():
    from napari_spine_tracker.core.train import parse_presets

    assert parse_presets(["default", "faint:2.5"]) == (("default", 1.0), ("faint", 2.5))
    with pytest.raises(InputError, match="unknown synthetic preset 'dim'"):
        parse_presets(["dim"])
    for bad in ("low_snr:0", "low_snr:-1", "low_snr:two", "low_snr:nan"):
        with pytest.raises(InputError, match="must be a positive number, as in low_snr:2"):
            parse_presets([bad])


def test_fractions_outside_zero_to_one_are_refused(tmp_path):
    for name, value in (("coarse_fraction", 1.5), ("realistic_fraction", -0.1), ("synthetic_fraction", 2.0)):
        options = TrainOptions(out=tmp_path / "m.pt", **{name: value})
        with pytest.raises(InputError, match=f"--{name.replace('_', '-')} must be a share between 0 and 1"):
            train_model(options)


@pytest.mark.slow
def test_training_with_batch_workers(tmp_path):
    records = []
    path = train_model(tiny_options(tmp_path / "m.pt", workers=2), on_log=records.append)
    training = load_checkpoint(path)["training"]
    assert training["workers"] == 2 and "worker" in training["synthetic_seeds"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(np.isfinite(losses))


def test_worker_count_is_checked(tmp_path):
    with pytest.raises(InputError, match="--workers"):
        train_model(tiny_options(tmp_path / "m.pt", workers=-1))


def test_learning_rate_decays_over_a_time_budget():
    from types import SimpleNamespace

    from napari_spine_tracker.core.train import _Distributed, _Run

    fake = SimpleNamespace(lr=1.0, warmup=10, steps=10**9, minutes=10.0, step=100, dist=_Distributed(None))
    fake.elapsed_minutes = lambda: 5.0
    fraction = _Run.budget_fraction(fake)
    assert fraction == pytest.approx(0.5)
    assert _Run.lr_at(fake, 100, fraction) == pytest.approx(0.5)  # half way down the cosine
    assert _Run.lr_at(fake, 100, 1.0) == pytest.approx(0.0)
    assert _Run.lr_at(fake, 4, 0.0) == pytest.approx(0.5)  # warm-up
    fake.steps, fake.elapsed_minutes = 400, (lambda: 1.0)
    assert _Run.budget_fraction(fake) == pytest.approx(0.25)  # steps ran out faster than minutes


def test_validation_with_given_choices(tmp_path):
    """validate() tries only the thresholds and linkings it is given, with mirror views if asked."""
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.core.train import validate

    model = load_model(train_model(tiny_options(tmp_path / "m.pt", steps=1, val_every=1)), device="cpu")
    series = synthesize_series(SynthConfig.preset("tiny", seed=1000))
    cases = [("tiny-1000", series.image, series.voxel_size_um, series.truth, None)]
    result = validate(model, cases, thresholds=(0.3,), views=2, linking=(False,))
    assert result["threshold"] == 0.3 and result["use_displacement"] is False
    assert [row["case"] for row in result["cases"]] == ["tiny-1000"] and 0 <= result["f1"] <= 1


def test_patches_of_turned_sessions_follow_the_turn():
    from napari_spine_tracker.core.batches import prepare_series, sample_patch
    from napari_spine_tracker.core.register import RigidMotion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    # a 77 µm field whose sessions are turned (rigid: no deformation), labels from the truth
    series = synthesize_series(SynthConfig.preset("default", seed=7, sessions=2, shape=(8, 256, 256),
                                                  voxel_size_um=(1.0, 0.3, 0.3), deformation_um=0.0,
                                                  rotation_deg=3.0, transient_miss_probability=0.0,
                                                  head_radius_change_fraction=0.0))
    voxel = np.asarray(series.voxel_size_um)
    assert abs(series.rotation_deg[1]) > 1.0
    motion = RigidMotion(series.drift_um / voxel, np.radians(series.rotation_deg),
                         0.5 * (np.array(series.image.shape[1:]) - 1), voxel)
    options = PatchOptions(shape=(8, 48, 48), sessions=2, jitter_um=0.0, near_label_fraction=1.0, augment=False)

    def largest_offsets(prepared):
        """µm: how far the same spine sits in the two sessions' patches, per patch (largest)."""
        rng, found = np.random.default_rng(0), []
        for _ in range(40):
            _, points, _ = sample_patch(prepared, rng, options, voxel)
            moved = points[1].displacement_um[np.isfinite(points[1].displacement_um).all(axis=1)]
            if len(moved):
                found.append(np.linalg.norm(moved, axis=1).max())
        return np.array(found)

    turned = largest_offsets(prepare_series(series.image, voxel, series.truth, voxel, motion=motion))
    shifted = largest_offsets(prepare_series(series.image, voxel, series.truth, voxel, drift_vox=motion.drift_vox))
    assert len(turned) > 20
    # through the motion a spine keeps its place in the patch up to rounding and the turn within it
    assert turned.max() < 1.0, turned
    # by translation alone, patches away from the centre are off by the turn there
    assert shifted.max() > 1.5 and np.median(shifted) > np.median(turned) + 0.5, (shifted, turned)


@pytest.mark.slow
def test_training_with_hard_negatives_records_them(tmp_path):
    path = train_model(tiny_options(tmp_path / "m.pt", hard_negative_weight=4.0, realistic_fraction=1.0,
                                    presets=(("crowded", 1.0),)))
    training = load_checkpoint(path)["training"]
    assert training["synthetic_seeds"].endswith("the heatmap's negative term weighted 4x at their boutons")


@pytest.mark.parametrize("value", [0.5, float("nan")])
def test_a_hard_negative_weight_below_one_is_refused(tmp_path, value):
    with pytest.raises(InputError, match="--hard-negative-weight must be a number of at least 1"):
        train_model(TrainOptions(out=tmp_path / "m.pt", hard_negative_weight=value))


def test_the_loop_imports_nothing_of_ours_once_it_runs(tmp_path):
    """A run lasts hours; a module of ours first imported mid-run (at the first validation, say)
    would come from whatever the package is by then (upgraded, or edited in an editable install),
    out of step with the modules loaded at the start. Checked in a fresh interpreter."""
    import subprocess
    import sys

    script = f"""
import json, sys
from pathlib import Path
from napari_spine_tracker.core import train
from napari_spine_tracker.core.batches import PatchOptions

late, loop = [], train._Run.loop


def watched(self):
    before = {{m for m in sys.modules if m.startswith("napari_spine_tracker")}}
    try:
        loop(self)
    finally:
        late.extend(sorted({{m for m in sys.modules if m.startswith("napari_spine_tracker")}} - before))
train._Run.loop = watched
train.train_model(train.TrainOptions(out=Path({str(tmp_path / "m.pt")!r}), steps=2, size="tiny", batch_size=2,
    pool_size=2, val_every=2, patch=PatchOptions(shape=(8, 32, 32), sessions=2),
    validation=(("tiny", 1000),), validation_shape={{}}, device="cpu"))
print(json.dumps(late))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "m.pt").exists()


def test_moving_average_ramps_its_decay_and_keeps_step_counters():
    import torch

    from napari_spine_tracker.core.train import averaged_model

    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    average = averaged_model(net, 0.9)
    assert not average.training

    def update(weight):
        with torch.no_grad():
            net[0].weight.fill_(weight)
            net[1].num_batches_tracked.fill_(int(weight))
        average.update_parameters(net)
        return float(average.module[0].weight.detach())

    assert update(1.0) == 1.0  # the first update copies
    # the second keeps only (1 + 1) / (10 + 1) of the average: early steps are not held for long
    assert update(3.0) == pytest.approx(1.0 + (1 - 2 / 11) * 2.0)
    for _ in range(200):
        last = update(5.0)
    assert last == pytest.approx(5.0, abs=1e-6)
    before = last
    # once ramped up, the decay is the one asked for
    assert update(15.0) == pytest.approx(before + 0.1 * (15.0 - before))
    assert int(average.module[1].num_batches_tracked) == 15


@pytest.mark.parametrize("value", [1.0, -0.1, float("nan")])
def test_an_ema_decay_outside_zero_to_one_is_refused(tmp_path, value):
    with pytest.raises(InputError, match="--ema must be a decay in"):
        train_model(TrainOptions(out=tmp_path / "m.pt", ema=value))


@pytest.mark.slow
def test_training_with_a_moving_average_saves_the_average_and_resumes_it(tmp_path):
    import torch

    out = tmp_path / "m.pt"
    with pytest.raises(Cancelled):
        train_model(tiny_options(out, ema=0.9), should_stop=lambda: (tmp_path / "m.resume.pt").exists())
    resume = torch.load(tmp_path / "m.resume.pt", weights_only=True)
    saved = load_checkpoint(out)
    assert saved["training"]["ema"] == 0.9
    # the checkpoint holds the average, not the weights as trained, and the resume file holds both
    averaged = {k[len("module."):]: v for k, v in resume["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == saved["state_dict"].keys()
    assert all(torch.equal(averaged[k], saved["state_dict"][k]) for k in averaged)
    assert any(not torch.equal(resume["state_dict"][k], v) for k, v in averaged.items() if v.is_floating_point())
    with pytest.raises(InputError, match="written by a run with --ema"):
        train_model(tiny_options(out, resume=True))
    records = []
    train_model(tiny_options(out, ema=0.9, resume=True), on_log=records.append)
    assert [r["step"] for r in records if "loss" in r] == [3, 4]
