"""Read and write image series: a 4D TIFF (T, Z, Y, X), a 3D TIFF (one session) or a folder of 3D TIFFs.

Reading is lazy: :func:`load_series` parses headers only, and its :class:`SeriesArray` reads just the
planes (page-wise) or bytes (memory map, for uncompressed contiguous files) that an index asks for,
so a tile of one session never touches the other sessions. Axes come from tifffile's series
information (ImageJ hyperstack ``TZCYX``, OME); a plain TIFF with two unlabelled leading axes is
taken as ``T, Z``. Voxel sizes come from ImageJ (``spacing``, X/YResolution, ``unit``) or OME
(``PhysicalSize*``) metadata, in µm, ordered z, y, x.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile

from ..errors import InputError
from .atomic import atomic_path

log = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
#: factor from a length unit to µm; keys are lower case, ImageJ's escaped ``\u00B5m`` included
_UNIT_TO_UM = {
    "micron": 1.0, "microns": 1.0, "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "\\u03bcm": 1.0,
    "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3, "nanometres": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "m": 1e6,
    "å": 1e-4, "angstrom": 1e-4, "pm": 1e-6,
}
#: TIFF ResolutionUnit values (outside ImageJ) that are physical lengths, as µm per unit
_RESUNIT_TO_UM = {3: 1e4, 4: 1e3, 5: 1.0}
_CHANNEL_AXES = "CS"
_KNOWN_AXES = "TZCSYX"
_TIFF_READ_ERRORS = (tifffile.TiffFileError, ValueError, OSError, EOFError, IndexError, KeyError)


# --------------------------------------------------------------------------------------------
# voxel sizes


def validate_voxel_size(voxel_size_um: Sequence[float], *,
                        source: str = "voxel size") -> tuple[float, float, float]:
    """Return ``voxel_size_um`` as three positive floats (z, y, x in µm), or raise :class:`InputError`."""
    try:
        values = tuple(float(v) for v in voxel_size_um)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source} must be three numbers Z Y X in µm, got {voxel_size_um!r}.") from exc
    if len(values) != 3:
        raise InputError(f"{source} must be three numbers Z Y X in µm (e.g. 0.5 0.1 0.1), got "
                         f"{len(values)}: {values}.")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{source} must be positive numbers Z Y X in µm, got {values}.")
    return values  # type: ignore[return-value]


def _unit_factor_um(unit: object) -> float | None:
    if not isinstance(unit, str):
        return None
    return _UNIT_TO_UM.get(unit.strip().lower())


def _rational(value: object) -> float | None:
    """A TIFF RATIONAL tag value ``(num, den)`` (or a number) as a float; None if unusable."""
    try:
        if isinstance(value, tuple | list):
            num, den = value[:2]
            return float(num) / float(den) if den else None
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _pixel_sizes_um(page: tifffile.TiffPage, um_per_unit: float) -> tuple[float | None, float | None]:
    """(y, x) pixel sizes from the X/YResolution tags, which hold pixels per unit."""
    sizes = []
    for tag in ("YResolution", "XResolution"):
        t = page.tags.get(tag)
        pixels_per_unit = _rational(t.value) if t is not None else None
        sizes.append(um_per_unit / pixels_per_unit if pixels_per_unit else None)
    return sizes[0], sizes[1]


def _ome_voxel_size(xml: str) -> tuple[float | None, float | None, float | None]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        log.warning("unreadable OME-XML metadata; ignoring it")
        return None, None, None
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None, None, None
    out = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        factor = _unit_factor_um(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        try:
            out.append(float(value) * factor if value is not None and factor else None)
        except ValueError:
            out.append(None)
    return out[0], out[1], out[2]


def _voxel_size_from_tiff(tf: tifffile.TiffFile) -> tuple[float | None, float | None, float | None]:
    """What the metadata say, axis by axis (z, y, x in µm); None where they say nothing usable."""
    if tf.is_ome and tf.ome_metadata:
        found = _ome_voxel_size(tf.ome_metadata)
        if any(v is not None for v in found):
            return found
    page = tf.pages.first
    if tf.is_imagej:
        meta = tf.imagej_metadata or {}
        factor = _unit_factor_um(meta.get("unit"))
        if factor is None:
            return None, None, None
        y, x = _pixel_sizes_um(page, factor)
        # ImageJ leaves out `spacing` when it is 1 (its default pixel depth), in the same unit
        z = _rational(meta.get("spacing", 1.0))
        return (z * factor if z else None), y, x
    unit_tag = page.tags.get("ResolutionUnit")
    factor = _RESUNIT_TO_UM.get(int(unit_tag.value)) if unit_tag is not None else None
    if factor is None:
        return None, None, None
    y, x = _pixel_sizes_um(page, factor)
    return None, y, x


def _complete(found: tuple[float | None, ...]) -> tuple[float, float, float] | None:
    if all(v is not None and math.isfinite(v) and v > 0 for v in found):
        # rationals and unit factors leave float dust (0.0941 -> 0.09409999999999999)
        return tuple(float(f"{v:.10g}") for v in found)  # type: ignore[return-value]
    return None


def read_voxel_size(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """Voxel size (z, y, x in µm) from a TIFF's ImageJ or OME metadata; a folder: its first file.

    Returns None when the metadata do not give all three.
    """
    path = Path(path)
    if path.is_dir():
        files = list_session_files(path)
        if not files:
            raise InputError(f"no TIFF files in folder {path}.")
        path = files[0]
    with _open_tiff(path) as tf:
        return _complete(_voxel_size_from_tiff(tf))


# --------------------------------------------------------------------------------------------
# one TIFF file


def _natural_key(name: str) -> list:
    # re.split with a group alternates text and digits, so positions compare str-str and int-int
    return [int(tok) if i % 2 else tok.lower() for i, tok in enumerate(re.split(r"(\d+)", name))]


def list_session_files(folder: str | os.PathLike) -> list[Path]:
    """The TIFF files of a session folder in natural order (``s2`` before ``s10``); hidden files skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder: check the path.")
    files = [p for p in folder.iterdir()
             if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


class _ErrorCollector(logging.Handler):
    """Collects the errors tifffile logs (it logs, not raises, on broken page chains) in this thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


def _open_tiff(path: Path) -> tifffile.TiffFile:
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path.")
    try:
        return tifffile.TiffFile(path)
    except tifffile.TiffFileError as exc:
        raise InputError(f"{path} is not a TIFF file ({exc}); give a TIFF stack or a folder of "
                         "them.") from exc
    except _TIFF_READ_ERRORS as exc:
        raise InputError(f"{path} is not a readable TIFF file ({exc}); it may be truncated or "
                         "corrupt.") from exc


def _assign_axes(axes: str, shape: tuple[int, ...], path: Path) -> tuple[int | None, int | None, int | None]:
    """Positions of the time, z and channel axes in tifffile's squeezed ``axes`` (None if absent)."""
    described = f"{path.name} has shape {shape} with axes {axes}"
    channel_axes = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
    if len(channel_axes) > 1:
        raise InputError(f"{described}: both channels and colour samples; save one channel per file.")
    t_axis = axes.find("T") if "T" in axes else None
    z_axis = axes.find("Z") if "Z" in axes else None
    unknown = [i for i, a in enumerate(axes) if a not in _KNOWN_AXES]
    if t_axis is None and z_axis is None and len(unknown) == 2:
        t_axis, z_axis = unknown  # a plain 4D TIFF: T, Z, Y, X
    elif z_axis is None and len(unknown) == 1:
        z_axis = unknown[0]
    elif t_axis is None and len(unknown) == 1:
        t_axis = unknown[0]
    elif unknown:
        raise InputError(f"{described}: cannot tell which axes are time (T), depth (Z) and channel (C). "
                         "Save it as an ImageJ hyperstack with axes TZCYX (Fiji: Image > Hyperstacks > "
                         "Re-order) or as one 3D TIFF per session in a folder.")
    if t_axis is None and z_axis is None:
        raise InputError(f"{described}: a 2D image. Spine detection needs 3D stacks (Z, Y, X) per session: "
                         "give a 3D or 4D TIFF or a folder of 3D TIFFs.")
    if z_axis is None:
        log.warning("%s: time axis only (no Z); each session is taken as a single plane. If the frames "
                    "are z-slices, set them as slices in Fiji (Image > Properties).", described)
    return t_axis, z_axis, (channel_axes[0] if channel_axes else None)


class _TiffVolume:
    """One TIFF file seen as sessions of (Z, Y, X) planes; reads only what is asked.

    Picklable (for dask): open handles and memory maps are dropped and reopened on demand.
    """

    def __init__(self, path: str | os.PathLike, channel: int | None = None) -> None:
        self.path = Path(path)
        collector = _ErrorCollector()
        logging.getLogger("tifffile").addHandler(collector)
        try:
            with _open_tiff(self.path) as tf:
                self._inspect(tf, collector)
        except _TIFF_READ_ERRORS as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{self.path}: could not read the TIFF structure ({exc}); the file may be "
                             "truncated or corrupt.") from exc
        finally:
            logging.getLogger("tifffile").removeHandler(collector)
        self._set_channel(channel)
        self._lock = threading.Lock()
        self._tiff: tifffile.TiffFile | None = None
        self._memmap: np.ndarray | None = None

    def _inspect(self, tf: tifffile.TiffFile, collector: _ErrorCollector) -> None:
        if len(tf.series) > 1:
            log.warning("%s holds %d image series; reading the first.", self.path, len(tf.series))
        series = tf.series[0]
        len(tf.pages)  # walks the whole page chain, so a cut-off chain is logged (and caught) now
        if collector.messages:
            raise InputError(f"{self.path} is truncated or corrupt ({collector.messages[0]}).")
        self.axes, self.shape = series.axes, tuple(int(n) for n in series.shape)
        self.dtype = np.dtype(series.dtype).newbyteorder("=")
        # pages are the trailing (S)YX(S) planes; the axes before them number the pages
        n_leading = len(self.axes.rstrip("SYX"))
        self._n_leading = n_leading
        n_pages = len(series.pages)
        expected_pages = math.prod(self.shape[:n_leading])
        if tf.is_imagej and int((tf.imagej_metadata or {}).get("images", n_pages)) > n_pages:
            raise InputError(f"{self.path} is truncated or corrupt: its ImageJ metadata announce "
                             f"{tf.imagej_metadata['images']} images, the file holds {n_pages}.")
        self._check_complete(series, tf.filehandle.size)
        self._memmappable = series.dataoffset is not None
        self._pagewise = (n_pages == expected_pages
                          and math.prod(self.shape[n_leading:]) == math.prod(series.keyframe.shape))
        if not (self._memmappable or self._pagewise):
            log.warning("%s: unusual page layout; every read decodes the whole file.", self.path)
        self._series_index = 0
        self.t_axis, self.z_axis, self.c_axis = _assign_axes(self.axes, self.shape, self.path)
        self.metadata_voxel_size = _voxel_size_from_tiff(tf)

    def _check_complete(self, series: tifffile.TiffPageSeries, file_size: int) -> None:
        if series.dataoffset is not None:
            end = series.dataoffset + series.nbytes
        else:
            end = max((offset + count for page in series.pages if page is not None
                       for offset, count in zip(page.dataoffsets, page.databytecounts, strict=False)),
                      default=0)
        if end > file_size:
            raise InputError(f"{self.path} is truncated: its image data end at byte {end}, the file has "
                             f"{file_size} bytes. Copy or export the file again.")

    def _set_channel(self, channel: int | None) -> None:
        n_channels = self.shape[self.c_axis] if self.c_axis is not None else 1
        if channel is None and self.c_axis is not None:
            kind = "colour samples (RGB)" if self.axes[self.c_axis] == "S" else "channels"
            raise InputError(f"{self.path.name} has {n_channels} {kind} (axes {self.axes}, shape "
                             f"{self.shape}); choose one with --channel N or channel=N, N in "
                             f"0..{n_channels - 1}.")
        if channel is not None and not 0 <= int(channel) < n_channels:
            raise InputError(f"channel {channel} is out of range: {self.path.name} has {n_channels} "
                             f"channel(s), numbered 0..{n_channels - 1}.")
        self.channel = int(channel) if channel is not None else 0

    @property
    def n_sessions(self) -> int:
        return self.shape[self.t_axis] if self.t_axis is not None else 1

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        z = self.shape[self.z_axis] if self.z_axis is not None else 1
        return z, self.shape[self.axes.index("Y")], self.shape[self.axes.index("X")]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_lock=None, _tiff=None, _memmap=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._tiff is not None:
                self._tiff.close()
            self._tiff, self._memmap = None, None

    def _selection(self, t: int, z: slice) -> list:
        """Index for each axis of the file's series: ints for t and channel, slices elsewhere."""
        index: list = [slice(None)] * len(self.axes)
        if self.t_axis is not None:
            index[self.t_axis] = t
        if self.c_axis is not None:
            index[self.c_axis] = self.channel
        if self.z_axis is not None:
            index[self.z_axis] = z
        return index

    def read(self, t: int, z: slice, y: slice, x: slice) -> np.ndarray:
        """Session ``t``'s block ``[z, y, x]`` as an array (nz, ny, nx); slices within this file's shape."""
        index = self._selection(t, z)
        index[self.axes.index("Y")], index[self.axes.index("X")] = y, x
        try:
            if self._memmappable:  # reading a memory map is thread-safe; only opening it is locked
                block = np.asarray(self._get_memmap()[tuple(index)])
            else:
                with self._lock:  # a TiffFile is not thread-safe
                    if self._pagewise:
                        block = self._read_pages(index)
                    else:
                        block = self._handle().asarray(series=self._series_index)[tuple(index)]
        except InputError:
            raise
        except Exception as exc:  # decoding errors of any codec: the file is broken, not our code
            raise InputError(f"could not read session {t} from {self.path} ({exc}); the file may be "
                             "corrupt or was changed after it was opened.") from exc
        if self.z_axis is None:
            block = block[np.newaxis][z]
        return block.astype(self.dtype, copy=False)

    def _get_memmap(self) -> np.ndarray:
        with self._lock:
            if self._memmap is None:
                self._memmap = tifffile.memmap(self.path, series=self._series_index, mode="r")
            return self._memmap

    def _handle(self) -> tifffile.TiffFile:
        if self._tiff is None:
            self._tiff = tifffile.TiffFile(self.path)
            if tuple(self._tiff.series[0].shape) != self.shape:
                raise InputError(f"{self.path} changed on disk since it was opened; open it again.")
        return self._tiff

    def _read_pages(self, index: list) -> np.ndarray:
        """Decode only the pages (planes) that ``index`` selects, then cut the rest of the index."""
        lead_shape = self.shape[: self._n_leading]
        lead = [np.arange(n)[i] if isinstance(i, slice) else np.array([i])
                for i, n in zip(index[: self._n_leading], lead_shape, strict=True)]
        grid = np.meshgrid(*lead, indexing="ij")
        pages = np.ravel_multi_index([g.ravel() for g in grid], lead_shape).tolist() if lead else [0]
        page_shape = self.shape[self._n_leading:]
        if pages:
            planes = self._handle().asarray(key=pages, series=self._series_index)
        else:
            planes = np.empty((0, *page_shape), self.dtype)
        planes = planes.reshape(*[len(a) for a in lead], *page_shape)
        rest = [0 if isinstance(i, int | np.integer) else slice(None) for i in index[: self._n_leading]]
        return planes[(*rest, *index[self._n_leading:])]


