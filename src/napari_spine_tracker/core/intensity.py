"""Input intensity normalisation and resampling to the model's voxel grid.

Normalisation is per session and computed on the whole session (a strided sample of its
planes), never per tile, so that every tile of a session sees the same mapping::

    normalised = (raw - background) / (bright - background)

with ``background`` a low percentile (most voxels of a two-photon stack are background) and
``bright`` a high percentile, floored at a multiple of the background noise so that an almost
empty field is not blown up to full scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEFAULT_NORMALIZATION: dict[str, Any] = {
    "method": "percentile",
    "low_pct": 50.0,
    "high_pct": 99.8,
    "min_snr": 8.0,  # bright >= background + min_snr * noise sigma
}


def sample_step(shape, max_voxels: int = 4_000_000) -> int:
    """The z stride at which :func:`sample_planes` reads a (Z, Y, X) volume of ``shape``."""
    z, y, x = shape
    return max(1, int(np.ceil(z * y * x / max_voxels)))


def sample_planes(volume, max_voxels: int = 4_000_000) -> np.ndarray:
    """Up to ``max_voxels`` voxels of a (Z, Y, X) array-like, read plane by plane with a z stride."""
    step = sample_step(volume.shape, max_voxels)
    return np.stack([np.asarray(volume[i]) for i in range(0, volume.shape[0], step)])


def session_range(volume, normalization: dict[str, Any] = DEFAULT_NORMALIZATION) -> tuple[float, float]:
    """(background, bright) of one session, per the module docstring. ``volume``: (Z, Y, X)."""
    sample = sample_planes(volume)
    return range_from(lambda q: percentiles(sample, q), normalization)


def range_from(percentile, normalization: dict[str, Any] = DEFAULT_NORMALIZATION) -> tuple[float, float]:
    """(background, bright) from ``percentile(q)``, the percentiles ``q`` of a session's sample."""
    # robust noise sigma of the background from the spread below the background level (the MAD of
    # the voxels below it: the distance from that level to their median, the percentile half way)
    low_pct = normalization["low_pct"]
    half, low, high = percentile([low_pct / 2, low_pct, normalization["high_pct"]])
    noise = float(low - half) * 1.4826
    high = max(float(high), float(low) + normalization["min_snr"] * max(noise, 1e-3), float(low) + 1.0)
    return float(low), high


#: whole numbers from 0 up to this are counted, not sorted, for their percentiles
COUNTED_BELOW = 2**24


def percentiles(values: np.ndarray, q) -> np.ndarray:
    """``np.percentile(values, q)`` (linear interpolation), by counting for whole numbers (camera
    data: 5x faster than sorting) and by ``np.percentile`` otherwise."""
    values = np.asarray(values)
    if values.dtype.kind not in "ui" or values.size == 0 or values.min() < 0 or values.max() >= COUNTED_BELOW:
        return np.percentile(values.astype(np.float32, copy=False), np.asarray(q, dtype=np.float64))
    return percentiles_of_counts(np.bincount(values.ravel()), q)


def percentiles_of_counts(counts: np.ndarray, q) -> np.ndarray:
    """:func:`percentiles` of the values whose counts are ``counts`` (``counts[v]``: how many are v)."""
    q = np.asarray(q, dtype=np.float64)
    cumulative = np.cumsum(counts)
    rank = q / 100.0 * (cumulative[-1] - 1)
    lower, upper = (np.searchsorted(cumulative, np.floor(rank), side="right"),
                    np.searchsorted(cumulative, np.ceil(rank), side="right"))
    return lower + (rank - np.floor(rank)) * (upper - lower)


def normalize(block: np.ndarray, intensity_range: tuple[float, float], *, in_place: bool = False) -> np.ndarray:
    """Map raw intensities to float32 with background 0 and bright structures near 1.

    ``in_place``: overwrite ``block`` (float32, one's own: a NumPy array or a ``torch`` tensor)
    instead of allocating the result."""
    low, high = intensity_range
    if in_place:  # Python numbers keep a float32 block float32, in NumPy and torch alike
        out = block
        out -= float(np.float32(low))
    else:
        out = np.asarray(block, dtype=np.float32) - np.float32(low)
    out *= float(np.float32(1.0 / (high - low)))
    return out


