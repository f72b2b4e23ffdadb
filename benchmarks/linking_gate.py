"""The linking gate and gap: IDF1 per case for several gates (and gaps), on the same detections.

Each series is detected once (the model's own decoding, or ``--threshold``), then its detections
are linked again with each gate and gap (``link_detections(gate_um=..., max_gap=...)``,
registration as in ``detect``) and scored. Tuning seeds by default: the gate is a choice, and the
test seeds (1000-1002) judge choices, not make them.

    python benchmarks/linking_gate.py                                  # shipped model, seeds 2000-2002
    python benchmarks/linking_gate.py --gates 1.0 1.2 --seeds 1000 1001 1002
    python benchmarks/linking_gate.py --cases second_microscope --sessions 8 --threshold 0.3 --max-gaps 1 2
"""

from __future__ import annotations

import argparse
import itertools
import sys

from napari_spine_tracker.core.link import parse_gate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001, 2002])
    parser.add_argument("--gates", nargs="+", type=parse_gate, default=["auto", 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6],
                        help="µm, or auto (the default: chosen per series)")
    parser.add_argument("--max-gaps", nargs="+", type=int, default=[2])
    parser.add_argument("--threshold", type=float, help="peak threshold (default: the model's)")
    parser.add_argument("--sessions", type=int, help="sessions per series (default: the preset's)")
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
            extra = {} if args.sessions is None else {"sessions": args.sessions}
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **extra))
            detections = detect_series(series.image, series.voxel_size_um, model=model,
                                       threshold=args.threshold).drop(columns=["track_id"])
            motion = estimate_motion(series.image, series.voxel_size_um)
            runs.append((case, series, detections, motion))
    print(f"model {args.model}, seeds {args.seeds}, threshold {args.threshold or 'auto (the default)'}; "
          "mean IDF1 over seeds per case (detections fixed)")
    print("gate um  gap  " + "  ".join(f"{case:>11s}" for case in args.cases) + "         mean")
    for gate, gap in itertools.product(args.gates, args.max_gaps):
        scores = {case: [] for case in args.cases}
        used = []
        for case, series, detections, motion in runs:
            linked = link_detections(detections, series.voxel_size_um, motion=motion, gate_um=gate, max_gap=gap)
            scores[case].append(evaluate_tracks(linked, series.truth, series.voxel_size_um)["idf1"])
            used.append(linked.attrs["gate_um"])
        means = [float(np.mean(scores[case])) for case in args.cases]
        label = gate if isinstance(gate, str) else f"{gate:.2f}"
        chose = f"   (chose {min(used):.2f}-{max(used):.2f})" if isinstance(gate, str) else ""
        print(f"{label:>7s}  {gap:3d}  " + "  ".join(f"{m:11.4f}" for m in means) + f"  {np.mean(means):11.4f}"
              + chose, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
