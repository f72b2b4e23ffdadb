"""Does the network see more at another scale? Each series detected as read and resampled larger or smaller.

A series told a y, x voxel size ``f`` times its true one is resampled to the model's voxels
``f`` times as large (``f`` 1.25: magnified, its spines 1.25x larger to the network; 0.8:
shrunk); the spines found are mapped back to the series' own voxels and scored against the
truth as usual. If some scale found more than the one the model was trained at, a second scale
would be worth running as a test-time view (as the mirror views are, ``detect --views``).

    python benchmarks/scales.py                                   # tuning seeds 2000-2002, four cases
    python benchmarks/scales.py --cases crowded --factors 1.1 1.25 1.5
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001, 2002],
                        help="series seeds (default: the tuning seeds; the test seeds are 1000-1002)")
    parser.add_argument("--factors", nargs="+", type=float, default=[1.0, 0.8, 1.25],
                        help="y, x voxel size told to detection, as a multiple of the true one")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke run)")
    args = parser.parse_args(argv)

    import pandas as pd

    from napari_spine_tracker.core.bench import QUICK_OVERRIDES
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.WARNING)
    model = load_model(args.model, device=args.device)
    changes = QUICK_OVERRIDES if args.quick else {}
    rows = []
    for case in args.cases:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **changes))
            for factor in args.factors:
                told = tuple(np.asarray(series.voxel_size_um) * (1.0, factor, factor))
                table = detect_series(series.image, told, model=model, device=args.device)
                scores = evaluate_tracks(table, series.truth, series.voxel_size_um, tol_um=1.0)
                rows.append({"case": case, "seed": seed, "factor": factor,
                             **{key: scores[key] for key in ("f1", "precision", "recall", "idf1")}})
                print(f"{case:12s} {seed:5d}  x{factor:<5g} F1 {scores['f1']:.3f}  precision "
                      f"{scores['precision']:.3f}  recall {scores['recall']:.3f}", flush=True)
    means = pd.DataFrame(rows).groupby(["factor", "case"], sort=False)[["f1", "precision", "recall", "idf1"]].mean()
    print(f"\nmeans over seeds {args.seeds}, model {args.model}:")
    print(means.unstack("case")["f1"].assign(mean=lambda f: f.mean(axis=1)).round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
