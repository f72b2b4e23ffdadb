"""Shared fixtures. GUI tests are marked ``gui``; they need Qt and an X server (scripts/test.sh)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
