"""Voxel size: F1 / IDF1 of one or more models on the same tissue imaged at coarser voxels.

In-vivo spine imaging often steps 1 µm or more in z and samples 0.15-0.25 µm per pixel; the
realistic presets (and the model grid) are 0.5 x 0.1 x 0.1 µm. Each series here is the preset with
its voxel size replaced and its shape chosen to keep the field of view (16 x 25.6 x 25.6 µm, the
test series' field), so only the sampling changes. Test seeds 1000-1002 by default; detection with
each model's stored threshold and linking.

    python benchmarks/sampling.py                                      # the shipped model
    python benchmarks/sampling.py --models spinenet-synth runs/coarse1.pt --json results/sampling.json
    python benchmarks/sampling.py --models trackpy       # the classical peer (parameters in µm)
"""

from __future__ import annotations

import argparse
import json
import sys

#: (z, y, x) µm: the presets' own, then coarser in z, in y x, and in both
VOXELS = ((0.5, 0.1, 0.1), (1.0, 0.1, 0.1), (0.5, 0.2, 0.2), (1.0, 0.2, 0.2), (1.5, 0.25, 0.25))
FIELD_UM = (16.0, 25.6, 25.6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["spinenet-synth"],
                        help="model names or checkpoints; 'trackpy' for the classical peer")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--json", help="also write every series' figures to this JSON file")
    args = parser.parse_args(argv)

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.peer import trackpy_detect_track
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    def detector(name):
        if name == "trackpy":
            return trackpy_detect_track
        model = load_model(name, device="cpu")
        return lambda image, voxel: detect_series(image, voxel, model=model)

    models = {name: detector(name) for name in args.models}
    rows = []
    print(f"cases {args.cases}, seeds {args.seeds}, field {FIELD_UM} µm; mean over cases and seeds, F1 / IDF1")
    print(f"{'voxel z, y, x µm':20s} " + " ".join(f"{name[-24:]:>24s}" for name in args.models))
    for voxel in VOXELS:
        shape = tuple(round(f / v) for f, v in zip(FIELD_UM, voxel, strict=True))
        scores = {name: [] for name in args.models}
        for case in args.cases:
            for seed in args.seeds:
                series = synthesize_series(SynthConfig.preset(case, seed=seed).replace(voxel_size_um=voxel,
                                                                                        shape=shape))
                for name, detect in models.items():
                    table = detect(series.image, series.voxel_size_um)
                    s = evaluate_tracks(table, series.truth, series.voxel_size_um)
                    scores[name].append((s["f1"], s["idf1"]))
                    rows.append({"model": name, "voxel_um": list(voxel), "case": case, "seed": seed,
                                 "f1": s["f1"], "idf1": s["idf1"], "precision": s["precision"],
                                 "recall": s["recall"]})
        cells = [f"{np.mean([f for f, _ in v]):.3f} / {np.mean([i for _, i in v]):.3f}" for v in scores.values()]
        print(f"{voxel!s:20s} " + " ".join(f"{c:>24s}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
