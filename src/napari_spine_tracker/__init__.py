"""Find, track and correct dendritic spines in chronic two-photon time series.

The public Python API is imported lazily, so that ``import napari_spine_tracker`` (and napari's
plugin discovery) stays fast and does not pull in torch::

    from napari_spine_tracker import load_series, detect_series, write_spine_table
    series = load_series("mouse1_dendrite3.tif")
    spines = detect_series(series.data, series.voxel_size_um)
    write_spine_table(spines, "mouse1_dendrite3.spines.csv")
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "InputError": "napari_spine_tracker.errors",
    "load_series": "napari_spine_tracker.io.series",
    "Series": "napari_spine_tracker.io.series",
    "read_spine_table": "napari_spine_tracker.io.tables",
    "write_spine_table": "napari_spine_tracker.io.tables",
    "validate_spine_table": "napari_spine_tracker.io.tables",
    "synthesize_series": "napari_spine_tracker.core.synth",
    "SynthConfig": "napari_spine_tracker.core.synth",
    "evaluate_tracks": "napari_spine_tracker.core.metrics",
    "detect_series": "napari_spine_tracker.core.detect",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
