"""Shared fixtures. GUI tests are marked ``gui``; they need Qt and an X server (scripts/test.sh)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _private_user_data(tmp_path_factory, monkeypatch):
    """Keep user models and autosaves of every test out of the real user data folder."""
    monkeypatch.setenv("NAPARI_SPINE_TRACKER_DATA_DIR", str(tmp_path_factory.mktemp("user-data")))


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained tiny SpineNet saved as a real checkpoint; its heatmap bias makes it report peaks.

    For tests of the plumbing (CLI, widget, cluster) that must not depend on the shipped weights.
    """
    import torch

    from napari_spine_tracker.core.decode import DEFAULT_DECODE
    from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION
    from napari_spine_tracker.core.model import SpineNet, build_config
    from napari_spine_tracker.io.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = SpineNet(build_config("tiny"))
    with torch.no_grad():
        net.heads["heatmap"].bias.fill_(0.0)
    return save_checkpoint(path, {
        "config": net.config, "voxel_size_um": [0.5, 0.1, 0.1], "normalization": dict(DEFAULT_NORMALIZATION),
        "decode": dict(DEFAULT_DECODE, threshold=0.3), "state_dict": net.state_dict(),
        "training": {"steps": 0, "note": "untrained, for tests"},
    })


@pytest.fixture
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Path of an untrained tiny model checkpoint (see :func:`make_tiny_checkpoint`)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-untrained.pt")