def resample_positions(n_out: int, start: int, scale: float) -> np.ndarray:
    """Native (input) coordinates of model-grid voxels ``start .. start+n_out-1`` along one axis.

    ``scale`` = native voxel size / model voxel size (model voxel i covers native
    ``(i + 0.5) / scale - 0.5``), so that voxel centres, not corners, line up.
    """
    idx = np.arange(start, start + n_out, dtype=np.float64)
    return (idx + 0.5) / scale - 0.5


def _resample_plan(volume_shape, origin, shape, scale):
    """How a block of the model grid is read from a native volume, per axis: the native range
    ``[start, stop)`` to read (clipped to the volume; None when the block misses the volume) and,
    unless the grids agree (``scale`` 1 on every axis: ``direct``, the block's slice ``dst`` of
    the native slice ``src``), each output voxel's two native neighbours (indices into the range
    read), its weight on the second and whether it lies inside the volume.
    """
    positions = [resample_positions(n, o, s) for n, o, s in zip(shape, origin, scale)]
    clo = [max(0, int(np.floor(p.min()))) for p in positions]
    chi = [min(n, int(np.floor(p.max())) + 2) for p, n in zip(positions, volume_shape)]
    if any(a >= b for a, b in zip(clo, chi)):
        return None
    if all(abs(s - 1.0) < 1e-9 for s in scale):
        src = tuple(slice(max(0, o), min(n, o + k)) for o, k, n in zip(origin, shape, volume_shape))
        dst = tuple(slice(max(0, o) - o, min(n, o + k) - o) for o, k, n in zip(origin, shape, volume_shape))
        return {"direct": True, "src": src, "dst": dst}
    axes = []
    for p, a, b, n in zip(positions, clo, chi, volume_shape):
        inside = (p >= -0.5) & (p <= n - 0.5)
        p = np.clip(p, 0, n - 1) - a
        i0 = np.clip(np.floor(p).astype(np.int64), 0, b - a - 1)
        i1 = np.clip(i0 + 1, 0, b - a - 1)
        axes.append((i0, i1, (p - i0).astype(np.float32), inside))
    return {"direct": False, "src": tuple(slice(a, b) for a, b in zip(clo, chi)), "axes": axes}


def read_resampled(volume, origin: tuple[int, int, int], shape: tuple[int, int, int],
                   scale: tuple[float, float, float], fill: float) -> np.ndarray:
    """Read a block of the model grid from a native (Z, Y, X) array-like, trilinearly.

    ``origin``/``shape`` are in model voxels (may extend past the volume: those voxels get
    ``fill``). Reads only the native region the block needs. Returns float32 ``shape``.
    """
    out = np.full(shape, fill, dtype=np.float32)
    plan = _resample_plan(volume.shape, origin, shape, scale)
    if plan is None:
        return out
    if plan["direct"]:  # model grid == native grid: one converting copy
        out[plan["dst"]] = volume[plan["src"]]
        return out
    native = np.asarray(volume[plan["src"]], dtype=np.float32)
    # separable linear interpolation; positions outside the native volume are filled
    for axis, (i0, i1, w, _) in enumerate(plan["axes"]):
        w = w.reshape([-1 if a == axis else 1 for a in range(3)])
        native = np.take(native, i0, axis=axis) * (1 - w) + np.take(native, i1, axis=axis) * w
    inside = [a[3] for a in plan["axes"]]
    mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out[mask] = native[mask]
    return out


def read_resampled_tensor(volume, origin: tuple[int, int, int], shape: tuple[int, int, int],
                          scale: tuple[float, float, float], fill: float, decode=None):
    """:func:`read_resampled` for a ``torch`` tensor (Z, Y, X), on the tensor's device: the same
    values, float32 of ``shape``. ``decode`` turns a block of the tensor into float32 (default
    ``.float()``; ``infer.DeviceSessions`` holds unsigned 16-bit data as int16)."""
    import torch

    decode = decode or (lambda raw: raw.float())
    out = torch.full(tuple(shape), float(fill), dtype=torch.float32, device=volume.device)
    plan = _resample_plan(volume.shape, origin, shape, scale)
    if plan is None:
        return out
    if plan["direct"]:
        out[plan["dst"]] = decode(volume[plan["src"]])
        return out
    native = decode(volume[plan["src"]])
    for axis, (i0, i1, w, _) in enumerate(plan["axes"]):
        index = [torch.from_numpy(i).to(volume.device) for i in (i0, i1)]
        w = torch.from_numpy(w).to(volume.device).reshape([-1 if a == axis else 1 for a in range(3)])
        native = native.index_select(axis, index[0]) * (1 - w) + native.index_select(axis, index[1]) * w
    mask = [torch.from_numpy(a[3]).to(volume.device) for a in plan["axes"]]
    inside = mask[0][:, None, None] & mask[1][None, :, None] & mask[2][None, None, :]
    return torch.where(inside, native, out)


