"""Rigid motion between the sessions of a series, by correlation of consecutive sessions.

Convention: ``drift[t]`` is the z, y, x translation in voxels such that a structure at ``p`` in the
reference session appears at ``p + drift[t]`` in session ``t``; ``drift[reference] == 0``. With
rotation (:func:`estimate_motion`), session ``t`` is also turned in the y, x plane by ``angle[t]``
about the centre ``c`` of the reference volume: ``p`` appears at ``R_t (p - c) + c + drift[t]``
(:class:`RigidMotion`; the turn is made in µm, so unequal y and x voxel sizes are fine).

Sessions are registered to their predecessor (the tissue changes slowly, so neighbours look most
alike) and the steps are summed. Each session is read once, as float32, binned in y, x to about
``work_voxel_um``, band-passed and windowed; at most two prepared sessions are held at a time, so a
lazy (memory-mapped, dask) series is never copied whole; the FFTs use every core (SciPy), or run on
a GPU (torch.fft, ``device``; a session that does not fit there is registered on the CPU). The correlation
is partly whitened (between plain cross-correlation and phase correlation) and run twice per pair,
the second time on the overlap only; sub-voxel precision comes from a parabola through the peak.
A rotation between two sessions (the animal mounted anew) is found first, as the angle whose
turned z projection correlates best with the predecessor's (a coarse then a fine search, then a
parabola); the session is turned back before its translation is measured.

Measured on synthetic series (benchmarks/README.md): per-step error 0.07-0.2 µm against the median
spine displacement on the default presets, 0.36 µm with 3 µm steps and 0.4 µm non-rigid deformation;
a rigid model cannot follow deformation, which the linker's gate must absorb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import fft as sfft

from ..errors import Cancelled, InputError, number_or_nan
from .devices import as_stored_on
from .intensity import affine_grid_yx, sample_planes_yx
from .metrics import parse_voxel_size

log = logging.getLogger(__name__)

__all__ = ["RigidMotion", "as_motion", "estimate_drift", "estimate_motion", "session_array"]


class _SciPyFFT:
    """Registration's arrays as NumPy arrays and its FFTs by SciPy's pocketfft on every core: the
    fastest on a CPU (torch's CPU FFT took 2.5x longer)."""

    out_of_memory = ()  # catches nothing

    def release(self) -> None:
        pass

    def load(self, volume) -> np.ndarray:
        if _where(volume) is not None:  # a torch tensor: a session held on a device (infer.DeviceSessions)
            return volume.cpu().numpy()
        return np.asarray(volume)  # binning converts to float32 as it sums

    def float32(self, volume) -> np.ndarray:
        return np.asarray(volume, dtype=np.float32)

    def project(self, volume) -> np.ndarray:
        """The maximum along z."""
        return volume.max(axis=0)

    def zeros(self, shape) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def constant(self, array: np.ndarray) -> np.ndarray:
        return array

    def rfftn(self, x, ndim: int | None = None) -> np.ndarray:
        """The real FFT over the last ``ndim`` axes (default all): a stack of images at once."""
        return sfft.rfftn(x, axes=_last(ndim or x.ndim), workers=-1)

    def irfftn(self, x, shape) -> np.ndarray:
        """The inverse over the last ``len(shape)`` axes."""
        return sfft.irfftn(x, s=shape, axes=_last(len(shape)), workers=-1)

    def peaks(self, x) -> np.ndarray:
        """The largest value of each image of a (N, Y, X) stack."""
        return x.reshape(len(x), -1).max(axis=1)

    def numpy(self, x) -> np.ndarray:
        return x


class _TorchFFT:
    """The same on a torch device (a GPU): each session is copied there as read (2 bytes a voxel
    for uint16) and binned, filtered and correlated there; only the few values around each
    correlation peak come back."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, torch.device(device)
        self.out_of_memory = torch.cuda.OutOfMemoryError

    def release(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def load(self, volume):
        if self.torch.is_tensor(volume):  # a session already held on a device (infer.DeviceSessions)
            return volume.to(self.device, self.torch.float32)
        stored, to_float = as_stored_on(volume, self.device)
        return to_float(stored)

    def float32(self, volume):
        return volume.float()

    def project(self, volume):
        return self.torch.amax(volume, dim=0)

    def zeros(self, shape):
        return self.torch.zeros(tuple(int(n) for n in shape), dtype=self.torch.float32, device=self.device)

    def constant(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def rfftn(self, x, ndim: int | None = None):
        return self.torch.fft.rfftn(x, dim=_last(ndim or x.ndim))

    def irfftn(self, x, shape):
        return self.torch.fft.irfftn(x, s=tuple(int(n) for n in shape), dim=_last(len(shape)))

    def peaks(self, x):
        return x.flatten(1).amax(dim=1)

    def numpy(self, x) -> np.ndarray:
        return x.cpu().numpy()


def _last(ndim: int) -> tuple[int, ...]:
    """The last ``ndim`` axes."""
    return tuple(range(-ndim, 0))


_SCIPY = _SciPyFFT()


def _fft_backend(device):
    """torch on a CUDA device, SciPy otherwise (``device`` None, a CPU, or a device whose complex
    FFTs torch supports only in part, such as MPS)."""
    if device is None or str(device).split(":")[0] != "cuda":
        return _SCIPY
    return _TorchFFT(device)


@dataclass(frozen=True)
class RigidMotion:
    """Where the content of the reference session is in each session: a translation ``drift_vox``
    (T, 3) and a turn ``angle_rad`` (T,) in the y, x plane about ``centre_vox`` (3,), all in voxels
    of the series' grid of size ``voxel_um`` (z, y, x µm). See the module docstring."""

    drift_vox: np.ndarray
    angle_rad: np.ndarray
    centre_vox: np.ndarray
    voxel_um: np.ndarray

    @classmethod
    def translation(cls, drift_vox, voxel_um=(1.0, 1.0, 1.0)) -> RigidMotion:
        """A motion without rotation."""
        drift = np.asarray(drift_vox, float)
        return cls(drift, np.zeros(len(drift)), np.zeros(3), np.asarray(voxel_um, float))

    @property
    def rotated(self) -> bool:
        return bool(np.any(self.angle_rad != 0))

    def linear_vox(self, t: int) -> np.ndarray:
        """(3, 3): the turn of session ``t`` acting on voxel offsets (z untouched)."""
        linear = np.eye(3)
        linear[1:, 1:] = _turn_matrix(self.angle_rad[t], self.voxel_um[1:])
        return linear

    def to_session(self, points_vox, t: int) -> np.ndarray:
        """Reference-session voxels -> session ``t`` voxels, for (..., 3) points."""
        points = np.asarray(points_vox, float)
        if not self.angle_rad[t]:
            return points + self.drift_vox[t]
        return (points - self.centre_vox) @ self.linear_vox(t).T + self.centre_vox + self.drift_vox[t]

    def to_reference(self, points_vox, t: int) -> np.ndarray:
        """Session ``t`` voxels -> reference-session voxels (the inverse of :meth:`to_session`)."""
        points = np.asarray(points_vox, float) - self.drift_vox[t]
        if not self.angle_rad[t]:
            return points
        return (points - self.centre_vox) @ np.linalg.inv(self.linear_vox(t)).T + self.centre_vox

    def between(self, points_vox, source: int, target: int) -> np.ndarray:
        """Session ``source`` voxels -> session ``target`` voxels."""
        if not (self.angle_rad[source] or self.angle_rad[target]):
            return np.asarray(points_vox, float) - (self.drift_vox[source] - self.drift_vox[target])
        return self.to_session(self.to_reference(points_vox, source), target)


def as_motion(motion: RigidMotion | None, drift_vox, n_sessions: int, voxel_um) -> RigidMotion:
    """``motion`` if given (it must cover ``n_sessions``), else a translation by ``drift_vox``
    ((T, 3) voxels, None: no drift): what detection, linking and the peer accept."""
    if motion is not None:
        if len(motion.angle_rad) < n_sessions:
            raise InputError(f"the motion covers {len(motion.angle_rad)} sessions; the data reach "
                             f"session {n_sessions - 1}.")
        return motion
    if drift_vox is None:
        return RigidMotion.translation(np.zeros((n_sessions, 3)), voxel_um)
    drift = np.asarray(drift_vox, dtype=float)
    if drift.ndim != 2 or drift.shape[1] != 3 or drift.shape[0] < n_sessions or not np.isfinite(drift).all():
        raise InputError(f"drift_vox must be a finite (T, 3) array (z, y, x voxels) covering sessions "
                         f"0..{n_sessions - 1}; got shape {drift.shape}.")
    return RigidMotion.translation(drift, voxel_um)


def session_array(series, voxel_size_um=None) -> tuple[object, np.ndarray | None]:
    """``(array (T, Z, Y, X), voxel size or None)`` from an array or an ``io.series.Series``-like
    object (anything with ``.data`` and ``.voxel_size_um``). The array is not loaded."""
    if not isinstance(series, np.ndarray) and hasattr(series, "voxel_size_um") and hasattr(series, "data"):
        data = series.data
        if voxel_size_um is None:
            voxel_size_um = series.voxel_size_um
    else:
        data = series
    if not hasattr(data, "shape") or len(data.shape) != 4:
        shape = getattr(data, "shape", None)
        raise InputError(f"a series must be a 4D array (T, Z, Y, X); got shape {shape}. "
                         "A single 3D session has no drift to estimate.")
    return data, (None if voxel_size_um is None else parse_voxel_size(voxel_size_um))


def _prepare(volume, voxel_um: np.ndarray, bin_yx: int, smooth_um: float, background_um: float,
             fft=_SCIPY) -> tuple:
    """One session binned in y, x and band-passed (float32), and its windowed real FFT.

    The band-pass (difference of Gaussians, by FFT) keeps spine- and shaft-sized structure and
    removes the background and haze; the window (separable Tukey) damps the borders, whose content
    drift changes.
    """
    if bin_yx > 1:
        vol = _bin_yx(fft.load(volume), bin_yx, fft)
        voxel_um = voxel_um * np.array([1, bin_yx, bin_yx])
    else:
        vol = fft.float32(fft.load(volume))
    # a Gaussian of width s (µm) in Fourier space is exp(-2 pi^2 s^2 k^2), k in cycles per µm: a
    # product of one factor per axis, so the 3D filter is built from 1D factors where the spectrum is
    # (made as a 3D float64 array on the CPU it took 31 ms a session on 2 cores, every session)
    freqs = [sfft.fftfreq(n, d=float(v)) for n, v in zip(vol.shape[:2], voxel_um[:2], strict=True)]
    freqs.append(sfft.rfftfreq(vol.shape[2], d=float(voxel_um[2])))
    smooth, background = ([np.exp(-2 * np.pi**2 * width**2 * k**2) for k in freqs]
                          for width in (smooth_um, background_um))
    band = _outer(smooth, fft) - _outer(background, fft)
    vol = fft.float32(fft.irfftn(fft.rfftn(vol) * band, vol.shape))
    return vol, _windowed_spectrum(vol, fft)


def _outer(factors, fft=_SCIPY):
    """The (Z, Y, X) product of three 1D factors (float32), made where ``fft`` computes."""
    z, y, x = (fft.constant(np.asarray(f, np.float32)) for f in factors)
    return z[:, None, None] * y[None, :, None] * x[None, None, :]


def _bin_yx(volume, factor: int, fft=_SCIPY):
    """Mean over ``factor`` x ``factor`` blocks in y, x (float32; a ragged edge is dropped), summed
    slice by slice, rows first (whole rows are read once) and then columns on the third as large
    sum: a mean over two axes of a reshaped view took 9x longer, nine strided sums 1.6x."""
    z, y, x = volume.shape
    y2, x2 = y - y % factor, x - x % factor
    rows = fft.zeros((z, y2 // factor, x2))
    for i in range(factor):
        rows += volume[:, i:y2:factor, :x2]
    out = fft.zeros((z, y2 // factor, x2 // factor))
    for j in range(factor):
        out += rows[:, :, j:x2:factor]
    out *= 1 / factor**2
    return out


def _windowed_spectrum(vol, fft=_SCIPY):
    return fft.rfftn(vol * _outer([_tukey(n) for n in vol.shape], fft))


def _tukey(n: int) -> np.ndarray:
    """A Tukey window of length n, flat in the middle, cosine ramps over n // 8 at each end."""
    w = np.ones(n, np.float32)
    if n >= 4:
        edge = max(1, n // 8)
        ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(edge) + 0.5) / edge))
        w[:edge], w[n - edge:] = ramp, ramp[::-1]
    return w


def _content_shift(previous, current, shape: tuple[int, int, int], whitening: float, fft=_SCIPY) -> np.ndarray:
    """Displacement (voxels of the working grid) of the content from ``previous`` to ``current``
    (their windowed spectra).

    The peak of the cross-correlation, partly whitened (the cross-power spectrum divided by its
    magnitude to the power ``whitening``: 0 is plain correlation, dominated by the dendrite shaft,
    which slides along itself; 1 is phase correlation, dominated by noise), refined to a fraction of
    a voxel by a parabola through the peak and its neighbours along each axis.
    """
    corr = _correlation(previous, current, shape, whitening, fft)
    peak = np.array(np.unravel_index(int(corr.argmax()), shape))
    shift = peak.astype(float)
    for axis, n in enumerate(shape):
        if n < 3:
            continue
        idx = [int(i) for i in peak]
        values = []
        for step in (-1, 0, 1):
            idx[axis] = (peak[axis] + step) % n
            values.append(float(corr[tuple(idx)]))
        denom = values[0] - 2 * values[1] + values[2]
        if denom < 0:
            shift[axis] += 0.5 * (values[0] - values[2]) / denom
    # circular correlation: shifts beyond half the size are negative
    size = np.array(shape)
    return (shift + size / 2) % size - size / 2


def _correlation(previous, current, shape, whitening: float, fft=_SCIPY):
    """The partly whitened cross-correlation of two real spectra (see :func:`_content_shift`)."""
    cross = current * previous.conj()
    if whitening > 0:
        magnitude = abs(cross)
        cross = cross / magnitude.clip(min=1e-12 * float(magnitude.max())) ** whitening
    return fft.irfftn(cross, shape)


def _two_pass_shift(previous: tuple, current: tuple, whitening: float, fft=_SCIPY) -> np.ndarray:
    """Content displacement from ``previous`` to ``current`` ((volume, windowed spectrum) pairs).

    The window is fixed to the image frame and so pulls the first estimate toward zero; the second
    pass correlates only the overlap of the two sessions after the first whole-voxel shift, where
    the window sits on the same content in both.
    """
    shape = previous[0].shape
    first = _content_shift(previous[1], current[1], shape, whitening, fft)
    k = np.round(first).astype(int)
    prev_sl, cur_sl = [], []
    for n, kk in zip(shape, k, strict=True):
        if abs(kk) > n // 2:
            return first
        prev_sl.append(slice(max(0, -kk), n - max(0, kk)))
        cur_sl.append(slice(max(0, kk), n - max(0, -kk)))
    a, b = previous[0][tuple(prev_sl)], current[0][tuple(cur_sl)]
    return k + _content_shift(_windowed_spectrum(a, fft), _windowed_spectrum(b, fft), a.shape, whitening, fft)


def check_max_rotation(max_rotation_deg) -> float:
    """``max_rotation_deg`` if it is an angle from 0 to 45 degrees, else an InputError."""
    value = number_or_nan(max_rotation_deg)
    if not (np.isfinite(value) and 0 <= value <= 45):
        raise InputError(f"max_rotation_deg must be an angle from 0 to 45 degrees (0: translation only), "
                         f"got {max_rotation_deg!r}.")
    return value


def estimate_drift(series, voxel_size_um: Sequence[float] | None = None, *, reference: int = 0,
                   work_voxel_um: float = 0.3, smooth_um: float = 0.15, background_um: float = 2.0,
                   whitening: float = 0.5, progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Translation of every session relative to ``reference`` (no rotation).

    Parameters
    ----------
    series
        ``(T, Z, Y, X)`` array (numpy, memory-mapped or dask; read one session at a time), a
        ``Series`` with ``.data`` and ``.voxel_size_um``, or a series held on a device
        (``infer.DeviceSessions``: its sessions are registered where they are).
    voxel_size_um
        ``(z, y, x)`` in µm (taken from ``series`` when omitted).
    reference
        Session whose position is zero.
    work_voxel_um
        y, x are binned by an integer factor to about this voxel size (speed; precision stays
        sub-voxel through a parabolic fit of the correlation peak).
    smooth_um, background_um
        Band-pass: Gaussian smoothing and background (subtracted) widths in µm.

    Returns
    -------
    np.ndarray
        ``(T, 3)`` float drift in voxels (z, y, x) of the series' grid: a point at ``p`` in the
        reference session is at ``p + drift[t]`` in session ``t``.
    """
    return estimate_motion(series, voxel_size_um, reference=reference, max_rotation_deg=0.0,
                           work_voxel_um=work_voxel_um, smooth_um=smooth_um, background_um=background_um,
                           whitening=whitening, progress=progress, should_stop=should_stop).drift_vox


def estimate_motion(series, voxel_size_um: Sequence[float] | None = None, *, reference: int = 0,
                    max_rotation_deg: float = 3.0, min_turn_um: float = 2.0, work_voxel_um: float = 0.3,
                    smooth_um: float = 0.15, background_um: float = 2.0, whitening: float = 0.5,
                    progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None, device=None) -> RigidMotion:
    """Translation and y, x rotation of every session relative to ``reference``.

    As :func:`estimate_drift` (same parameters), and ``max_rotation_deg``: the largest turn looked
    for between consecutive sessions (0: translation only); ``device``: None for SciPy's FFTs on the
    CPU, or a CUDA device to bin, filter and correlate there with torch (the search for a turn, on
    small z projections, stays on the CPU; other devices use SciPy); ``min_turn_um``: a field too small for
    any turn up to ``max_rotation_deg`` to move its corners that far is not searched. Linking
    follows such small motion on its own (its gate is 1.2 µm, and its local motion correction took
    up registration errors of ~1.5 µm), and on fields that small the non-rigid motion of the
    tissue mimics turns as large as the true ones: on 26 µm fields the search changed nothing but
    the time, on 38 µm fields it found turns off by up to 1.9 degrees (benchmarks/README.md).
    """
    data, voxel_um = session_array(series, voxel_size_um)
    if voxel_um is None:
        raise InputError("estimate_motion needs the voxel size (z, y, x in µm): pass voxel_size_um.")
    check_max_rotation(max_rotation_deg)
    n_sessions = int(data.shape[0])
    if not 0 <= reference < n_sessions:
        raise InputError(f"reference session {reference} is outside the series (T={n_sessions}).")
    bin_yx = max(1, int(np.floor(work_voxel_um / max(voxel_um[1], voxel_um[2]) + 1e-6)))
    bin_yx = min(bin_yx, max(1, min(data.shape[2], data.shape[3]) // 16))
    work_scale = np.array([1.0, bin_yx, bin_yx])
    work_voxel = voxel_um * work_scale
    centre_vox = 0.5 * (np.asarray(data.shape[1:], float) - 1)
    centre_work = (centre_vox - 0.5 * (work_scale - 1)) / work_scale  # binned voxel i covers i*b .. i*b+b-1

    # a field too small for any turn up to the largest to move its corners by min_turn_um is not searched
    max_angle = np.radians(max_rotation_deg)
    search_turns = max_angle > 0 and \
        max_angle * _field_radius_um(np.asarray(data.shape[2:]) // bin_yx, work_voxel) >= min_turn_um
    fft = _fft_backend(device)
    steps, turns = np.zeros((n_sessions, 3)), np.zeros(n_sessions)

    def register_session(t: int, previous, fft):
        """Session ``t`` prepared, and its step and turn from ``previous`` (prepared session t - 1)."""
        current = _prepare(data[t], voxel_um, bin_yx, smooth_um, background_um, fft)
        if previous is None:
            return current, np.zeros(3), 0.0
        moving, turn = current, 0.0
        if search_turns:  # on z projections
            turn = _turn(fft.project(previous[0]), fft.project(current[0]), work_voxel, max_angle, whitening, fft)
        if turn:
            turned = fft.float32(_turned_back(current[0], turn, work_voxel, centre_work))
            moving = (turned, _windowed_spectrum(turned, fft))
        shift_work = _two_pass_shift(previous, moving, whitening, fft)
        # the shift was measured in the turned-back frame: turn it forward (module docstring)
        return current, _rotate_yx(shift_work * work_voxel, turn) / voxel_um, turn

    previous = None
    for t in range(n_sessions):
        if should_stop is not None and should_stop():
            raise Cancelled("drift estimation stopped")
        try:
            previous, steps[t], turns[t] = register_session(t, previous, fft)
        except fft.out_of_memory:
            log.warning("out of GPU memory in registration; registering the rest of the series on the CPU")
            if previous is not None:
                previous = tuple(fft.numpy(p) for p in previous)
            fft.release()
            fft = _SCIPY
            previous, steps[t], turns[t] = register_session(t, previous, fft)
        log.debug("session %d: step %s voxels, turn %.3f degrees", t, steps[t], np.degrees(turns[t]))
        if progress is not None:
            progress(t + 1, n_sessions)
    if not turns.any():  # translation only: the steps add up
        drift = np.cumsum(steps, axis=0)
        return RigidMotion(drift - drift[reference], np.zeros(n_sessions), centre_vox, np.asarray(voxel_um, float))
    # compose the steps: A_t = S_t o A_(t-1), S_t(q) = R(q - c) + c + step, in µm
    drift_um, angles = np.zeros((n_sessions, 3)), np.cumsum(turns)
    for t in range(1, n_sessions):
        drift_um[t] = _rotate_yx(drift_um[t - 1], turns[t]) + steps[t] * voxel_um
    # relative to the reference session: A_t o A_r^-1
    drift_um = drift_um - np.stack([_rotate_yx(drift_um[reference], a - angles[reference]) for a in angles])
    return RigidMotion(drift_um / voxel_um, angles - angles[reference], centre_vox, np.asarray(voxel_um, float))


#: the rotation search works on z projections of at most about this many pixels a side
SEARCH_SIZE = 192


def _rotate_yx(vectors_um: np.ndarray, angle: float) -> np.ndarray:
    """Turn (..., 3) z, y, x vectors (µm) by ``angle`` in the y, x plane."""
    if not angle:
        return np.asarray(vectors_um, float)
    c, s = np.cos(angle), np.sin(angle)
    v = np.asarray(vectors_um, float)
    return np.stack([v[..., 0], c * v[..., 1] - s * v[..., 2], s * v[..., 1] + c * v[..., 2]], axis=-1)


def _turn_matrix(angle: float, voxel_yx: np.ndarray) -> np.ndarray:
    """(2, 2) acting on y, x voxel offsets: the turn by ``angle`` made in µm."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]]) * (voxel_yx[None, :] / voxel_yx[:, None])


def _field_radius_um(shape_yx, work_voxel: np.ndarray) -> float:
    """Half the diagonal of a working field of ``shape_yx`` pixels, in µm."""
    return float(np.hypot(*(0.5 * np.asarray(shape_yx) * work_voxel[1:])))


def _turned_projections(projection, angles, voxel_yx: np.ndarray):
    """(len(angles), Y, X): a y, x image sampled at its own points turned by each angle about its
    centre (outside: 0), where the image is (a NumPy array or a ``torch`` tensor)."""
    centre = 0.5 * (np.asarray(projection.shape, float) - 1)
    matrices = np.stack([_turn_matrix(angle, voxel_yx) for angle in angles])
    grid = affine_grid_yx(matrices, centre - matrices @ centre, projection.shape, projection.shape,
                          device=_where(projection))
    return sample_planes_yx(projection[None], grid)[:, 0]


def _where(array):
    """The torch device of a tensor; None (the CPU) for a NumPy array."""
    return array.device if hasattr(array, "is_cuda") else None


def _turn(a, b, work_voxel: np.ndarray, max_angle: float, whitening: float, fft=_SCIPY) -> float:
    """The angle (radians) by which ``b``'s content is turned from ``a``'s (z projections of
    band-passed working volumes, where ``fft`` computes); 0 when the angle found moves the field's
    corners by less than a quarter of a search pixel. Smaller turns found are kept: each session is
    registered to its predecessor, so a turn dropped in one step would be missing from all later
    sessions. The angles of each step of the search are tried together, as one stack of images."""
    radius_um = _field_radius_um(a.shape, work_voxel)
    # the angle hardly needs the working voxels' detail: search on at most ~SEARCH_SIZE pixels
    factor = max(1, int(np.ceil(max(a.shape) / SEARCH_SIZE)))
    if factor > 1:
        a, b = (_bin_yx(p[None], factor, fft)[0] for p in (a, b))
    shape = tuple(int(n) for n in a.shape)
    voxel_yx = work_voxel[1:] * factor
    # a round window: turning the projection about its centre keeps the disc it sees, so no angle
    # loses content at the corners (a square window favoured no turn at all: -0.8 degrees read as 0)
    window = fft.constant(_disc_window(shape, voxel_yx))
    reference = fft.rfftn(a * window)

    def scores(angles) -> np.ndarray:
        spectra = fft.rfftn(_turned_projections(b, angles, voxel_yx) * window, ndim=2)
        return fft.numpy(fft.peaks(_correlation(reference, spectra, shape, whitening, fft))).astype(float)

    # coarse, then fine steps; the fine one turns the corners by one search pixel
    fine = float(voxel_yx.min()) / radius_um
    coarse = np.linspace(-max_angle, max_angle, max(5, int(np.ceil(2 * max_angle / (4 * fine))) + 1))
    best = coarse[int(np.argmax(scores(coarse)))]
    step = min(fine, (coarse[1] - coarse[0]) / 4)
    grid = np.clip(best + step * np.arange(-4, 5), -max_angle, max_angle)
    values = scores(grid)
    i = int(np.argmax(values))
    angle = float(grid[i])
    if 0 < i < len(grid) - 1 and grid[i - 1] < grid[i] < grid[i + 1]:
        denom = values[i - 1] - 2 * values[i] + values[i + 1]
        if denom < 0:
            angle += step * 0.5 * (values[i - 1] - values[i + 1]) / denom
    return angle if abs(angle) / fine >= 0.25 else 0.0


def _disc_window(shape, voxel_yx: np.ndarray) -> np.ndarray:
    """1 inside the disc of 3/4 of the inscribed radius (in µm), a cosine ramp to 0 at that radius."""
    centre = 0.5 * (np.asarray(shape, float) - 1)
    y = (np.arange(shape[0]) - centre[0]) * voxel_yx[0]
    x = (np.arange(shape[1]) - centre[1]) * voxel_yx[1]
    r = np.hypot(y[:, None], x[None, :])
    outer = float(min(centre * voxel_yx))
    inner = 0.75 * outer
    ramp = np.clip((r - inner) / max(outer - inner, 1e-9), 0.0, 1.0)
    return (0.5 * (1 + np.cos(np.pi * ramp))).astype(np.float32)


def _turned_back(volume, angle: float, work_voxel: np.ndarray, centre_work: np.ndarray):
    """A working volume turned back by ``angle`` about ``centre_work`` (working voxels), a NumPy
    array or a ``torch`` tensor (sampled on its device)."""
    matrix = _turn_matrix(angle, work_voxel[1:])
    offset = centre_work[1:] - matrix @ centre_work[1:]
    grid = affine_grid_yx(matrix, offset, volume.shape[1:], volume.shape[1:], device=_where(volume))
    return sample_planes_yx(volume, grid)[0]
