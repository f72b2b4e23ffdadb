"""Tiled inference over a whole series of any size, on CPU or GPU.

The series stays where it is (a numpy array, a memory map or a lazy TIFF reader): each tile of
each session is read, resampled to the model grid and normalised on its own, so memory is the
input plus a few tiles, never a float copy of the series.

Geometry. The model grid of session ``t`` is its native grid scaled by ``scale`` (native voxel /
model voxel, see core/intensity.py). Tiles partition the model grid of the reference frame into
*cores*; a tile reads its core plus a *halo* of context, and keeps only the peaks inside its core,
so a spine on a seam is reported exactly once. Session ``t``'s tile is read at the tile position
moved by the session's rounded registration drift, so the ConvLSTM, which runs over all sessions
of a tile, sees roughly aligned content and the displacement head only has to find what remains.
A session that registration found turned (``core.register.RigidMotion``) is instead resampled
through its whole rigid motion (one trilinear affine map per tile), and its peaks are mapped back
through the same motion, so coordinates stay in each session's own grid. A tile covers the union
of the sessions' fields; each session is run on a cut of it that holds its own field
(:func:`session_cuts`), not on the padding around it.

Test-time augmentation (``InferenceOptions.views``): the network also sees the tile's mirror
images in xy (each with its own ConvLSTM state), and the heatmap is the mean probability over the
views, mirrored back. Training turned and flipped patches in xy, so each view is as good a guess
as the plain one and their mean is a better one. Tiles are then an even number of voxels in y and
x, so that the output grid (stride 2) of a mirrored tile is exactly the mirror of the plain one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import Cancelled, InputError, number_or_nan
from .decode import ADAPT_FLOOR, decode_peaks, nms_kernel, series_threshold
from .devices import (
    PinnedStaging,
    as_stored_on,
    free_memory,
    give_back_free_memory,
    inference_autocast,
    reuse_freed_memory,
    stored_dtype,
)
from .intensity import (
    COUNTED_BELOW,
    affine_grid_yx,
    grid_inside,
    grid_scale,
    normalize,
    percentiles,
    percentiles_of_counts,
    range_from,
    read_resampled,
    read_resampled_tensor,
    sample_planes_yx,
    sample_step,
    session_range,
)
from .register import as_motion

log = logging.getLogger(__name__)

DETECTION_COLUMNS = ["t", "z", "y", "x", "score", "dz", "dy", "dx", "head_radius_um"]
#: the mirror images of a (..., Y, X) tile that ``views`` test-time augmentation averages, in
#: order: as is, turned by 180 degrees, flipped in x, flipped in y (the dims to flip)
VIEW_FLIPS: tuple[tuple[int, ...], ...] = ((), (-2, -1), (-1,), (-2,))


@dataclass(frozen=True)
class Tile:
    origin: tuple[int, int, int]  # model-grid voxel of the tile input's first voxel (reference frame)
    keep: tuple[slice, slice, slice]  # the core, in tile-input voxels


@dataclass(frozen=True)
class TilePlan:
    input_shape: tuple[int, int, int]  # every tile reads this many model-grid voxels
    tiles: tuple[Tile, ...]


def plan_tiles(model_shape: Sequence[int], max_input: Sequence[int], halo: Sequence[int],
               multiple: Sequence[int] = (1, 1, 1), align: Sequence[int] = (1, 1, 1),
               mirrored: bool = False) -> TilePlan:
    """Cut ``model_shape`` into tiles whose cores partition it.

    Along an axis that fits in ``max_input`` there is one tile (no halo needed: the volume edge is
    the edge); otherwise as few tiles as cores of at most ``max_input`` less the halos allow, with
    equal cores and at least ``halo`` context on each side, so that a volume a little larger than
    one tile costs a little more than one tile, not twice as much per axis. Input shapes are
    rounded up to ``multiple``; SpineNet takes any size, so inference reads exactly what it needs
    (rounding a drifted 256 x 256 x 32 field up to the network's total stride read a third more
    voxels).

    Tile origins are multiples of ``align`` (the cores, and the context before them, are rounded
    up to it). With the network's total stride there, every tile puts its voxels at the same place
    on the strided levels' grids as one tile for the whole volume would, so that tiling changes
    only what lies beyond a tile's context, not how every voxel is sampled: unaligned tiles of a
    drifted series moved confident spines by up to a z voxel (docs/model_report.md, "Tiles on the
    network's grid").

    ``mirrored``: tiles that will also run mirrored (test-time augmentation) get a size that
    leaves the same remainder, divided by ``align``, as one tile for the whole volume (the context
    after a core grows by less than ``align``), so that a mirrored tile's voxels also lie on the
    grids as the mirrored whole volume's do.
    """
    axes_origins, axes_keep, input_shape = [], [], []
    for n, limit, h, m, a in zip(model_shape, max_input, halo, multiple, align):
        n, limit, h, m, a = int(n), int(limit), int(h), int(m), int(a)
        if n <= limit:
            size = math.ceil(n / m) * m
            axes_origins.append([0])
            axes_keep.append([slice(0, n)])
        else:
            largest = max(m, (limit // m) * m)
            lead = math.ceil(h / a) * a  # context before a core, so that its origin is on the grid
            trail = h + (math.ceil(n / m) * m - h) % a if mirrored else h  # and after it
            widest = (largest - lead - trail) // a * a
            if widest < a:
                raise InputError(f"tiles of {largest} voxels are too small for a halo of {h} voxels on a network "
                                 f"of stride {a}: use tiles of at least {lead + a + trail} voxels, or a smaller halo.")
            count = math.ceil(n / widest)
            core = math.ceil(n / count / a) * a
            size = math.ceil((lead + core + trail) / m) * m
            axes_origins.append([i * core - lead for i in range(count)])
            axes_keep.append([slice(lead, lead + min(core, n - i * core)) for i in range(count)])
        input_shape.append(size)
    tiles = tuple(
        Tile(tuple(o), tuple(k))
        for o, k in zip(itertools.product(*axes_origins), itertools.product(*axes_keep))
    )
    return TilePlan(tuple(input_shape), tiles)


class _SessionView:
    """(Z, Y, X) view of one session of a lazy (T, Z, Y, X) array, cropped to its own shape."""

    def __init__(self, data, t: int, shape: Sequence[int] | None = None):
        self.data, self.t = data, t
        self.shape = tuple(shape) if shape is not None else tuple(data.shape[1:])

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        clipped = []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                clipped.append(slice(start, stop, step))
            else:
                clipped.append(k)
        return np.asarray(self.data[(self.t, *clipped)])


#: the threshold's words: the model's lowered to the series' own split, and the model's as it is
THRESHOLD_WORDS = ("auto", "model")


@dataclass
class InferenceOptions:
    # a peak probability, "model" (the model's own, chosen on validation) or "auto" (None): the
    # model's, lowered where the series' own peak scores split lower (decode.series_threshold)
    threshold: float | str | None = None
    max_tile: tuple[int, int, int] | None = None  # model-grid voxels; None: by device
    # context around a tile's core, model-grid voxels (the context before a core is rounded up to
    # the network's stride, see plan_tiles): with 16, tiles find what one tile for the whole
    # field finds to within ~1 % of peaks moved by more than 0.1 voxel; with 24, the same to float
    # rounding, reading 20-35 % more voxels (docs/model_report.md, "Tiles on the network's grid")
    halo: tuple[int, int, int] = (4, 16, 16)
    batch_size: int | None = None  # tiles per batch
    session_chunk: int | None = None  # sessions per network call (the ConvLSTM carries state between)
    precision: str = "float16"  # on CUDA: float16, bfloat16 or float32 (see devices.inference_autocast)
    views: int = 1  # test-time augmentation: 1, 2 or 4 mirror images of each tile (see VIEW_FLIPS)
    cut_sessions: bool = True  # run each session on its own field within the tile (see session_cuts)
    # hold the series in the device's memory and cut tiles there (see DeviceSessions); None: on a
    # CUDA device when the series takes at most a quarter of its free memory
    resident: bool | None = None
    # also keep the peaks from this probability up to the threshold (suggestions of missed spines);
    # None: only those above the threshold
    suggest_floor: float | None = None

    def __post_init__(self):
        check_views(self.views)
        check_threshold(self.threshold)
        if self.suggest_floor is not None and not 0 < self.suggest_floor < 1:
            raise InputError(f"suggest_floor must be a peak probability between 0 and 1, got {self.suggest_floor!r}.")

    def decoding(self, model) -> tuple[float, bool]:
        """(the threshold, or the ceiling of an adapted one; whether it adapts to the series)."""
        if self.threshold is None or self.threshold in THRESHOLD_WORDS:
            return float(model.decode["threshold"]), self.threshold != "model"
        return float(self.threshold), False


def check_threshold(threshold) -> None:
    """An InputError unless ``threshold`` is a probability in (0, 1), "auto", "model" or None."""
    if threshold is None or (isinstance(threshold, str) and threshold in THRESHOLD_WORDS):
        return
    value = number_or_nan(threshold)
    if isinstance(threshold, bool) or not 0 < value < 1:
        raise InputError(f"threshold must be a peak probability between 0 and 1, 'auto' (the model's, lowered "
                         f"to the series' own split where that is lower) or 'model', got {threshold!r}.")


def parse_threshold(text: str) -> float | str:
    """A threshold written as text (a command line): a probability, "auto" or "model"; an
    InputError unless it is one."""
    if text in THRESHOLD_WORDS:
        return text
    check_threshold(text)  # says what was wrong in the words given
    return float(text)


def check_views(views) -> int:
    """``views`` if it is a valid number of mirror images (1, 2 or 4), else an InputError."""
    if views not in (1, 2, 4) or isinstance(views, bool):
        raise InputError(f"views must be 1, 2 or 4 (mirror images of each tile to average), got {views!r}.")
    return views


def predict_series(data, voxel_size_um: Sequence[float], model, *, drift_vox: np.ndarray | None = None,
                   motion=None, session_shapes: Sequence[Sequence[int]] | None = None,
                   options: InferenceOptions | None = None, held: DeviceSessions | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """Run ``model`` (a core.models.LoadedModel) over ``data`` (T, Z, Y, X).

    Returns one row per detection: t, z, y, x (voxels of session t's own grid), score,
    dz, dy, dx (native voxels to the same spine in session t-1; NaN in the first session) and
    head_radius_um. ``drift_vox`` (T, 3) native voxels, or ``motion`` (a ``RigidMotion``, with
    rotation; it replaces ``drift_vox``), see core/register.py. ``held``: ``data`` already held on
    the model's device (:meth:`DeviceSessions.for_run`), used unless ``options.resident`` is False.

    Peaks are kept above ``options.threshold``; by default the model's threshold, lowered to the
    split of this series' own peak scores where that is lower (``decode.series_threshold``). The
    threshold used is in ``table.attrs["threshold"]`` (``"threshold_adapted"``: whether it adapted).
    With ``options.suggest_floor`` the peaks from there up to the threshold are kept too (the
    caller tells them apart by ``attrs["threshold"]``).

    On CUDA out-of-memory the run starts again with the series read from where it is (if it was
    held on the GPU), then with half the batch, then with smaller tiles; if reduced precision gives
    a result that is not finite, it starts again in float32.
    """
    import torch

    options = options or InferenceOptions()
    motion = as_motion(motion, drift_vox, data.shape[0], voxel_size_um)
    if options.resident is None:
        options = dataclasses.replace(options, resident=held is not None or DeviceSessions.worth_it(
            data, _session_shapes(data, session_shapes), model.device))
    while True:
        try:
            with reuse_freed_memory():
                table = _predict(data, voxel_size_um, model, motion, session_shapes, options, progress, should_stop,
                                 held=held if options.resident else None)
            break
        except _NotFinite:  # raised in reduced precision only
            log.warning("%s inference gave values that are not finite; running again in float32", options.precision)
            options = dataclasses.replace(options, precision="float32")
        except torch.cuda.OutOfMemoryError:
            if held is not None and options.resident:  # the first retry reads from where the series is
                held.release()
            free_memory(model.device)
            smaller = _smaller(options, model)
            if smaller is None:
                raise
            log.warning("out of GPU memory; retrying with batch %s, tiles %s", smaller.batch_size, smaller.max_tile)
            options = smaller
    threshold, adapt = options.decoding(model)
    if adapt:
        ceiling, threshold = threshold, series_threshold(table["score"], threshold)
        kept_from = threshold if options.suggest_floor is None else min(threshold, options.suggest_floor)
        table = table[table["score"] >= kept_from].reset_index(drop=True)
        if threshold < ceiling:
            log.info("peak threshold %.2f: this series' peak scores split lower than on data like the model's "
                     "training data (threshold %.2f)", threshold, ceiling)
    table.attrs.update(threshold=threshold, threshold_adapted=adapt)
    return table


def _session_shapes(data, session_shapes) -> list[tuple[int, ...]]:
    """Each session's own (Z, Y, X): ``session_shapes``, or the series' for every session."""
    if session_shapes is not None:
        return [tuple(s) for s in session_shapes]
    return [tuple(data.shape[1:])] * data.shape[0]


def _smaller(options: InferenceOptions, model) -> InferenceOptions | None:
    """The next, more frugal options after an out-of-memory error (None: nothing left to shrink):
    the series read from where it is instead of held on the device, then half the batch, then
    smaller tiles."""
    if options.resident:
        return dataclasses.replace(options, resident=False)
    batch = options.batch_size or _default_batch(model.device, options.max_tile or _default_max_tile(model.device))
    tile = options.max_tile or _default_max_tile(model.device)
    if batch > 1:
        return dataclasses.replace(options, max_tile=tile, batch_size=batch // 2)
    minimum = [4 * h for h in options.halo]
    halved = tuple(max(m, t // 2) if axis else t for axis, (t, m) in enumerate(zip(tile, minimum)))
    if halved == tuple(tile):
        return None
    return dataclasses.replace(options, max_tile=halved, batch_size=1)


class DeviceSessions:
    """The sessions of a series held in a device's memory as they are stored (16-bit data stay two
    bytes a voxel), so that tiles are cut, resampled and normalised there.

    On a GPU, reading each tile on the CPU (a converting copy to float32 and the normalising),
    stacking the tiles and copying them over took more of an end-to-end run than the network
    (docs/model_report.md, "On a GPU"); held on the GPU, the series crosses once, in its stored form. Host memory
    stays at one session at a time, read from wherever the series is (a lazy reader too).
    """

    #: sessions cross to a GPU in chunks through page-locked buffers (:class:`~.devices.PinnedStaging`),
    #: each chunk written while the one before crosses; False: each session copied from where it is
    #: read (``benchmarks/profile_detect.py --staging pageable`` measures the difference)
    staged = True

    def __init__(self, sessions: Sequence, device):
        self.device = device
        self.volumes, self.decoders, self.whole = [], [], []
        staging = PinnedStaging.for_device(device) if self.staged else None
        with staging or contextlib.nullcontext():  # its end waits for the last copies
            for session in sessions:
                self.hold_on_device(session[:, :, :], staging)

    def hold_on_device(self, raw, staging: PinnedStaging | None = None) -> None:
        """Copy one session (Z, Y, X) to the device as stored (through ``staging`` if given)."""
        volume, to_float = as_stored_on(raw, self.device, staging)
        self.volumes.append(volume)
        self.decoders.append(to_float)
        self.whole.append(np.asarray(raw).dtype.kind in "ui")

    @classmethod
    def for_run(cls, data, session_shapes, device, resident: bool | None) -> DeviceSessions | None:
        """The series held on ``device`` for a whole run, registration and inference (None: not
        held): as ``resident`` says (None: :meth:`worth_it`), when every session has the series'
        own shape (registration reads whole sessions)."""
        shapes = _session_shapes(data, session_shapes)
        if resident is False or any(s != tuple(data.shape[1:]) for s in shapes):
            return None
        if resident is None and not cls.worth_it(data, shapes, device):
            return None
        import torch

        try:
            return cls([_SessionView(data, t) for t in range(data.shape[0])], device)
        except torch.cuda.OutOfMemoryError:
            free_memory(device)
            log.warning("out of GPU memory holding the series there; reading it from where it is")
            return None

    @property
    def shape(self) -> tuple[int, ...]:
        """(T, Z, Y, X), for sessions of one shape (see :meth:`for_run`)."""
        return (len(self.volumes), *self.volumes[0].shape)

    def __getitem__(self, t: int):
        """Session ``t``, float32 on the device: what registration reads."""
        return self.decoders[t](self.volumes[t])

    def release(self) -> None:
        """Let go of the held sessions (their memory returns to the device's cache)."""
        self.volumes.clear()
        self.decoders.clear()
        self.whole.clear()

    def range(self, t: int, normalization) -> tuple[float, float]:
        """:func:`~napari_spine_tracker.core.intensity.session_range` of session ``t`` (the same
        planes, the same numbers), its whole numbers counted on the device."""
        import torch

        volume = self.volumes[t]
        sample = self.decoders[t](volume[::sample_step(volume.shape)])
        low, high = torch.aminmax(sample)
        if not (self.whole[t] and low >= 0 and high < COUNTED_BELOW):
            values = sample.cpu().numpy()
            return range_from(lambda q: percentiles(values, q), normalization)
        counts = torch.bincount(sample.flatten().to(torch.int64)).cpu().numpy()
        return range_from(lambda q: percentiles_of_counts(counts, q), normalization)

    @staticmethod
    def stored_bytes(data, shapes) -> int:
        """What the sessions take as stored (float64 and 32-bit integers as float32)."""
        return int(sum(np.prod(s) for s in shapes)) * stored_dtype(data.dtype).itemsize

    @staticmethod
    def worth_it(data, shapes, device, share: float = 0.25) -> bool:
        """On CUDA, when the stored series takes at most ``share`` of the device's free memory."""
        import torch

        if device.type != "cuda":
            return False
        free, _total = torch.cuda.mem_get_info(device)
        return DeviceSessions.stored_bytes(data, shapes) <= share * free

    def read(self, t: int, origin, shape, scale, fill: float):
        """:func:`~napari_spine_tracker.core.intensity.read_resampled` of session ``t``, a float32
        tensor on the device."""
        return read_resampled_tensor(self.volumes[t], origin, shape, scale, fill, decode=self.decoders[t])

    def block(self, t: int, region):
        """``region`` (a tuple of slices) of session ``t``, float32 on the device."""
        return self.decoders[t](self.volumes[t][region])

    def put(self, array: np.ndarray):
        """A NumPy array on the device."""
        import torch

        return torch.from_numpy(array).to(self.device)

    def full(self, shape, fill: float):
        import torch

        return torch.full(tuple(shape), float(fill), dtype=torch.float32, device=self.device)


class _Frames:
    """Where session ``t``'s model-grid voxels lie in the reference frame's model grid, and back.

    Unturned sessions move by their rounded drift (``shift``, whole model voxels); a turned one
    through its whole motion (see the module docstring)."""

    def __init__(self, motion, scale: np.ndarray, shape, device=None, resident: DeviceSessions | None = None):
        self.motion, self.scale, self.device, self.resident = motion, scale, device, resident
        self.shift = np.round(motion.drift_vox * scale).astype(int)  # model-grid voxels
        self.turned = [bool(a) for a in motion.angle_rad]
        self.shape = tuple(shape)  # every session's (Z, Y, X), padded to the series'

    def box(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """[low, high) model voxels of the reference frame that session ``t``'s field covers."""
        model_shape = np.ceil(np.asarray(self.shape) * self.scale).astype(int)
        if not self.turned[t]:
            return -self.shift[t], model_shape - self.shift[t]
        corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in self.shape])))
        model = (self.motion.to_reference(corners, t) + 0.5) * self.scale - 0.5
        return np.floor(model.min(axis=0)).astype(int), np.ceil(model.max(axis=0)).astype(int) + 1

    def to_native(self, model_pos: np.ndarray, t: int) -> np.ndarray:
        """Reference-frame model voxels -> session ``t``'s native voxels."""
        if not self.turned[t]:
            return (model_pos + self.shift[t] + 0.5) / self.scale - 0.5
        return self.motion.to_session((model_pos + 0.5) / self.scale - 0.5, t)

    def read(self, volume, t: int, origin, shape, fill: float) -> np.ndarray:
        """The tile at ``origin`` (reference-frame model voxels) of session ``t``, float32 (a tensor
        on the device when the series is held there)."""
        if not self.turned[t]:
            at = tuple(int(o) for o in np.asarray(origin) + self.shift[t])
            if self.resident is not None:
                return self.resident.read(t, at, shape, tuple(self.scale), fill)
            return read_resampled(volume, at, shape, tuple(self.scale), fill=fill)
        return read_turned(volume, self.motion, t, origin, shape, self.scale, fill, device=self.device,
                           resident=self.resident)