#: input voxel sizes within this relative distance of the model's are used as they are: the
#: network is trained on voxel sizes jittered that much, and resampling would only cost time
VOXEL_TOLERANCE = 0.15


def grid_scale(voxel_size_um, model_voxel_um, tolerance: float = VOXEL_TOLERANCE) -> tuple[float, float, float]:
    """Per axis native voxel size / model voxel size: the factor from native to model-grid voxels
    (1.0 on axes where the two agree within ``tolerance``)."""
    scale = []
    for native, model in zip(voxel_size_um, model_voxel_um):
        ratio = float(native) / float(model)
        scale.append(1.0 if abs(ratio - 1.0) <= tolerance else ratio)
    return tuple(scale)


def affine_grid_yx(matrix, offset, shape_yx, source_yx, device=None):
    """Where output pixel ``u`` (y, x) of ``shape_yx`` samples a source of ``source_yx`` pixels:
    at ``matrix @ u + offset`` (source pixels), as the grid ``torch.nn.functional.grid_sample``
    takes (N, h, w, 2: x then y, from -1 to 1 over the first to last source pixel centres). One
    map ((2, 2) and (2,)) or N of them ((N, 2, 2), (N, 2)); the grid is made on ``device`` by
    ``torch.nn.functional.affine_grid``, so that on a GPU no point is computed on the CPU and
    copied over (float32: within 1e-4 pixel of the map on fields of a few hundred pixels)."""
    import torch

    matrix = np.asarray(matrix, float).reshape(-1, 2, 2)
    offset = np.asarray(offset, float).reshape(-1, 2)
    h, w = (int(n) for n in shape_yx)
    # source pixels -> grid units, and grid units (from -1) -> output pixels
    to_grid = 2 / np.maximum(np.asarray(source_yx, float) - 1, 1)
    to_pixels = np.array([h - 1, w - 1], float) / 2
    linear = to_grid[None, :, None] * matrix * to_pixels[None, None, :]
    shift = to_grid[None] * (matrix @ to_pixels + offset) - 1
    theta = np.concatenate([linear[:, ::-1, ::-1], shift[:, ::-1, None]], axis=2)  # x first
    theta = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32)).to(device)
    return torch.nn.functional.affine_grid(theta, [len(theta), 1, h, w], align_corners=True)


def grid_inside(grid, source_yx, low_yx, high_yx):
    """(N, h, w) bool, where ``grid`` is (:func:`affine_grid_yx` for a source of ``source_yx``
    pixels): whether each point lies within ``low_yx`` to ``high_yx`` (source pixels, inclusive)."""
    inside = None
    for axis, (n, low, high) in enumerate(zip(source_yx, low_yx, high_yx)):
        pixels = (grid[..., 1 - axis] + 1) * (max(int(n) - 1, 1) / 2)
        here = (pixels >= float(low)) & (pixels <= float(high))
        inside = here if inside is None else inside & here
    return inside


def sample_planes_yx(planes, grid, padding: str = "zeros"):
    """Every plane of ``planes`` (Z, Y, X) sampled bilinearly at the points of ``grid``
    (:func:`affine_grid_yx` for the planes' y, x size; N sets of points). Returns float32
    (N, Z, h, w); outside the planes 0 (``padding="zeros"``) or the nearest edge (``"border"``).
    The sampling runs where the grid is; planes given as a ``torch`` tensor come back as a tensor,
    NumPy planes as NumPy.

    The planes are the channels of one ``torch`` ``grid_sample``, so the weights are computed once
    for all of them: 0.38 s for 32 x 1100 x 1100 on 2 cores, against 3.6 s for
    ``scipy.ndimage.affine_transform`` (the same values, tested).
    """
    import torch

    as_tensor = torch.is_tensor(planes)
    source = (planes.float() if as_tensor else
              torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)).to(grid.device))
    sampled = torch.nn.functional.grid_sample(source.expand(len(grid), *source.shape), grid, mode="bilinear",
                                              padding_mode=padding, align_corners=True)
    return sampled if as_tensor else sampled.cpu().numpy()
