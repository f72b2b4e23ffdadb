"""How fast training batches are prepared: patches per second, in one process and with workers.

On a GPU, training waits for its batches (an H200 trained the lean model at 10.9 steps of 32
patches per second with 11 batch workers, busy 0-69 % of the time), so this rate bounds GPU
training. Batches of 32 patches of 3 sessions x 16 x 96 x 96 from a pool of synthetic series.

    python benchmarks/batches.py                 # one process, then 2 workers
    python benchmarks/batches.py --workers 0 4
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--coarse-fraction", type=float, default=0.0,
                        help="share of the realistic series rendered at coarser voxels (train --coarse-fraction)")
    args = parser.parse_args(argv)

    from functools import partial

    from napari_spine_tracker.core.batches import PatchOptions
    from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION
    from napari_spine_tracker.core.loader import worker_batches
    from napari_spine_tracker.core.sources import DEFAULT_PRESETS, BatchSource, SourceSpec, worker_source
    from napari_spine_tracker.core.train import MODEL_VOXEL_UM

    spec = SourceSpec(pool_size=8, pool_seed=0, seed=0, rank=0, model_voxel_um=MODEL_VOXEL_UM,
                      normalization=DEFAULT_NORMALIZATION, patch=PatchOptions(), realistic_fraction=0.5,
                      presets=DEFAULT_PRESETS, coarse_fraction=args.coarse_fraction, user_series=[],
                      synthetic_fraction=1.0, batch_size=args.batch_size, out_shape=(16, 48, 48),
                      stride=(1, 2, 2), out_voxel_um=(0.5, 0.2, 0.2), refresh_every=8)
    for workers in args.workers:
        if workers == 0:
            source = BatchSource(spec)
            source.fill()
            batches = iter(source.next, None)
        else:
            batches = worker_batches(partial(worker_source, spec), workers, pin_memory=False)
        next(batches)  # pools filled, workers started
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        seconds = time.perf_counter() - start
        rate = args.batches * args.batch_size / seconds
        print(f"{workers} workers: {rate:7.1f} patches/s ({seconds / args.batches:.3f} s per batch of "
              f"{args.batch_size}; pool renewal included)")
        del batches
    return 0


if __name__ == "__main__":
    sys.exit(main())
