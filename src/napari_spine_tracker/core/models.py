"""Where models live and how they are loaded.

Shipped models sit inside the package (``napari_spine_tracker/models/NAME.pt``); models a user
trains go to a user data folder (platform convention, via platformdirs; override with the
``NAPARI_SPINE_TRACKER_DATA_DIR`` environment variable). A model is named by its file stem, or
given as a path.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "spinenet-synth"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "models"
#: the shipped model trained for coarse sampling (docs/model_report.md, "Coarser voxels"), and where it pays:
#: z steps and pixels at least this coarse (µm)
COARSE_MODEL = "spinenet-synth-coarse"
COARSE_FROM_UM = (0.8, 0.15)


def coarse_model_hint(voxel_size_um, model) -> str | None:
    """A suggestion to use :data:`COARSE_MODEL` when the default model is asked to detect on voxels
    coarse in z and in y, x alike (where the default finds far fewer spines), else None."""
    if not (isinstance(model, str) and model == DEFAULT_MODEL):
        return None
    z, y, x = (float(v) for v in voxel_size_um)
    if z >= COARSE_FROM_UM[0] and min(y, x) >= COARSE_FROM_UM[1]:
        return (f"voxels of {z:g} x {y:g} x {x:g} µm are coarse for {DEFAULT_MODEL} (trained at 0.5 x 0.1 x "
                f"0.1 µm): {COARSE_MODEL} finds more spines at such sampling (F1 0.83 against 0.80 at 1 x 0.2 x "
                f"0.2 µm, 0.69 against 0.58 at 1.5 x 0.25 x 0.25 µm on synthetic tissue); choose it with "
                f"--model {COARSE_MODEL} or in the widget's Model.")
    return None


def user_data_dir() -> Path:
    """The user's data folder for this plugin (models, autosaves of read-only images)."""
    override = os.environ.get("NAPARI_SPINE_TRACKER_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("napari-spine-tracker", appauthor=False))


def user_models_dir() -> Path:
    return user_data_dir() / "models"


@dataclass
class ModelInfo:
    name: str
    path: Path
    description: str
    shipped: bool


def _describe(path: Path) -> str:
    """One line from the JSON sidecar written next to each model (cheap: no torch.load)."""
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return ""
    return str(meta.get("description", ""))


def list_models() -> list[ModelInfo]:
    """Shipped models first (the default model leading, as the widget's first choice), then the
    user's, each with a one-line description."""
    found = []
    for folder, shipped in ((SHIPPED_DIR, True), (user_models_dir(), False)):
        if folder.is_dir():
            for path in sorted(folder.glob("*.pt"), key=lambda p: (not shipped or p.stem != DEFAULT_MODEL, p.name)):
                if path.name.endswith(".resume.pt"):
                    continue
                found.append(ModelInfo(path.stem, path, _describe(path), shipped))
    return found


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model name (shipped or user) or a path -> the checkpoint path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix == ".pt" or os.sep in text or path.exists():
        if not path.is_file():
            raise InputError(f"no model checkpoint at {path}: check the path.")
        return path
    for info in list_models():
        if info.name == text:
            return info.path
    names = ", ".join(info.name for info in list_models()) or "none installed"
    raise InputError(f"unknown model {text!r}; available: {names}; or give a path to a .pt file.")


@dataclass
class LoadedModel:
    """A network ready for inference, with what it needs to know about its input."""

    net: Any  # SpineNet, in eval mode, on ``device``
    device: Any  # torch.device
    voxel_size_um: tuple[float, float, float]
    normalization: dict[str, Any]
    decode: dict[str, Any]
    name: str = "model"
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return self.net.config


def model_from_checkpoint(checkpoint: dict[str, Any], device="cpu", name: str = "model") -> LoadedModel:
    """Build a :class:`LoadedModel` from a checkpoint dict (see io/checkpoint.py)."""
    from .devices import get_device
    from .model import SpineNet, fuse_for_inference

    if isinstance(device, str):
        device = get_device(device)
    net = SpineNet(checkpoint["config"])
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"model {name!r}: weights do not fit its architecture ({str(exc).splitlines()[0]})") from exc
    net = fuse_for_inference(net.eval()).to(device)
    return LoadedModel(
        net=net,
        device=device,
        voxel_size_um=tuple(float(v) for v in checkpoint["voxel_size_um"]),
        normalization=dict(checkpoint["normalization"]),
        decode=dict(checkpoint["decode"]),
        name=name,
        training=dict(checkpoint.get("training", {})),
    )


def load_model(model: str | os.PathLike | LoadedModel = DEFAULT_MODEL, device: str = "auto") -> LoadedModel:
    """Load a model by name or path onto ``device`` (an already loaded model is returned as is)."""
    if isinstance(model, LoadedModel):
        return model
    from ..io.checkpoint import load_checkpoint

    path = resolve_model(model)
    return model_from_checkpoint(load_checkpoint(path), device=device, name=path.stem)