# --------------------------------------------------------------------------------------------
# the lazy (T, Z, Y, X) array


def _normalise_key(key: object, shape: tuple[int, ...]) -> tuple[list[slice], list[bool]]:
    """Basic numpy indexing (ints, slices, one Ellipsis) as one slice per axis plus 'drop this axis'."""
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    if len(key) > len(shape):
        raise IndexError(f"too many indices for a {len(shape)}-dimensional series: {len(key)}")
    key = key + (slice(None),) * (len(shape) - len(key))
    slices, drop = [], []
    for k, n in zip(key, shape, strict=True):
        if isinstance(k, slice):
            slices.append(k)
            drop.append(False)
            continue
        try:
            i = int(k.__index__())  # type: ignore[attr-defined]
        except (AttributeError, TypeError):
            raise IndexError(f"SeriesArray takes integers and slices, got {k!r}; use np.asarray(...) "
                             "for fancy indexing.") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of bounds for an axis of size {n}")
        i %= n
        slices.append(slice(i, i + 1))
        drop.append(True)
    return slices, drop


def _clip_slice(index: np.ndarray, step: int) -> slice | None:
    """A slice that selects the regular progression ``index`` (already within bounds), or None if empty."""
    if index.size == 0:
        return None
    stop = int(index[-1]) + step
    return slice(int(index[0]), stop if stop >= 0 else None, step)


