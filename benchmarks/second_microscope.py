"""Out of the box on another microscope: detection F1 / IDF1, precision and recall per peak
threshold on the ``second_microscope`` preset (outside the training ranges; see finetune.py for
what fine-tuning then gains), for one or more models, with 1 or 4 mirror views.

    python benchmarks/second_microscope.py                               # the shipped model
    python benchmarks/second_microscope.py --models spinenet-synth runs/stage4.pt --views 1 4
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["spinenet-synth"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.35, 0.4, 0.45])
    parser.add_argument("--views", nargs="+", type=int, default=[1, 4], choices=[1, 2, 4])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--labelled", type=int, default=3,
                        help="scored on the sessions after these (those finetune.py labels)")
    args = parser.parse_args(argv)

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    later = list(range(args.labelled, args.sessions))
    print(f"second_microscope, {args.sessions} sessions, scored on sessions {later[0]}-{later[-1]}")
    print(f"{'seed':>5s}  {'model':32s} {'views':>5s} {'thr':>5s} {'F1':>6s} {'IDF1':>6s} {'prec':>6s} {'recall':>6s}")
    for seed in args.seeds:
        series = synthesize_series(SynthConfig.preset("second_microscope", seed=seed, sessions=args.sessions))
        truth = series.truth[series.truth["t"].isin(later)]
        for name in args.models:
            model = load_model(name, device="cpu")
            for views in args.views:
                for threshold in args.thresholds:
                    table = detect_series(series.image, series.voxel_size_um, model=model, threshold=threshold,
                                          views=views)
                    s = evaluate_tracks(table[table["t"].isin(later)], truth, series.voxel_size_um)
                    stored = " *" if abs(threshold - model.decode["threshold"]) < 1e-9 else ""
                    print(f"{seed:5d}  {name[-32:]:32s} {views:5d} {threshold:5.2f} {s['f1']:6.3f} {s['idf1']:6.3f} "
                          f"{s['precision']:6.3f} {s['recall']:6.3f}{stored}", flush=True)
    print("* the model's stored threshold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
