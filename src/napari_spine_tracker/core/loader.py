"""Training batches prepared in worker processes (``train --workers N``).

Cutting, augmenting and rendering targets for a batch of 32 patches takes about a second of one
CPU core, while a GPU trains on it in a fraction of that: without helpers the GPU waits. Each
worker process owns a :class:`~napari_spine_tracker.core.sources.BatchSource` (its own synthetic
pool, with its own seeds, and the user's series) and hands finished batches to the training
process through :class:`torch.utils.data.DataLoader`, the image and heatmap in float16 to halve
the shared-memory traffic (the other targets travel as rows at the spine centres). The stream is
deterministic for a given seed and number of workers (the loader takes batches from the workers in
turn).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class BatchStream(IterableDataset):
    """An endless stream of batches; ``make_source(worker, workers)`` builds each worker's source."""

    def __init__(self, make_source: Callable):
        super().__init__()
        self.make_source = make_source

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        source = self.make_source(worker, workers)
        source.fill()
        while True:
            batch = source.next()
            yield {name: torch.from_numpy(value.astype(np.float16) if name in COMPACT else value)
                   for name, value in batch.items()}


#: the batch's large arrays, carried in float16 (the targets at the centres are few: float32)
COMPACT = ("image", "heatmap", "negative_weight")


def worker_batches(make_source: Callable, workers: int, pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from ``workers`` processes (a few prepared ahead by each)."""
    loader = DataLoader(BatchStream(make_source), batch_size=None, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=4, persistent_workers=False)
    return iter(loader)
