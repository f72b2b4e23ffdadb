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


def as_stored_on(array, device):
    """``array`` copied to a torch ``device`` as stored, and a function that turns (a block of)
    the copy into float32 there: (tensor, to_float).

    16-bit data stay two bytes a voxel (uint16 travels as the bits of int16: torch before 2.3 has
    no uint16, and later ones barely handle it on a GPU); types torch handles on a GPU only in part
    (uint32, uint64, float64, bool, ...) travel as float32.
    """
    import torch

    array = np.asarray(array)
    array = np.ascontiguousarray(array, dtype=stored_dtype(array.dtype))
    if array.dtype == np.uint16:
        def to_float(raw):
            return raw.to(torch.int32).bitwise_and_(0xFFFF).float()
        return torch.from_numpy(array.view(np.int16)).to(device), to_float
    return torch.from_numpy(array).to(device), lambda raw: raw.float()


def free_memory(device) -> None:
    """Give cached GPU memory back when a run ends."""
    import torch

    if device is not None and device.type == "cuda":
        # registration's FFTs leave cuFFT plans, which hold device memory of their own
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.backends.cuda.cufft_plan_cache[index].clear()
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