class SeriesArray:
    """A lazy (T, Z, Y, X) series: indexing reads only the sessions and planes it names.

    Sessions smaller than the common shape are padded with zeros at the high z, y, x edges.
    Supports ``.shape``, ``.dtype``, ``.ndim``, ``len()``, basic indexing (ints and slices, returns
    an ``np.ndarray``) and ``np.asarray`` (reads everything).
    """

    def __init__(self, volumes: Sequence[_TiffVolume]) -> None:
        self._sessions = [(vol, t) for vol in volumes for t in range(vol.n_sessions)]
        self._volumes = list(volumes)
        self.session_shapes = [vol.shape_zyx for vol, _ in self._sessions]
        padded = tuple(int(n) for n in np.max(self.session_shapes, axis=0))
        self.shape: tuple[int, int, int, int] = (len(self._sessions), *padded)  # type: ignore[assignment]
        self.dtype = np.result_type(*[vol.dtype for vol in self._volumes])

    ndim = 4

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SeriesArray(shape={self.shape}, dtype={self.dtype}, files={len(self._volumes)})"

    def close(self) -> None:
        """Close open files and memory maps (they reopen on the next read)."""
        for vol in self._volumes:
            vol.close()

    def __array__(self, dtype: object = None, copy: bool | None = None) -> np.ndarray:
        out = self[...]
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __getitem__(self, key: object) -> np.ndarray:
        slices, drop = _normalise_key(key, self.shape)
        indices = [np.arange(n)[s] for s, n in zip(slices, self.shape, strict=True)]
        out = np.zeros([len(i) for i in indices], self.dtype)
        for k, t in enumerate(indices[0]):
            out[k] = self._read_session(int(t), indices[1:], slices[1:])
        return out[tuple(0 if d else slice(None) for d in drop)]

    def _read_session(self, t: int, indices: list[np.ndarray], slices: list[slice]) -> np.ndarray:
        volume, local_t = self._sessions[t]
        own = self.session_shapes[t]
        inside = [i < n for i, n in zip(indices, own, strict=True)]
        steps = [s.step or 1 for s in slices]
        parts = [_clip_slice(i[m], st) for i, m, st in zip(indices, inside, steps, strict=True)]
        if any(p is None for p in parts):
            return np.zeros([len(i) for i in indices], self.dtype)
        block = volume.read(local_t, *parts)
        if all(m.all() for m in inside):
            return block
        out = np.zeros([len(i) for i in indices], self.dtype)
        out[np.ix_(*inside)] = block
        return out