def read_turned(volume, motion, t: int, origin, shape, scale, fill: float, device=None,
                resident: DeviceSessions | None = None):
    """A block of the reference frame's model grid read from session ``t`` through its rigid
    ``motion``, trilinearly (z is resampled on its own: a turn in y, x leaves it alone, and so
    does ``scale``); only the native region it needs is read, voxels outside get ``fill``.

    The y, x planes are sampled together (``intensity.sample_planes_yx``), on ``device`` (the
    model's: on a GPU the sampling runs there). With the series held on the device
    (``resident``), the whole block is made there and comes back as a float32 tensor.
    """
    linear = motion.linear_vox(t)
    matrix = linear / np.asarray(scale, float)[None, :]
    centre = motion.centre_vox
    offset = linear @ ((np.asarray(origin) + 0.5) / scale - 0.5 - centre) + centre + motion.drift_vox[t]
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in shape]))) @ matrix.T + offset
    bounds = np.asarray(volume.shape)
    lo = np.maximum(np.floor(corners.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(corners.max(axis=0)).astype(int) + 2, bounds)
    if resident is None:
        here, out = np.asarray, np.full(shape, fill, dtype=np.float32)
    else:
        here, out = resident.put, resident.full(shape, fill)
    if np.any(lo >= hi):
        return out
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    block = np.asarray(volume[region], dtype=np.float32) if resident is None else resident.block(t, region)
    # z: linear interpolation onto the output planes (the z row of the map is z alone)
    qz = matrix[0, 0] * np.arange(shape[0]) + offset[0]
    z_inside = (qz >= -0.5) & (qz <= bounds[0] - 0.5)
    pz = np.clip(qz, 0, bounds[0] - 1) - lo[0]
    z0 = np.clip(np.floor(pz).astype(np.int64), 0, block.shape[0] - 1)
    z1 = np.minimum(z0 + 1, block.shape[0] - 1)
    wz = here((pz - z0).astype(np.float32)[:, None, None])
    planes = block[here(z0)] * (1 - wz) + block[here(z1)] * wz
    # y, x: bilinear, the same points in every plane, the grid made where the sampling runs
    grid = affine_grid_yx(matrix[1:, 1:], offset[1:] - lo[1:], shape[1:], block.shape[1:],
                          device=device if resident is None else resident.device)
    result = sample_planes_yx(planes, grid, padding="border")[0]
    yx_inside = grid_inside(grid, block.shape[1:], -0.5 - lo[1:], bounds[1:] - 0.5 - lo[1:])[0]
    if resident is None:
        return np.where(z_inside[:, None, None] & yx_inside.cpu().numpy()[None], result, out)
    import torch

    # no wait for the GPU, as a masked copy would
    return torch.where(resident.put(z_inside)[:, None, None] & yx_inside[None], result, out)


def _predict(data, voxel_size_um, model, motion, session_shapes, options: InferenceOptions,
             progress, should_stop, held: DeviceSessions | None = None) -> pd.DataFrame:
    import torch

    t_count = data.shape[0]
    shapes = _session_shapes(data, session_shapes)
    scale = np.asarray(grid_scale(voxel_size_um, model.voxel_size_um))
    net, device = model.net, model.device
    sessions = [_SessionView(data, t, shapes[t]) for t in range(t_count)]
    if options.resident and held is None:
        held = DeviceSessions(sessions, device)
    frames = _Frames(motion, scale, data.shape[1:], device=device, resident=held)
    max_tile = options.max_tile or _default_max_tile(device)
    # tile the union of the sessions' fields in the reference frame, so that what drifted into one
    # session's field is analysed too
    boxes = [frames.box(t) for t in range(t_count)]
    low = np.min([b[0] for b in boxes], axis=0)
    high = np.max([b[1] for b in boxes], axis=0)
    # mirrored tiles need an even size where the output is strided, to mirror the output grid exactly
    plan = plan_tiles(high - low, max_tile, options.halo, net.output_stride if options.views > 1 else (1, 1, 1),
                      align=net.total_stride, mirrored=options.views > 1)
    plan = TilePlan(plan.input_shape, tuple(Tile(tuple(np.asarray(t.origin) + low), t.keep) for t in plan.tiles))
    batch_size = options.batch_size or _default_batch(device, plan.input_shape)
    threshold, adapt = options.decoding(model)
    if adapt:  # peaks down to the floor; predict_series keeps those above the series' threshold
        threshold = min(threshold, ADAPT_FLOOR)
    if options.suggest_floor is not None:
        threshold = min(threshold, options.suggest_floor)
    out_vox = np.asarray(model.voxel_size_um) * np.asarray(net.output_stride)
    kernel = nms_kernel(out_vox, model.decode["nms_radius_um"])
    # the non-maximum suppression window's half-width, model voxels: a tile also reports the peaks
    # this close to its core, for _join_seams
    margin = np.asarray(kernel) // 2 * np.asarray(net.output_stride)
    ranges = [session_range(s, model.normalization) if frames.resident is None
              else frames.resident.range(t, model.normalization) for t, s in enumerate(sessions)]
    model_vox = np.asarray(model.voxel_size_um)

    chunks = session_chunks(t_count, options.session_chunk, device)
    rows: list[np.ndarray] = []
    # per row: its tile's number, whether it is in that tile's core, and its output voxel
    # (reference-frame model voxels), for _join_seams
    tile_of, own, places = [], [], []
    total, done = len(plan.tiles) * t_count, 0
    stride = np.asarray(net.total_stride)
    field_grid = tuple(int(n) for n in -(-np.asarray(plan.input_shape) // stride))  # a tile's coarsest level

    def read(tile, t: int, at=(0, 0, 0), shape=plan.input_shape):
        """Session ``t`` of ``tile``, from ``at`` (tile voxels), model grid, normalised."""
        block = frames.read(sessions[t], t, tuple(np.asarray(tile.origin) + at), shape, ranges[t][0])
        return normalize(block, ranges[t], in_place=True)

    for first in range(0, len(plan.tiles), batch_size):
        tiles = plan.tiles[first : first + batch_size]
        states, previous = [None] * options.views, None
        cuts = (session_cuts([_in_tile(box, tiles[0], plan.input_shape) for box in boxes], plan.input_shape, stride)
                if options.cut_sessions and options.views == 1 and len(tiles) == 1 else None)
        for times in chunks:
            if should_stop is not None and should_stop():
                raise Cancelled("detection cancelled")
            with torch.inference_mode(), inference_autocast(device, options.precision):
                if cuts is None:
                    x = _as_input([[read(tile, t) for t in times] for tile in tiles], device)
                    outputs, states = _forward_views(net, x, previous, states)
                    previous = x[:, -1]
                else:  # each session on its own field (see session_cuts), paired with the one before there
                    shape, at = cuts
                    x = _as_input([[read(tiles[0], t, at[t], shape) for t in times]], device)
                    # the first session pairs with itself, as in the plain call
                    pairs = _as_input([[read(tiles[0], max(t - 1, 0), at[t], shape) for t in times]], device)
                    outputs, state = net.forward_sessions(
                        x, None, states[0], point_heads=True, pairs=pairs, cut_at=[at[t] // stride for t in times],
                        field_grid=field_grid)
                    states = [state]
            if _reduced_precision(device, options) and not torch.isfinite(outputs["heatmap"]).all():
                raise _NotFinite
            flat = {name: value.flatten(0, 1) for name, value in outputs.items()}
            peaks = decode_peaks(flat, net.output_stride, kernel, threshold, heads_at=net.heads_at)
            for i, tile in enumerate(tiles):
                for j, t in enumerate(times):
                    found = peaks[i * len(times) + j]
                    if cuts is not None:
                        found.zyx += cuts[1][t]
                        found.voxel += cuts[1][t]
                    native, in_core, place = _to_native(found, tile, t, frames, model_vox, margin, (low, high))
                    rows.append(native)
                    tile_of.append(np.full(len(native), first + i))
                    own.append(in_core)
                    places.append(place)
            del outputs, flat  # before the next chunk's network call allocates
            done += len(tiles) * len(times)
            if progress is not None:
                progress(done, total)
        if first + batch_size < len(plan.tiles):  # after the last, reuse_freed_memory's end does it
            give_back_free_memory()  # so that freed blocks no later buffer fits do not pile up across tiles
    table = pd.DataFrame(np.concatenate(rows) if rows else np.zeros((0, len(DETECTION_COLUMNS))),
                         columns=DETECTION_COLUMNS)
    table["t"] = table["t"].astype(int)
    if len(plan.tiles) > 1 and len(table):
        table = _join_seams(table, np.concatenate(tile_of), np.concatenate(own), np.concatenate(places), margin)
    return _inside_sessions(table, shapes)


def _forward_views(net, x, previous, states: list):
    """``net.forward_sessions`` on ``len(states)`` mirror images of ``x`` (see :data:`VIEW_FLIPS`),
    each view carrying its own ConvLSTM state. Returns (outputs, states): the heatmap holds the
    logit of the mean probability over the views, mirrored back; the trunk is the plain view's (the
    offset and displacement heads read it at the peaks)."""
    import torch

    if len(states) == 1:
        outputs, state = net.forward_sessions(x, previous, states[0], point_heads=True)
        return outputs, [state]
    probability, finite, after = None, True, []
    for flip, state in zip(VIEW_FLIPS, states):
        view = x.flip(flip) if flip else x
        before = previous.flip(flip) if flip and previous is not None else previous
        out, state = net.forward_sessions(view, before, state, point_heads=True)
        after.append(state)
        finite = torch.isfinite(out["heatmap"]).all() & finite  # a tensor: no wait for the device
        heat = torch.sigmoid(out["heatmap"].float())
        heat = heat.flip(flip) if flip else heat
        probability = heat if probability is None else probability.add_(heat)
        if not flip:
            outputs = out
        del out, heat  # a mirrored view's trunk is not needed while the next view runs
    # the mean of sigmoids would hide an overflow (+inf -> 1): keep it visible to the caller's check
    heatmap = torch.logit(probability.div_(len(states)), eps=1e-6)
    outputs["heatmap"] = torch.where(finite, heatmap, float("nan"))
    return outputs, after


def _to_native(peaks, tile: Tile, t: int, frames: _Frames, model_vox: np.ndarray, margin,
               bounds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peaks of one tile-session (tile-input model voxels) -> (rows in session t's native voxels,
    whether each is in the tile's core, its output voxel in reference-frame model voxels).

    A peak belongs to the tile whose core holds its output voxel, not its refined position: tiles
    on the network's grid share the output grid, so exactly one core holds it. The peaks within
    ``margin`` model voxels of the core (and inside ``bounds``, the tiled region) come too: near
    a seam two tiles may put one spine's peak in neighbouring output voxels, each in the other's
    core, and both would drop it (see _join_seams)."""
    own = np.ones(len(peaks.score), bool)
    near = np.ones(len(peaks.score), bool)
    for axis, keep in enumerate(tile.keep):
        at = peaks.voxel[:, axis]
        own &= (at >= keep.start) & (at < keep.stop)
        near &= (at >= keep.start - margin[axis]) & (at < keep.stop + margin[axis])
        near &= (at + tile.origin[axis] >= bounds[0][axis]) & (at + tile.origin[axis] < bounds[1][axis])
    q = peaks.zyx[near]
    model_pos = q + np.asarray(tile.origin)
    native = frames.to_native(model_pos, t)
    if t > 0:
        disp = frames.to_native(model_pos + peaks.displacement_um[near] / model_vox, t - 1) - native
    else:
        disp = np.full_like(native, np.nan)
    rows = np.column_stack([np.full(len(q), t), native, peaks.score[near], disp,
                            np.maximum(peaks.radius_um[near], 0.0)])
    return rows, own[near], peaks.voxel[near] + np.asarray(tile.origin)


def _join_seams(table: pd.DataFrame, tile: np.ndarray, own: np.ndarray, places: np.ndarray,
                window) -> pd.DataFrame:
    """The peaks of all tiles, each spine once.

    Per row: ``tile``, the number of the tile that found it; ``own``, whether it is in that
    tile's core (else next to it, see _to_native); ``places``, its output voxel (reference-frame
    model voxels). Every core peak stays. A peak next to a core stays unless another tile's peak
    of the same session has its output voxel within ``window`` (model voxels, z, y, x: the
    half-width of the non-maximum suppression, which would have kept one of the two in one tile):
    where that one is in its tile's core, the spine is that tile's; where it is next to its core
    too (each tile put the spine's peak in the other's core), the higher score stays. Where tiles
    agree, as on the network's grid with a wide enough halo, every peak next to a core has its
    core twin, and none stays.
    """
    from scipy.spatial import cKDTree

    if own.all():
        return table
    # scaled so that the window is the unit cube; sessions far apart
    points = np.column_stack([table["t"].to_numpy() * 4.0, places / np.asarray(window, float)])
    beside = np.flatnonzero(~own)
    near = cKDTree(points).query_ball_point(points[beside], 1.0, p=np.inf, return_sorted=False)
    i = np.repeat(beside, [len(n) for n in near])  # (i, j): i next to its core, j within its window
    j = np.concatenate(near).astype(int)
    other = tile[i] != tile[j]
    i, j = i[other], j[other]
    keep = np.ones(len(table), bool)
    keep[i[own[j]]] = False  # another tile's core holds the spine
    # what is left: pairs of peaks next to their cores (each pair twice); the higher score stays
    both = ~own[j] & keep[i] & keep[j]
    i, j = i[both], j[both]
    score = table["score"].to_numpy()
    for k in sorted(set(i), key=lambda k: -score[k]):
        if keep[k]:
            keep[j[i == k]] = False
    return table[keep].reset_index(drop=True)


def _inside_sessions(table: pd.DataFrame, shapes) -> pd.DataFrame:
    """Drop peaks outside each session's own volume (padding of folders with mixed shapes)."""
    if table.empty:
        return table
    limits = np.asarray(shapes, float)[table["t"].to_numpy()]
    zyx = table[["z", "y", "x"]].to_numpy()
    keep = np.all((zyx >= -0.5) & (zyx <= limits - 0.5), axis=1)
    return table[keep].reset_index(drop=True)


def _default_max_tile(device) -> tuple[int, int, int]:
    # large tiles keep the halo overhead low (a 256 x 256 field that drifted by a few µm fits in
    # one tile) and fill a GPU; a lean-model tile of 36 x 384 x 384 needs ~2 GB on a CPU
    return (64, 384, 384)


def _as_input(blocks, device):
    """Nested lists (tiles, sessions) of (Z, Y, X) float32 blocks (NumPy arrays, or tensors where
    the series is held on the device) -> (B, K, 1, Z, Y, X) on ``device``."""
    import torch

    if any(torch.is_tensor(block) for row in blocks for block in row):
        return torch.stack([torch.stack([torch.as_tensor(block, device=device) for block in row])
                            for row in blocks])[:, :, None]
    return torch.from_numpy(np.asarray(blocks, dtype=np.float32)[:, :, None]).to(device)


def _in_tile(box, tile: Tile, input_shape) -> tuple[np.ndarray, np.ndarray]:
    """A session's field ``box`` ([low, high) reference-frame model voxels) in a tile's input
    voxels, clipped to the tile."""
    origin = np.asarray(tile.origin)
    return (np.clip(box[0] - origin, 0, input_shape), np.clip(box[1] - origin, 0, input_shape))


def session_cuts(fields, input_shape, stride) -> tuple[tuple[int, int, int], np.ndarray] | None:
    """Where each session of a tile is run: ``(shape, at)`` with ``at`` (T, 3) tile voxels, or
    None to run every session on the whole tile.

    A tile covers the union of the sessions' fields, so that what drifted into one session's
    field is analysed too; but each session only holds data in its own field, and under 3 µm of
    drift the union is 1.3-1.4x one field. Each session is run on a cut that holds its field
    (``fields``: [low, high) in tile voxels, per session), starting on a multiple of the network's
    total ``stride`` so that its coarsest level lines up with the ConvLSTM state of the whole tile
    (see ``SpineNet.forward_sessions``). The cuts have one shape, so that sessions still run as a
    batch. An axis along which the cuts would not be smaller than the tile, or would not hold
    every field, is not cut. A cut may reach past the tile's last voxel by less than the stride
    (the state covers the tile's coarsest level, rounded up). On the large-drift test series the
    cuts are 0.81-0.84x the tile (268-271 x 269-271 instead of 277-303 x 298-311 voxels in y, x);
    under the ~1 µm drift of the other cases 0.97-1.0x.
    """
    shape = np.asarray(input_shape, int)
    stride = np.asarray(stride, int)
    low = np.asarray([f[0] for f in fields], int)
    high = np.asarray([f[1] for f in fields], int)
    empty = np.any(high <= low, axis=1)  # a session with no data in this tile: any cut will do
    if empty.all():
        return None
    start = (low // stride) * stride
    size = np.max((high - start)[~empty], axis=0)
    # a cut may reach past the tile's last voxel, not past its last coarsest-level voxel
    limit = -(-shape // stride) * stride
    at = np.minimum(start, (limit - size) // stride * stride)
    at[empty] = 0
    holds = np.all((at <= low) & (at + size >= high) | empty[:, None], axis=0)
    cut = (size < shape) & holds
    if not cut.any():
        return None
    at = np.where(cut, at, 0)
    return tuple(int(n) for n in np.where(cut, size, shape)), at


def session_chunks(t_count: int, chunk: int | None, device) -> list[range]:
    """The sessions of a series in the groups that go through the network together (the
    ConvLSTM carries its state from one group to the next, so any grouping gives the same result).

    ``chunk``: at most this many per group, in groups of equal size (6 sessions at 4 run as 3 + 3,
    not 4 + 2). None: by device. On a GPU up to 8. On a CPU pairs, with one group of three where
    the count is odd: oneDNN runs a batch of one session at half the speed per session, and on a
    2-core x86-64 CPU two sessions per call ran 7-15 % faster than three (6 x 32 x 256 x 256 and
    6 x 32 x 512 x 512, identical outputs; docs/model_report.md, "Speed").
    """
    if t_count < 1:
        return []
    if chunk is None and device.type == "cpu":
        sizes = [2] * (t_count // 2)
        if t_count % 2:
            sizes = [3, *sizes[1:]] if sizes else [1]
    else:
        limit = chunk or 8
        groups = math.ceil(t_count / limit)
        size = math.ceil(t_count / groups)
        sizes = [size] * (t_count // size) + ([t_count % size] if t_count % size else [])
    starts = np.cumsum([0, *sizes])
    return [range(int(a), int(b)) for a, b in itertools.pairwise(starts)]


def _default_batch(device, input_shape) -> int:
    if device.type == "cpu":
        return 1
    voxels = int(np.prod(input_shape))
    return max(1, int(2**25 // voxels))


def _reduced_precision(device, options: InferenceOptions) -> bool:
    return device.type == "cuda" and options.precision != "float32"


class _NotFinite(Exception):
    """Reduced-precision inference overflowed (see :func:`predict_series`)."""
