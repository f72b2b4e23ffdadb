"""Device choice: ``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device that is
not available is an error, never a silent fallback."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity (what a job scheduler such as SLURM's
    --cpus-per-task allows), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def thread_pool() -> ThreadPoolExecutor:
    """One pool of :func:`usable_cores` threads, kept for the life of the process, for short CPU
    work that NumPy and SciPy run outside the GIL (linking's local motion): a pool made for each
    call started its threads each time, 0.8-4 ms a call on a busy 2-core CPU (linking alone there
    0.0451 -> 0.0439 s; no difference measured on an H200's 16-thread host). A process forked from
    this one (batch workers) gets a pool of its own, as the threads of its parent's are not in it.
    Jobs given to it must not wait on other jobs of it."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(usable_cores(), thread_name_prefix="napari-spine-tracker"))
        return _pool[1]


def get_device(name: str = "auto"):
    """Return a ``torch.device`` for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``)."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device {name!r} was requested but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                "use --device cpu or auto, or install a CUDA build of PyTorch."
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible.")
        return device
    if name == "mps":
        if not _mps_available():
            raise InputError("device 'mps' was requested but Apple's Metal backend is not available; "
                             "use --device cpu or auto.")
        return torch.device("mps")
    raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N).")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def autocast(device):
    """Training: bf16 autocast on CUDA (fast, and no loss scaling needed); nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_autocast(device, precision: str = "float16"):
    """Inference: fp16 autocast on CUDA by default, not bf16.

    bf16's 8-bit significand moved borderline peaks: on an H200 the shipped model scored 0.007 F1
    and up to 0.022 IDF1 below its float32 figures on the benchmark's test series, and bf16
    autocast on the CPU reproduces a loss, while fp16 autocast on the CPU gives the float32
    figures exactly (large_drift, seeds 1000-1002). Activations stay below ~40 on the test series,
    far inside fp16's range; :func:`core.infer.predict_series` falls back to float32 if a result
    is not finite. ``precision``: ``float16``, ``bfloat16`` or ``float32`` (no autocast).
    """
    import torch

    if device.type != "cuda" or precision == "float32":
        return contextlib.nullcontext()
    if precision not in ("float16", "bfloat16"):
        raise InputError(f"unknown precision {precision!r}; choose float16, bfloat16 or float32.")
    return torch.autocast("cuda", dtype=getattr(torch, precision))


#: types that travel to a device as they are (uint16 travels as the bits of int16, see as_stored_on)
_TRAVEL_AS_THEY_ARE = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float16, np.float32)


def stored_dtype(dtype) -> np.dtype:
    """The type :func:`as_stored_on` holds data of ``dtype`` in on a device (its size counts)."""
    dtype = np.dtype(dtype)
    return dtype if dtype in _TRAVEL_AS_THEY_ARE else np.dtype(np.float32)


def as_stored_on(array, device, staging: PinnedStaging | None = None):
    """``array`` copied to a torch ``device`` as stored, and a function that turns (a block of)
    the copy into float32 there: (tensor, to_float).

    16-bit data stay two bytes a voxel (uint16 travels as the bits of int16: torch before 2.3 has
    no uint16, and later ones barely handle it on a GPU); types torch handles on a GPU only in part
    (uint32, uint64, float64, bool, ...) travel as float32. With a ``staging`` (a GPU's), the copy
    passes through its page-locked buffers and runs on while the caller goes on.
    """
    import torch

    array = np.asarray(array)
    array = np.ascontiguousarray(array, dtype=stored_dtype(array.dtype))
    if array.dtype == np.uint16:
        def to_float(raw):
            return raw.to(torch.int32).bitwise_and_(0xFFFF).float()
        host = torch.from_numpy(array.view(np.int16))
    else:
        def to_float(raw):
            return raw.float()
        host = torch.from_numpy(array)
    return (host.to(device) if staging is None else staging.to_device(host)), to_float


class PinnedStaging:
    """A ring of small page-locked host buffers that arrays pass through on their way to a CUDA
    device, so that the copies over the bus overlap with the copies into the buffers.

    A copy from ordinary (pageable) host memory blocks the caller until it is done, and runs at
    what the driver's own staging allows: holding a 6 x 32 x 1024 x 1024 uint16 series on an H200
    took 0.08 s of a 0.40 s run, 47 ms of it the copies themselves (8.6 GB/s;
    ``benchmarks/results/gpu_session_h200_8.txt``). From page-locked memory a copy is
    asynchronous: each array goes over in chunks of ``chunk_bytes``, and while one chunk crosses
    the CPU writes the next into the next buffer. A buffer is written again only once its last
    copy is done, and device work queued after :meth:`to_device` on the same stream sees the
    data. The buffers are few and small (4 x 8 MiB), whatever the arrays' size: PyTorch rounds
    page-locked blocks up to a power of two and keeps them for reuse, so buffers of a session's
    size would lock up to twice that much memory. :meth:`close` (or the end of a ``with`` block)
    waits for the copies still running and lets the buffers go, back to PyTorch's cache of
    page-locked memory for the next run. On an H200 holding that series went from 0.07 to 0.02 s,
    and the run from 0.33 to 0.27 s, 605 to 734 Mvoxel/s (``profile_detect.py --staging pageable``
    and ``pinned`` on the same machine, ``benchmarks/results/gpu_session_h200_9.txt``).
    """

    def __init__(self, device, chunk_bytes: int = 8 << 20, slots: int = 4):
        import torch

        self.torch, self.device, self.chunk_bytes = torch, torch.device(device), int(chunk_bytes)
        self.buffers: list = [None] * slots
        self.copied: list = [None] * slots  # an event after each buffer's last copy
        self.turn = 0
        self.refused = False  # page-locked memory was refused: arrays are copied as they are

    @classmethod
    def for_device(cls, device) -> PinnedStaging | None:
        """A staging for ``device`` where it pays (CUDA), else None (copies as they are)."""
        return cls(device) if device is not None and device.type == "cuda" else None

    def to_device(self, host):
        """A CPU tensor copied to the device through the buffers (the last chunks may still be
        crossing when this returns)."""
        torch = self.torch
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        source = host.contiguous().reshape(-1).view(torch.uint8)
        target = out.reshape(-1).view(torch.uint8)
        for start in range(0, source.numel(), self.chunk_bytes):
            buffer = None if self.refused else self._next_buffer()
            if buffer is None:  # page-locked memory refused: the rest as it is
                target[start:].copy_(source[start:])
                break
            n = min(self.chunk_bytes, source.numel() - start)
            buffer[:n].copy_(source[start:start + n])
            target[start:start + n].copy_(buffer[:n], non_blocking=True)
            self.copied[self.turn] = torch.cuda.Event()
            self.copied[self.turn].record(torch.cuda.current_stream(self.device))
        return out

    def _next_buffer(self):
        """The next buffer of the ring once its last copy is done (made on first use), or None
        where page-locked memory is refused (a container's limit)."""
        self.turn = (self.turn + 1) % len(self.buffers)
        if self.copied[self.turn] is not None:
            self.copied[self.turn].synchronize()
        if self.buffers[self.turn] is None:
            try:
                self.buffers[self.turn] = self.torch.empty(self.chunk_bytes, dtype=self.torch.uint8, pin_memory=True)
            except RuntimeError as exc:
                log.warning("no page-locked buffer of %.0f MiB (%s); copying from pageable memory",
                            self.chunk_bytes / 2**20, exc)
                self.refused = True
                return None
        return self.buffers[self.turn]

    def close(self) -> None:
        """Wait for the copies still running, and let the buffers go."""
        for event in self.copied:
            if event is not None:
                event.synchronize()
        self.buffers = [None] * len(self.buffers)
        self.copied = [None] * len(self.copied)

    def __enter__(self) -> PinnedStaging:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: cuFFT plans kept when a run ends, up to this many (see :func:`free_memory`)
KEPT_FFT_PLANS = 64


def free_memory(device) -> None:
    """Give cached GPU memory back when a run ends.

    Registration's cuFFT plans are kept, up to ``KEPT_FFT_PLANS``: on an H200 the 18 plans of a
    registration held 2 MiB of device memory, and planning them again cost 31 ms of a 0.08 s
    registration (a 3 x 32 x 1024 x 1024 series; ``benchmarks/gpu_checks.py`` [2c],
    ``benchmarks/results/gpu_session_h200_10.txt``). A process that has gathered more (many
    shapes) gives them all back."""
    import torch

    if device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        plans = torch.backends.cuda.cufft_plan_cache[index]
        if plans.size > KEPT_FFT_PLANS:
            plans.clear()
        torch.cuda.empty_cache()
    elif device is not None and device.type == "mps":
        with contextlib.suppress(AttributeError, RuntimeError):
            torch.mps.empty_cache()


# glibc mallopt parameters (malloc.h). After a run they are set where glibc's own adaptation ends
# once large blocks have been freed (mmap threshold raised to its 32 MiB cap, trim threshold twice
# that): any mallopt call stops that adaptation for the rest of the process.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_AFTER = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20}
_heap_lock = threading.Lock()
_heap_users = 0


@functools.cache
def _glibc():
    """The C library if it is glibc (mallopt, malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def reuse_freed_memory():
    """While the block runs, large buffers (tensors, arrays) come from the heap and are reused
    when freed, instead of each being a fresh memory map.

    glibc serves every allocation above 32 MiB with a new ``mmap`` and unmaps it when it is freed,
    so each activation tensor of a tile is page-faulted in and zeroed by the kernel again: on 2
    cores that was a quarter of end-to-end detection time (a 1x1x1 convolution took 60 ms instead
    of 14; docs/model_report.md, "Speed"). On exit large blocks are mapped again (see ``_GLIBC_AFTER``) and the
    heap's free memory is given back (``malloc_trim``). Nested and concurrent uses share one
    setting. Without glibc (macOS, Windows, musl) this does nothing.
    """
    global _heap_users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _heap_lock:
        _heap_users += 1
        if _heap_users == 1:
            libc.mallopt(_M_MMAP_MAX, 0)  # no mmap: large blocks come from the heap ...
            libc.mallopt(_M_TRIM_THRESHOLD, 2**30)  # ... which keeps freed memory for the next tile
    try:
        yield
    finally:
        with _heap_lock:
            _heap_users -= 1
            if _heap_users == 0:
                for param, value in _GLIBC_AFTER.items():
                    libc.mallopt(param, value)
                give_back_free_memory()


def give_back_free_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``; elsewhere nothing).

    Inside :func:`reuse_freed_memory`, called between tiles: buffers are reused within a tile,
    where nearly all the reuse is, and freed blocks that no later buffer fits do not pile up
    across tiles (without it, peak memory on a 16-tile series grew by a half)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
