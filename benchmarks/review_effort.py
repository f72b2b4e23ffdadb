"""How much work the review leaves: correcting a detection into the truth, against labelling by hand.

On synthetic series with truth, each method's spine table is corrected by an oracle reviewer with
the widget's own edits (``core.effort.review_effort``: check each prediction with N, delete the
false ones, visit the suggestions with G and accept the misses among them with Y, place the other
misses, split and merge tracks until every id is one spine), which must end with F1 and IDF1 1.0.
It prints the corrections needed, the keys, clicks and decisions, and the keystroke-level model's
seconds (a model, not a study of users; see ``core/effort.py``) for the review and for labelling
the same series by hand, with our model and with the trackpy peer (which offers no suggestions).
Our model's table is reviewed three ways: visiting every suggestion (``spinenet``), stopping after
``--patience`` suggestions in a row were not spines (``sn-pN``), and ignoring them (``sn-none``).

    python benchmarks/review_effort.py                     # tuning seeds 2000-2002
    python benchmarks/review_effort.py --seeds 1000 1001 1002 --cases default low_snr crowded
"""

from __future__ import annotations

import argparse
import sys

CASES = {"default": {}, "large_drift": {}, "low_snr": {}, "crowded": {}, "second_microscope": {"sessions": 8}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--methods", nargs="*", default=["spinenet", "trackpy"], choices=["spinenet", "trackpy"])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[2000, 2001, 2002])
    parser.add_argument("--patience", type=int, default=5,
                        help="suggestions in a row that were not spines after which a reviewer stops")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke test)")
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.effort import ReviewEffort, review_effort
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.peer import trackpy_detect_track
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    model = load_model(args.model, device="cpu") if "spinenet" in args.methods else None
    small = {"sessions": 3, "shape": (16, 96, 96)} if args.quick else {}
    print(f"model {args.model}; seeds {args.seeds}; keystroke-level model: key {0.28} s, click 1.3 s, "
          "decision 1.35 s; sums over seeds")
    print(f"{'case':<18} {'method':<9} {'F1':>6} {'IDF1':>6} {'spines':>7} {'fixes':>6} {'del':>5} {'sugg':>5} "
          f"{'Y':>4} {'add':>5} {'split':>5} {'merge':>5} {'review s':>9} {'by hand s':>9} {'ratio':>6}")
    labels = []
    if "spinenet" in args.methods:
        labels += ["spinenet", f"sn-p{args.patience}", "sn-none"]
    if "trackpy" in args.methods:
        labels.append("trackpy")
    for case in args.cases:
        efforts = {label: [] for label in labels}
        scores = {label: [] for label in labels}
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **{**CASES[case], **small}))
            reviews = []  # (label, table, its F1 and IDF1, suggestions, patience)
            if "spinenet" in args.methods:
                table, suggestions = detect_series(series.image, series.voxel_size_um, model=model,
                                                   return_suggestions=True)
                before = evaluate_tracks(table, series.truth, series.voxel_size_um)
                reviews += [("spinenet", table, before, suggestions, None),
                            (f"sn-p{args.patience}", table, before, suggestions, args.patience),
                            ("sn-none", table, before, None, None)]
            if "trackpy" in args.methods:
                table = trackpy_detect_track(series.image, series.voxel_size_um)
                reviews.append(("trackpy", table, evaluate_tracks(table, series.truth, series.voxel_size_um),
                                None, None))
            for label, table, before, suggestions, patience in reviews:
                effort = review_effort(table, series.truth, series.voxel_size_um, suggestions,
                                       suggestion_patience=patience)
                after = evaluate_tracks(effort.table, series.truth, series.voxel_size_um)
                if after["f1"] != 1.0 or after["idf1"] != 1.0:
                    raise SystemExit(f"{case} seed {seed} {label}: the review did not end at the truth "
                                     f"(F1 {after['f1']}, IDF1 {after['idf1']})")
                efforts[label].append(effort)
                scores[label].append((before["f1"], before["idf1"]))
        for label in labels:
            runs = efforts[label]
            total = {name: sum(getattr(e, name) for e in runs)
                     for name in ("true_points", "corrections", "deleted", "suggestions_visited", "accepted",
                                  "splits", "merges")}
            added = sum(e.added_new + e.added_linked for e in runs)
            review = sum(ReviewEffort.seconds(e.review) for e in runs)
            by_hand = sum(ReviewEffort.seconds(e.by_hand) for e in runs)
            f1, idf1 = np.mean(scores[label], axis=0)
            print(f"{case:<18} {label:<9} {f1:6.3f} {idf1:6.3f} {total['true_points']:7d} {total['corrections']:6d} "
                  f"{total['deleted']:5d} {total['suggestions_visited']:5d} {total['accepted']:4d} {added:5d} "
                  f"{total['splits']:5d} {total['merges']:5d} {review:9.0f} {by_hand:9.0f} "
                  f"{by_hand / review:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
