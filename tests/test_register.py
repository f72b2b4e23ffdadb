"""estimate_drift: known shifts (sub-voxel and 3 µm), reference, lazy input, progress and cancel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from napari_spine_tracker.core.register import estimate_drift
from napari_spine_tracker.errors import Cancelled, InputError

VOXEL = np.array([0.5, 0.1, 0.1])  # µm


def shifted_series(rng: np.random.Generator, drift_vox: np.ndarray, shape=(16, 96, 96)) -> np.ndarray:
    """Blobs on a larger canvas, moved by ``drift_vox[t]`` and cropped, with Poisson noise."""
    pad = np.array([8, 48, 48])
    canvas = np.zeros(np.array(shape) + 2 * pad, np.float32)
    points = rng.uniform(0, canvas.shape, size=(250, 3)).astype(int)
    canvas[tuple(points.T)] = 1.0
    canvas = ndimage.gaussian_filter(canvas, (1.0, 2.5, 2.5)) * 4000
    crop = tuple(slice(p, p + n) for p, n in zip(pad, shape, strict=True))
    spectrum = np.fft.fftn(canvas)
    # an exact sub-voxel shift (circular, but the pad is wider than the largest shift)
    moved = [np.fft.ifftn(ndimage.fourier_shift(spectrum, d)).real[crop] for d in drift_vox]
    return np.stack([rng.poisson(m.clip(0) + 30).astype(np.uint16) for m in moved])


# sub-voxel steps and a 3 µm step in y (30 voxels)
DRIFT_VOX = np.array([[0, 0, 0], [0.6, 4.3, -2.7], [1.4, 34.3, -0.2]])


@pytest.fixture(scope="module")
def series() -> np.ndarray:
    return shifted_series(np.random.default_rng(0), DRIFT_VOX)


def test_recovers_known_drift_including_3_um(series):
    estimate = estimate_drift(series, VOXEL)
    assert estimate.shape == (3, 3)
    error_um = np.linalg.norm((estimate - DRIFT_VOX) * VOXEL, axis=1)
    assert error_um[0] == 0.0
    assert error_um.max() < 0.1, error_um


def test_reference_session_is_zero(series):
    from_0 = estimate_drift(series, VOXEL)
    from_2 = estimate_drift(series, VOXEL, reference=2)
    np.testing.assert_allclose(from_2[2], 0.0)
    np.testing.assert_allclose(from_2, from_0 - from_0[2], atol=1e-9)


class LazySeries:
    """A series that hands out one session at a time and refuses to be loaded whole."""

    def __init__(self, array: np.ndarray):
        self._array, self.shape, self.dtype, self.reads = array, array.shape, array.dtype, []

    def __getitem__(self, key):
        assert isinstance(key, (int, np.integer)), f"read {key!r}: more than one session"
        self.reads.append(int(key))
        return self._array[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole series was loaded")


class SeriesLike:
    def __init__(self, data, voxel_size_um):
        self.data, self.voxel_size_um = data, voxel_size_um


def test_reads_one_session_at_a_time_and_accepts_series(series):
    lazy = LazySeries(series)
    estimate = estimate_drift(SeriesLike(lazy, tuple(VOXEL)))
    assert lazy.reads == [0, 1, 2]
    np.testing.assert_allclose(estimate, estimate_drift(series, VOXEL))


def test_progress_cancel_and_bad_input(series):
    calls = []
    estimate_drift(series, VOXEL, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(Cancelled):
        estimate_drift(series, VOXEL, should_stop=lambda: True)
    with pytest.raises(InputError, match="4D"):
        estimate_drift(series[0], VOXEL)
    with pytest.raises(InputError, match="voxel size"):
        estimate_drift(series)
    with pytest.raises(InputError, match="reference"):
        estimate_drift(series, VOXEL, reference=3)


@pytest.mark.parametrize("seed", [5, 6])
def test_synthetic_series_with_large_drift(seed):
    synth = pytest.importorskip("napari_spine_tracker.core.synth")
    # rigid drift only (no deformation), so that the true answer is the engine's drift
    config = synth.SynthConfig.preset("large_drift", seed=seed, sessions=3, shape=(16, 192, 192),
                                      deformation_um=0.0)
    series = synth.synthesize_series(config)
    voxel = np.asarray(series.voxel_size_um)
    true_um = series.drift_um - series.drift_um[0]
    assert np.abs(np.diff(true_um, axis=0)).max() > 1.5  # a large step indeed
    error_um = np.abs(estimate_drift(series.image, voxel) * voxel - true_um)
    assert np.linalg.norm(error_um[:, 1:], axis=1).max() < 0.2, error_um   # y, x
    assert error_um[:, 0].max() < voxel[0], error_um                       # z: within a z voxel


def test_binning_is_a_block_mean():
    from napari_spine_tracker.core.register import _bin_yx

    volume = np.random.default_rng(0).integers(0, 4000, (3, 14, 10)).astype(np.uint16)
    expected = volume[:, :12, :9].astype(np.float64).reshape(3, 4, 3, 3, 3).mean(axis=(2, 4))
    binned = _bin_yx(volume, 3)
    assert binned.dtype == np.float32
    np.testing.assert_allclose(binned, expected, rtol=1e-6)


def test_rigid_motion_maps_there_and_back():
    from napari_spine_tracker.core.register import RigidMotion

    voxel = np.array([0.5, 0.2, 0.1])  # unequal y, x voxels: the turn is made in µm
    motion = RigidMotion(np.array([[0, 0, 0], [1.0, -3.0, 7.5], [0.5, 2.0, 1.0]]), np.radians([0.0, 2.0, -1.5]),
                         np.array([7.5, 60.0, 120.0]), voxel)
    points = np.random.default_rng(1).uniform(0, 200, (20, 3))
    for t in range(3):
        np.testing.assert_allclose(motion.to_reference(motion.to_session(points, t), t), points, atol=1e-9)
    np.testing.assert_allclose(motion.between(motion.to_session(points, 1), 1, 2), motion.to_session(points, 2),
                               atol=1e-9)
    # a turn keeps distances in µm and leaves z alone
    turned = motion.to_session(points, 1)
    np.testing.assert_allclose(np.linalg.norm(np.diff(turned, axis=0) * voxel, axis=1),
                               np.linalg.norm(np.diff(points, axis=0) * voxel, axis=1), atol=1e-9)
    np.testing.assert_allclose(turned[:, 0], points[:, 0] + 1.0)
    plain = RigidMotion.translation(motion.drift_vox, voxel)
    assert not plain.rotated and motion.rotated
    np.testing.assert_allclose(plain.between(points, 2, 1), points - motion.drift_vox[2] + motion.drift_vox[1])


@pytest.fixture(scope="module")
def turned_series():
    synth = pytest.importorskip("napari_spine_tracker.core.synth")
    # a 77 µm field, rigid motion only, so that the engine's drift and turn are the true answer
    config = synth.SynthConfig.preset("default", seed=3, sessions=3, shape=(12, 256, 256),
                                      voxel_size_um=(1.0, 0.3, 0.3), psf_fwhm_z_um=2.5, deformation_um=0.0,
                                      rotation_deg=2.5, dendrites=3, transient_miss_probability=0.0)
    return synth.synthesize_series(config)


def test_estimate_motion_finds_a_turn(turned_series):
    from napari_spine_tracker.core.register import estimate_motion

    series = turned_series
    assert np.abs(series.rotation_deg[1:]).max() > 1.0
    voxel = np.asarray(series.voxel_size_um)
    motion = estimate_motion(series.image, voxel)
    assert motion.rotated
    np.testing.assert_allclose(np.degrees(motion.angle_rad), series.rotation_deg, atol=0.25)
    # every spine seen in session 0 is mapped onto itself in the later sessions
    truth = series.truth.set_index("spine_id")
    first = truth[truth.t == 0]
    for t in (1, 2):
        later = truth[truth.t == t]
        common = first.index.intersection(later.index)
        predicted = motion.to_session(first.loc[common, ["z", "y", "x"]].to_numpy(), t)
        error_um = np.linalg.norm((predicted - later.loc[common, ["z", "y", "x"]].to_numpy()) * voxel, axis=1)
        assert len(common) > 20 and np.median(error_um) < 0.3 and error_um.max() < 0.8, error_um
    # translation only: the same answer as estimate_drift
    plain = estimate_motion(series.image, voxel, max_rotation_deg=0)
    assert not plain.rotated
    np.testing.assert_allclose(plain.drift_vox, estimate_drift(series.image, voxel))


def test_small_fields_are_not_searched_for_turns(series):
    from napari_spine_tracker.core.register import estimate_motion

    # 9.6 µm across: no turn up to 3 degrees moves a corner by the 1 µm that would matter
    motion = estimate_motion(series, VOXEL)
    assert not motion.rotated
    np.testing.assert_allclose(motion.drift_vox, estimate_drift(series, VOXEL))
    with pytest.raises(InputError, match="max_rotation_deg"):
        estimate_motion(series, VOXEL, max_rotation_deg=-1)


def _torch_fft_on_cpu(monkeypatch):
    """Make estimate_motion take the torch path (a GPU's) on the CPU."""
    from napari_spine_tracker.core import register

    monkeypatch.setattr(register, "_fft_backend", lambda device: register._TorchFFT("cpu"))


def test_the_torch_path_gives_the_scipy_answer(series, turned_series, monkeypatch):
    from napari_spine_tracker.core.register import estimate_motion

    pytest.importorskip("torch")
    voxel = np.asarray(turned_series.voxel_size_um)
    expected = [estimate_motion(series, VOXEL), estimate_motion(turned_series.image, voxel)]
    _torch_fft_on_cpu(monkeypatch)
    found = [estimate_motion(series, VOXEL), estimate_motion(turned_series.image, voxel)]
    for a, b in zip(expected, found):
        np.testing.assert_allclose(b.drift_vox, a.drift_vox, atol=1e-3)
        np.testing.assert_allclose(b.angle_rad, a.angle_rad, atol=1e-5)
    assert found[1].rotated  # the turn search and the turned-back session went through it too


def test_the_torch_path_reads_uint16_beyond_the_int16_range():
    from napari_spine_tracker.core.register import _bin_yx, _TorchFFT

    pytest.importorskip("torch")
    volume = np.array([[[0, 1, 32767, 32768], [40000, 65535, 7, 9]]], np.uint16)
    loaded = _TorchFFT("cpu").load(volume)
    np.testing.assert_array_equal(loaded.numpy(), volume.astype(np.float32))
    fft = _TorchFFT("cpu")
    np.testing.assert_allclose(fft.numpy(_bin_yx(fft.load(volume), 2, fft)), _bin_yx(volume, 2), rtol=1e-7)
    for dtype in (np.uint8, np.uint32, np.int64, np.float64):  # other sample types arrive as float32 too
        np.testing.assert_array_equal(fft.numpy(fft.load((volume // 256).astype(dtype))), volume // 256)


def test_detection_on_the_cpu_registers_with_scipy(monkeypatch):
    from napari_spine_tracker.core import detect, register

    seen = []
    real = register.estimate_motion

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(register, "estimate_motion", spy)
    series = shifted_series(np.random.default_rng(2), DRIFT_VOX[:2])
    detect.detect_series(series, VOXEL, model="spinenet-synth", device="cpu")
    assert seen == [None]


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_a_series_held_on_the_device_is_registered_where_it_is(turned_series, monkeypatch, backend):
    """Sessions held on the device (infer.DeviceSessions) are registered from there, with the answer
    of the array they were copied from, through either FFT backend (SciPy after running out of GPU
    memory)."""
    torch = pytest.importorskip("torch")
    from napari_spine_tracker.core.infer import DeviceSessions
    from napari_spine_tracker.core.register import estimate_motion

    voxel = np.asarray(turned_series.voxel_size_um)
    expected = estimate_motion(turned_series.image, voxel)
    if backend == "torch":
        _torch_fft_on_cpu(monkeypatch)
    held = DeviceSessions.for_run(turned_series.image, None, torch.device("cpu"), resident=True)
    assert held.shape == turned_series.image.shape and torch.is_tensor(held[1])
    found = estimate_motion(held, voxel)
    assert found.rotated
    np.testing.assert_allclose(found.drift_vox, expected.drift_vox, atol=1e-3)
    np.testing.assert_allclose(found.angle_rad, expected.angle_rad, atol=1e-5)


def test_detection_holds_the_series_once_for_registration_and_inference(monkeypatch):
    """With the series held on the device, detection copies each session there once: registration
    and inference read the same copy, and the spine table is the one read from the array."""
    pytest.importorskip("torch")
    from napari_spine_tracker.core import detect, infer, register
    from napari_spine_tracker.core.infer import InferenceOptions

    series = shifted_series(np.random.default_rng(2), DRIFT_VOX[:2])
    registered, held = [], []
    real_motion, real_hold = register.estimate_motion, infer.DeviceSessions.hold_on_device
    monkeypatch.setattr(register, "estimate_motion", lambda data, *a, **k: registered.append(data) or
                        real_motion(data, *a, **k))
    monkeypatch.setattr(infer.DeviceSessions, "hold_on_device", lambda self, raw, staging=None:
                        held.append(raw.shape) or real_hold(self, raw, staging))
    tables = {resident: detect.detect_series(series, VOXEL, model="spinenet-synth", device="cpu",
                                             options=InferenceOptions(resident=resident))
              for resident in (False, True)}
    assert isinstance(registered[0], np.ndarray) and isinstance(registered[1], infer.DeviceSessions)
    assert held == [series.shape[1:]] * 2  # two sessions, once each
    assert len(tables[True]) > 5
    pd.testing.assert_frame_equal(tables[True], tables[False])
    assert registered[1].volumes == []  # let go of at the end of the run


@pytest.mark.cuda
def test_registration_on_a_gpu_gives_the_cpu_answer(series, turned_series, monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from napari_spine_tracker.core import devices
    from napari_spine_tracker.core.devices import free_memory
    from napari_spine_tracker.core.register import estimate_motion

    plans = torch.backends.cuda.cufft_plan_cache[torch.cuda.current_device()]
    plans.clear()  # those of earlier tests
    voxel = np.asarray(turned_series.voxel_size_um)
    for data, size in ((series, VOXEL), (turned_series.image, voxel)):
        cpu, gpu = estimate_motion(data, size), estimate_motion(data, size, device="cuda")
        np.testing.assert_allclose(gpu.drift_vox, cpu.drift_vox, atol=1e-3)
        np.testing.assert_allclose(gpu.angle_rad, cpu.angle_rad, atol=1e-5)
    made = plans.size
    assert 0 < made <= devices.KEPT_FFT_PLANS
    free_memory(torch.device("cuda"))  # what detect_series does at the end of a run: a few plans are kept
    assert plans.size == made
    monkeypatch.setattr(devices, "KEPT_FFT_PLANS", made - 1)
    free_memory(torch.device("cuda"))  # more than that: all given back
    assert plans.size == 0


def test_out_of_gpu_memory_in_registration_goes_on_on_the_cpu(series, monkeypatch, caplog):
    torch = pytest.importorskip("torch")
    from napari_spine_tracker.core import register

    class RunsOutOfMemory(register._TorchFFT):
        """The torch path on the CPU, out of memory at its fifth FFT (in the second session)."""

        calls = 0

        def rfftn(self, x):
            RunsOutOfMemory.calls += 1
            if RunsOutOfMemory.calls == 5:
                raise torch.cuda.OutOfMemoryError("simulated")
            return super().rfftn(x)

    expected = register.estimate_motion(series, VOXEL)
    monkeypatch.setattr(register, "_fft_backend", lambda device: RunsOutOfMemory("cpu"))
    done = []
    with caplog.at_level("WARNING"):
        motion = register.estimate_motion(series, VOXEL, progress=lambda i, n: done.append(i))
    assert RunsOutOfMemory.calls == 5  # nothing more ran on the "GPU"
    assert "registering the rest of the series on the CPU" in caplog.text
    assert done == [1, 2, 3]
    np.testing.assert_allclose(motion.drift_vox, expected.drift_vox, atol=1e-3)


def test_only_cuda_takes_the_torch_path():
    from napari_spine_tracker.core.register import _SCIPY, _fft_backend

    assert _fft_backend(None) is _SCIPY and _fft_backend("cpu") is _SCIPY and _fft_backend("mps") is _SCIPY