# --------------------------------------------------------------------------------------------
# the series


@dataclass
class Series:
    """A time series of 3D sessions: ``data`` is (T, Z, Y, X); voxel size is z, y, x in µm.

    ``session_shapes`` holds each session's own (Z, Y, X): spine coordinates refer to those grids
    (a padded session's extra voxels are zeros at the high edges).
    """

    data: SeriesArray | np.ndarray
    voxel_size_um: tuple[float, float, float] | None
    session_shapes: list[tuple[int, int, int]]
    name: str
    sources: list[Path] = field(default_factory=list)

    @property
    def n_sessions(self) -> int:
        return int(self.data.shape[0])

    def session(self, t: int) -> np.ndarray:
        """Session ``t`` as (Z, Y, X), cropped to its own shape (reads only that session)."""
        if not -self.n_sessions <= t < self.n_sessions:
            raise IndexError(f"session {t} does not exist; the series has {self.n_sessions} sessions.")
        z, y, x = self.session_shapes[t]
        return np.asarray(self.data[t, :z, :y, :x])

    def close(self) -> None:
        """Release open files (reads reopen them)."""
        if isinstance(self.data, SeriesArray):
            self.data.close()

    @classmethod
    def from_array(cls, image: np.ndarray, voxel_size_um: Sequence[float] | None,
                   name: str = "array") -> Series:
        """Wrap an in-memory (T, Z, Y, X) or (Z, Y, X) array (e.g. a synthetic series or a napari layer)."""
        image = np.asarray(image)
        if image.ndim == 3:
            image = image[np.newaxis]
        if image.ndim != 4:
            raise InputError(f"an image series must be (T, Z, Y, X) or (Z, Y, X); got shape {image.shape}.")
        voxel = validate_voxel_size(voxel_size_um) if voxel_size_um is not None else None
        return cls(image, voxel, [tuple(image.shape[1:])] * image.shape[0], name, [])


