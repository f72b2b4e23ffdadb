"""The linking gate: IDF1 per case for several gates, on the same detections.

Each series is detected once (the model's own decoding), then its detections are linked again
with each gate (``link_detections(gate_um=...)``, registration as in ``detect``) and scored. Tuning
seeds by default: the gate is a choice, and the test seeds (1000-1002) judge choices, not make them.

    python benchmarks/linking_gate.py                                  # shipped model, seeds 2000-2002
    python benchmarks/linking_gate.py --gates 1.0 1.2 --seeds 1000 1001 1002
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001, 2002])
    parser.add_argument("--gates", nargs="+", type=float, default=[0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6])
    args = parser.parse_args(argv)

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.link import link_detections
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.register import estimate_motion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device="cpu")
    runs = []
    for case in args.cases:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed))
            detections = detect_series(series.image, series.voxel_size_um, model=model).drop(columns=["track_id"])
            motion = estimate_motion(series.image, series.voxel_size_um)
            runs.append((case, series, detections, motion))
    print(f"model {args.model}, seeds {args.seeds}; mean IDF1 over seeds per case (detections fixed)")
    print("gate um  " + "  ".join(f"{case:>11s}" for case in args.cases) + "         mean")
    for gate in args.gates:
        scores = {case: [] for case in args.cases}
        for case, series, detections, motion in runs:
            linked = link_detections(detections, series.voxel_size_um, motion=motion, gate_um=gate)
            scores[case].append(evaluate_tracks(linked, series.truth, series.voxel_size_um)["idf1"])
        means = [float(np.mean(scores[case])) for case in args.cases]
        print(f"{gate:7.2f}  " + "  ".join(f"{m:11.4f}" for m in means) + f"  {np.mean(means):11.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
