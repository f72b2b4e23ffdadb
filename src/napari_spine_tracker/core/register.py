"""Rigid drift between the sessions of a series, by correlation of consecutive sessions.

Convention: ``drift[t]`` is the z, y, x translation in voxels such that a structure at ``p`` in the
reference session appears at ``p + drift[t]`` in session ``t``; ``drift[reference] == 0``.

Sessions are registered to their predecessor (the tissue changes slowly, so neighbours look most
alike) and the steps are summed. Each session is read once, as float32, binned in y, x to about
``work_voxel_um``, band-passed and windowed; at most two prepared sessions are held at a time, so a
lazy (memory-mapped, dask) series is never copied whole; the FFTs use every core. The correlation
is partly whitened (between plain cross-correlation and phase correlation) and run twice per pair,
the second time on the overlap only; sub-voxel precision comes from a parabola through the peak.

Measured on synthetic series (benchmarks/README.md): per-step error 0.07-0.2 µm against the median
spine displacement on the default presets, 0.36 µm with 3 µm steps and 0.4 µm non-rigid deformation;
a rigid model cannot follow deformation, which the linker's gate must absorb.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from scipy import fft as sfft

from ..errors import Cancelled, InputError
from .metrics import parse_voxel_size

log = logging.getLogger(__name__)

__all__ = ["estimate_drift", "session_array"]


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


def _prepare(volume: np.ndarray, voxel_um: np.ndarray, bin_yx: int, smooth_um: float,
             background_um: float) -> tuple[np.ndarray, np.ndarray]:
    """One session binned in y, x and band-passed (float32), and its windowed real FFT.

    The band-pass (difference of Gaussians, by FFT) keeps spine- and shaft-sized structure and
    removes the background and haze; the window (separable Tukey) damps the borders, whose content
    drift changes.
    """
    if bin_yx > 1:
        vol = _bin_yx(np.asarray(volume), bin_yx)
        voxel_um = voxel_um * np.array([1, bin_yx, bin_yx])
    else:
        vol = np.asarray(volume, dtype=np.float32)
    # a Gaussian of width s (µm) in Fourier space is exp(-2 pi^2 s^2 k^2), k in cycles per µm
    freqs = [sfft.fftfreq(n, d=float(v)) for n, v in zip(vol.shape[:2], voxel_um[:2], strict=True)]
    freqs.append(sfft.rfftfreq(vol.shape[2], d=float(voxel_um[2])))
    k2 = freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2
    band = np.exp(-2 * np.pi**2 * smooth_um**2 * k2) - np.exp(-2 * np.pi**2 * background_um**2 * k2)
    spectrum = sfft.rfftn(vol, workers=-1) * band.astype(np.float32)
    vol = sfft.irfftn(spectrum, s=vol.shape, workers=-1).astype(np.float32)
    return vol, _windowed_spectrum(vol)


def _bin_yx(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks in y, x (float32; a ragged edge is dropped), summed
    slice by slice: a mean over two axes of a reshaped view took 9x longer."""
    z, y, x = volume.shape
    y2, x2 = y - y % factor, x - x % factor
    out = np.zeros((z, y2 // factor, x2 // factor), np.float32)
    for i in range(factor):
        for j in range(factor):
            out += volume[:, i:y2:factor, j:x2:factor]
    out *= np.float32(1 / factor**2)
    return out


def _windowed_spectrum(vol: np.ndarray) -> np.ndarray:
    window = _tukey(vol.shape[0])[:, None, None] * _tukey(vol.shape[1])[None, :, None] \
        * _tukey(vol.shape[2])[None, None, :]
    return sfft.rfftn(vol * window, workers=-1).astype(np.complex64)


def _tukey(n: int) -> np.ndarray:
    """A Tukey window of length n, flat in the middle, cosine ramps over n // 8 at each end."""
    w = np.ones(n, np.float32)
    if n >= 4:
        edge = max(1, n // 8)
        ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(edge) + 0.5) / edge))
        w[:edge], w[n - edge:] = ramp, ramp[::-1]
    return w


