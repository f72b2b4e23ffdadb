"""What tiling changes: ``detect`` with small tiles against one tile for the whole field.

Each series is detected end to end (registration, linking) once with one tile and once per halo
with tiles of ``--tile`` voxels in y and x (many seams: a 256 x 256 field drifted to ~270 voxels
is cut into 3 x 3 tiles of 128). Printed per series: F1 / IDF1 against the truth, the share of
detections at the place one tile finds them (within ``--within`` voxels; detections of the larger
table that have no partner count as misses) and the model-grid voxels the network read, as a
multiple of one tile's.

    python benchmarks/tiling.py                       # five presets, tiles of 128, halos 16 and 24
    python benchmarks/tiling.py --tile 96 --halo 8 16 24 --cases crowded
    python benchmarks/tiling.py --device cuda --tile 192 --cases default large_drift   # a GPU lease
    python benchmarks/tiling.py --views 4 --halo 16 --cases default crowded rotated
"""

from __future__ import annotations

import argparse
import sys

CASES = ("default", "large_drift", "crowded", "low_snr", "rotated")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--seed", type=int, default=31, help="the first case's seed; the next cases count up")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--tile", type=int, default=128, help="tile input in y and x, model-grid voxels")
    parser.add_argument("--halo", type=int, nargs="+", default=[16, 24], help="halos in y and x to compare")
    parser.add_argument("--within", type=float, default=0.1, help="voxels: a detection at the same place")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (where detection runs in fp16)")
    parser.add_argument("--views", type=int, default=1, help="mirror views (test-time augmentation): 1, 2 or 4")
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    from scipy.spatial import cKDTree

    from napari_spine_tracker.core import infer
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.WARNING)
    model = load_model(args.model, device=args.device)
    plan_tiles = infer.plan_tiles
    read = []

    def counting_plan(*a, **k):  # the voxels each run's network reads
        plan = plan_tiles(*a, **k)
        read.append(len(plan.tiles) * int(np.prod(plan.input_shape)))
        return plan

    infer.plan_tiles = counting_plan

    def same_place(table, reference) -> float:
        if not len(table) or not len(reference):
            return float(len(table) == len(reference))
        scale = [1e6, 1, 1, 1]  # sessions apart
        distance, _ = cKDTree(reference[["t", "z", "y", "x"]].to_numpy() * scale).query(
            table[["t", "z", "y", "x"]].to_numpy() * scale)
        return float(np.sum(distance <= args.within)) / max(len(table), len(reference))

    def run(series, **options):
        del read[:]
        table = detect_series(series.image, series.voxel_size_um, model=model, device=args.device,
                              options=infer.InferenceOptions(views=args.views, **options))
        return table, evaluate_tracks(table, series.truth, series.voxel_size_um), sum(read)

    print(f"model {args.model} on {args.device}, {args.views} view(s); tiles of {args.tile} in y, x; "
          f"the same place: within {args.within} voxels")
    try:
        for n, case in enumerate(args.cases):
            series = synthesize_series(SynthConfig.preset(case, seed=args.seed + n, sessions=args.sessions))
            whole, scores, whole_read = run(series, max_tile=(64, 4096, 4096))
            cells = [f"{case:12s} one tile: F1 {scores['f1']:.3f} IDF1 {scores['idf1']:.3f}"]
            for halo in args.halo:
                table, scores, tiles_read = run(series, max_tile=(64, args.tile, args.tile), halo=(4, halo, halo))
                cells.append(f"halo {halo}: F1 {scores['f1']:.3f} IDF1 {scores['idf1']:.3f} "
                             f"same place {same_place(table, whole):.3f} read {tiles_read / whole_read:.2f}x")
            print(" | ".join(cells), flush=True)
    finally:
        infer.plan_tiles = plan_tiles
    return 0


if __name__ == "__main__":
    sys.exit(main())
