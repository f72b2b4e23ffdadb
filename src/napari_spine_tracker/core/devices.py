"""Device choice: ``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit device that is
not available is an error, never a silent fallback."""

from __future__ import annotations

import contextlib
import logging

from ..errors import InputError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


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
    """bf16 autocast on CUDA (where it is fast and safe for this network); nothing elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def free_memory(device) -> None:
    """Give cached GPU memory back when a run ends."""
    import torch

    if device is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    elif device is not None and device.type == "mps":
        with contextlib.suppress(AttributeError, RuntimeError):
            torch.mps.empty_cache()