def _content_shift(previous: np.ndarray, current: np.ndarray, shape: tuple[int, int, int],
                   whitening: float) -> np.ndarray:
    """Displacement (voxels of the working grid) of the content from ``previous`` to ``current``
    (their windowed spectra).

    The peak of the cross-correlation, partly whitened (the cross-power spectrum divided by its
    magnitude to the power ``whitening``: 0 is plain correlation, dominated by the dendrite shaft,
    which slides along itself; 1 is phase correlation, dominated by noise), refined to a fraction of
    a voxel by a parabola through the peak and its neighbours along each axis.
    """
    cross = current * np.conj(previous)
    if whitening > 0:
        magnitude = np.abs(cross)
        cross = cross / np.maximum(magnitude, 1e-12 * float(magnitude.max())) ** whitening
    corr = sfft.irfftn(cross, s=shape, workers=-1)
    peak = np.array(np.unravel_index(int(np.argmax(corr)), shape))
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


def _two_pass_shift(previous: tuple[np.ndarray, np.ndarray], current: tuple[np.ndarray, np.ndarray],
                    whitening: float) -> np.ndarray:
    """Content displacement from ``previous`` to ``current`` ((volume, windowed spectrum) pairs).

    The window is fixed to the image frame and so pulls the first estimate toward zero; the second
    pass correlates only the overlap of the two sessions after the first whole-voxel shift, where
    the window sits on the same content in both.
    """
    shape = previous[0].shape
    first = _content_shift(previous[1], current[1], shape, whitening)
    k = np.round(first).astype(int)
    prev_sl, cur_sl = [], []
    for n, kk in zip(shape, k, strict=True):
        if abs(kk) > n // 2:
            return first
        prev_sl.append(slice(max(0, -kk), n - max(0, kk)))
        cur_sl.append(slice(max(0, kk), n - max(0, -kk)))
    a, b = previous[0][tuple(prev_sl)], current[0][tuple(cur_sl)]
    return k + _content_shift(_windowed_spectrum(a), _windowed_spectrum(b), a.shape, whitening)


def estimate_drift(series, voxel_size_um: Sequence[float] | None = None, *, reference: int = 0,
                   work_voxel_um: float = 0.3, smooth_um: float = 0.15, background_um: float = 2.0,
                   whitening: float = 0.5, progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> np.ndarray:
    """Translation of every session relative to ``reference``.

    Parameters
    ----------
    series
        ``(T, Z, Y, X)`` array (numpy, memory-mapped or dask; read one session at a time) or a
        ``Series`` with ``.data`` and ``.voxel_size_um``.
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
    data, voxel_um = session_array(series, voxel_size_um)
    if voxel_um is None:
        raise InputError("estimate_drift needs the voxel size (z, y, x in µm): pass voxel_size_um.")
    n_sessions = int(data.shape[0])
    if not 0 <= reference < n_sessions:
        raise InputError(f"reference session {reference} is outside the series (T={n_sessions}).")
    bin_yx = max(1, int(np.floor(work_voxel_um / max(voxel_um[1], voxel_um[2]) + 1e-6)))
    bin_yx = min(bin_yx, max(1, min(data.shape[2], data.shape[3]) // 16))
    work_scale = np.array([1.0, bin_yx, bin_yx])

    steps = np.zeros((n_sessions, 3))
    previous = None
    for t in range(n_sessions):
        if should_stop is not None and should_stop():
            raise Cancelled("drift estimation stopped")
        current = _prepare(np.asarray(data[t]), voxel_um, bin_yx, smooth_um, background_um)
        if previous is not None:
            steps[t] = _two_pass_shift(previous, current, whitening) * work_scale
            log.debug("session %d: step %s voxels", t, steps[t])
        previous = current
        if progress is not None:
            progress(t + 1, n_sessions)
    drift = np.cumsum(steps, axis=0)
    return drift - drift[reference]