def _series_name(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *TIFF_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_series(path: str | os.PathLike, voxel_size_um: Sequence[float] | None = None, *,
                channel: int | None = None, require_voxel_size: bool = True) -> Series:
    """Open a 4D TIFF (T, Z, Y, X), a 3D TIFF (one session) or a folder of 3D TIFFs, lazily.

    ``voxel_size_um`` (z, y, x) overrides the file's metadata; without either, raises
    :class:`InputError` unless ``require_voxel_size`` is False. ``channel`` picks one channel of a
    multi-channel or RGB file.
    """
    path = Path(path)
    voxel = validate_voxel_size(voxel_size_um) if voxel_size_um is not None else None
    if not path.exists():
        raise InputError(f"{path} does not exist: check the path.")
    if path.is_dir():
        files = list_session_files(path)
        if not files:
            raise InputError(f"folder {path} holds no TIFF files (.tif, .tiff); a session folder holds "
                             "one 3D TIFF per session.")
        volumes = [_TiffVolume(f, channel) for f in files]
        for vol in volumes:
            if vol.n_sessions != 1:
                raise InputError(f"{vol.path.name} in folder {path} holds {vol.n_sessions} time points; "
                                 "a session folder holds one 3D TIFF (Z, Y, X) per session.")
        sizes = {vol.metadata_voxel_size for vol in volumes}
        if voxel is None and len(sizes) > 1:
            log.warning("the files in %s disagree on voxel size (%s); using the first file's.", path,
                        sorted(map(str, sizes)))
    else:
        volumes = [_TiffVolume(path, channel)]
    found = volumes[0].metadata_voxel_size
    if voxel is None:
        voxel = _complete(found)
    if voxel is None and require_voxel_size:
        partial = ", ".join(f"{a}={v:g} µm" for a, v in zip("zyx", found, strict=True) if v is not None)
        raise InputError(f"{path}: the voxel size is not in the file's metadata"
                         f"{f' (only {partial})' if partial else ''}. Give it in µm: --voxel-size Z Y X "
                         "on the command line, or voxel_size_um=(z, y, x) in Python.")
    data = SeriesArray(volumes)
    return Series(data=data, voxel_size_um=voxel, session_shapes=list(data.session_shapes),
                  name=_series_name(path), sources=[vol.path for vol in volumes])


# --------------------------------------------------------------------------------------------
# writing


_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.float32)


