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

A second table is the quick pass (``core.effort.quick_review``): N from the least certain
prediction until ``--quick`` of them in a row were right, G as ``sn-pN``, J from the link farthest
from where it was expected until as many links in a row were right, nothing placed by hand. It
does not end at the truth: the table gives F1 and IDF1 before and after, and its time against the
full review (``sn-none``) and against labelling by hand.

    python benchmarks/review_effort.py                     # tuning seeds 2000-2002
    python benchmarks/review_effort.py --seeds 1000 1001 1002 --cases default low_snr crowded
    python benchmarks/review_effort.py --methods spinenet --quick-patience 10 20
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
    parser.add_argument("--quick-patience", nargs="*", type=int, default=[5, 10, 20],
                        help="the quick pass's patience: predictions (and links) in a row that were right "
                             "after which a reviewer stops checking (none: no quick pass)")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke test)")
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.effort import ReviewEffort, quick_review, review_effort
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
    quick_rows = []  # (case, patience, F1 and IDF1 before, after, checked, predicted, s, by hand s)
    full_review_s = {}  # case -> seconds of the review that ends at the truth (sn-none)
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
                for patience in args.quick_patience:
                    quick = quick_review(table, series.truth, series.voxel_size_um, suggestions, patience=patience,
                                         suggestion_patience=args.patience)
                    after = evaluate_tracks(quick.table, series.truth, series.voxel_size_um)
                    quick_rows.append((case, patience, before["f1"], before["idf1"], after["f1"], after["idf1"],
                                       quick.checked, len(table), ReviewEffort.seconds(quick.review),
                                       ReviewEffort.seconds(quick.by_hand)))
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
            if label == "sn-none":
                full_review_s[case] = review
    if quick_rows:
        print("\nquick pass: N and J until --quick-patience right in a row, G until --patience misses in a row, "
              "nothing placed by hand; F1 / IDF1 means over seeds, seconds sums; full: the review ending at the "
              "truth without suggestions (sn-none)")
        print(f"{'case':<18} {'patience':>8} {'F1 before':>10} {'after':>6} {'IDF1 before':>12} {'after':>6} "
              f"{'checked':>8} {'quick s':>8} {'of full':>8} {'of hand':>8}")
        for case in args.cases:
            for patience in args.quick_patience:
                runs = [r for r in quick_rows if r[0] == case and r[1] == patience]
                f1b, idf1b, f1a, idf1a = np.mean([r[2:6] for r in runs], axis=0)
                checked = sum(r[6] for r in runs) / sum(r[7] for r in runs)
                seconds, by_hand = (sum(r[i] for r in runs) for i in (8, 9))
                print(f"{case:<18} {patience:8d} {f1b:10.3f} {f1a:6.3f} {idf1b:12.3f} {idf1a:6.3f} {checked:8.0%} "
                      f"{seconds:8.0f} {seconds / full_review_s[case]:8.0%} {seconds / by_hand:8.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
