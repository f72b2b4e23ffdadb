"""Dask worker plugins for batch detection on a cluster (``cluster.detect_many``).

Apart from ``cluster.py`` because a plugin must subclass Dask's own class, and Dask is optional
(``pip install "napari-spine-tracker[cluster]"``): only a run on a cluster imports this module.
"""

from __future__ import annotations

from distributed.diagnostics.plugin import WorkerPlugin

from .devices import reuse_freed_memory


class SharedHeap(WorkerPlugin):
    """While it is registered, the series a worker runs share one heap, as they do in one process
    (``cluster._run_in_process``): each reuses the memory the last one freed instead of paging it
    in again. The heap is given back to the system when the plugin is removed (after the batch)."""

    name = "napari-spine-tracker-shared-heap"

    def setup(self, worker) -> None:
        self._held = reuse_freed_memory()
        self._held.__enter__()

    def teardown(self, worker) -> None:
        held, self._held = getattr(self, "_held", None), None
        if held is not None:
            held.__exit__(None, None, None)
