"""Checkpoints (DESIGN §3, a contract): one ``.pt`` file of plain data, loaded with
``weights_only=True`` so that a checkpoint can never run code.

Keys: ``format`` ("spinenet/1"), ``config`` (architecture, see core/model.py), ``voxel_size_um``
(z, y, x the model works at), ``normalization`` (input intensity normalisation), ``decode``
(peak threshold and suppression radius), ``state_dict``, ``training`` (data, steps, validation
metrics, command line, hardware, time).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from ..errors import InputError
from .atomic import atomic_path

FORMAT = "spinenet/1"
REQUIRED_KEYS = ("format", "config", "voxel_size_um", "normalization", "decode", "state_dict", "training")


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> Path:
    """Write ``checkpoint`` atomically after checking it has the contract's keys."""
    import torch

    checkpoint = {"format": FORMAT, **checkpoint}
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}")
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint; corrupt, foreign or code-carrying files raise InputError."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no model checkpoint at {path}: check the path or pick a model by name.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean "cannot use this"
        if isinstance(exc, pickle.UnpicklingError) and "global" in str(exc).lower():
            raise InputError(
                f"{path} was refused: it holds Python objects rather than plain data, and checkpoints "
                f"are loaded with weights_only=True so that they can never run code ({_first_line(exc)})."
            ) from exc
        raise InputError(f"{path} is not a readable checkpoint (corrupt, truncated or not a "
                         f"PyTorch file): {_first_line(exc)}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise InputError(f"{path} is not a napari-spine-tracker model (expected format {FORMAT!r}, "
                         f"found {found!r}); train one with `napari-spine-tracker train`.")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise InputError(f"{path} is an incomplete {FORMAT} checkpoint: missing {', '.join(missing)}.")
    return checkpoint


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