def _planes(image: SeriesArray | np.ndarray) -> Iterator[np.ndarray]:
    for t in range(image.shape[0]):
        session = np.asarray(image[t])
        yield from session


def write_series_tiff(path: str | os.PathLike, image: np.ndarray | SeriesArray | Iterable,
                      voxel_size_um: Sequence[float]) -> Path:
    """Write (T, Z, Y, X) or (Z, Y, X) as an ImageJ hyperstack (axes TZYX) with its voxel size; atomic.

    The voxel size (z, y, x in µm) goes into ``spacing``, X/YResolution and ``unit=micron``, which
    Fiji and :func:`load_series` read back. ``image`` is uint16 (uint8 and float32, ImageJ's other
    types, are kept as they are); a :class:`SeriesArray` is written session by session.
    """
    z_um, y_um, x_um = validate_voxel_size(voxel_size_um)
    if not hasattr(image, "shape"):
        image = np.asarray(image)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 3:
        shape = (1, *shape)
        image = image[np.newaxis] if isinstance(image, np.ndarray) else np.asarray(image)[np.newaxis]
    if len(shape) != 4:
        raise InputError(f"write_series_tiff needs (T, Z, Y, X) or (Z, Y, X); got shape "
                         f"{tuple(image.shape)}.")
    dtype = np.dtype(image.dtype)
    if dtype.type not in _IMAGEJ_DTYPES:
        raise InputError(f"ImageJ TIFFs hold uint8, uint16 or float32 data; got {dtype}. Convert first "
                         "(e.g. image.astype(np.uint16) after scaling to 0..65535).")
    path = Path(path)
    with atomic_path(path) as tmp:
        tifffile.imwrite(
            tmp, _planes(image), shape=shape, dtype=dtype, imagej=True,
            resolution=(1.0 / x_um, 1.0 / y_um),
            metadata={"axes": "TZYX", "spacing": z_um, "unit": "micron"},
        )
    return path
