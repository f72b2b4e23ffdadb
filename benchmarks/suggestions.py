"""Suggestions of missed spines: how many of the spines the threshold misses they hold, and at what precision.

``detect_series(return_suggestions=True)`` also returns the peaks scoring from a floor up to the
series' threshold, apart from the spines kept (``decode.SUGGEST_FLOOR``, ``SUGGEST_APART_UM``). For
each floor this counts, on synthetic series with truth, the true spines the detection missed (not
matched within 1 µm in their session), how many suggestions there are, and how many of those
misses a suggestion matches (per-session Hungarian matching within 1 µm): the share of misses a
reviewer is pointed to, and the share of suggestions worth accepting. At the shipped floor it also
scores a reviewer who accepts exactly the suggestions that are missed spines (**Y** on each, **G**
past the rest): F1 and IDF1 before, and after with each accepted spine given a new id or the id of
the track the tracker expected there (the suggestion's ``track_id``, as the widget gives it).

    python benchmarks/suggestions.py                       # tuning seeds 2000-2002
    python benchmarks/suggestions.py --seeds 1000 1001 1002 --floors 0.2
"""

from __future__ import annotations

import argparse
import sys

CASES = {"low_snr": {}, "crowded": {}, "default": {}, "second_microscope": {"sessions": 8}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seeds", nargs="*", type=int, default=[2000, 2001, 2002])
    parser.add_argument("--floors", nargs="*", type=float, default=[0.1, 0.15, 0.2, 0.25],
                        help="suggestion floors to compare (the shipped one is decode.SUGGEST_FLOOR)")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke test)")
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    import pandas as pd

    from napari_spine_tracker.core import decode, edits
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.infer import InferenceOptions
    from napari_spine_tracker.core.metrics import evaluate_tracks, match_points
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    model = load_model(args.model, device="cpu")
    lowest = min(args.floors)
    small = {"sessions": 3, "shape": (16, 96, 96)} if args.quick else {}
    print(f"model {args.model}; seeds {args.seeds}; shipped floor {decode.SUGGEST_FLOOR}")
    review = lowest == decode.SUGGEST_FLOOR  # the track ids are those of the shipped floor's suggestions

    def with_accepted(table, accepted, suggested_ids: bool) -> pd.DataFrame:
        """``table`` with the ``accepted`` suggestions added as the review's Y adds them (without
        ``suggested_ids``: each with a new id)."""
        data, features = edits.points_from_table(table)
        for row in accepted.itertuples():
            data, features = edits.accept_suggestion(data, features, (row.t, row.z, row.y, row.x),
                                                     int(row.track_id) if suggested_ids else 0)
        return edits.table_from_points(data, features)

    for case in args.cases:
        counts = {floor: [0, 0] for floor in args.floors}  # misses matched, suggestions
        truth_total = missed_total = 0
        scores = []  # per series: (F1, IDF1) before; F1, IDF1 after with new ids; IDF1 with suggested ids
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **{**CASES[case], **small}))
            scale = np.asarray(series.voxel_size_um)
            # every floor from one run, down to the lowest
            table, suggestions = detect_series(series.image, series.voxel_size_um, model=model,
                                               options=InferenceOptions(suggest_floor=lowest),
                                               return_suggestions=True)
            accepted = np.zeros(len(suggestions), dtype=bool)
            for t in range(series.image.shape[0]):
                truth = series.truth.loc[series.truth["t"] == t, ["z", "y", "x"]].to_numpy() * scale
                found = table.loc[table["t"] == t, ["z", "y", "x"]].to_numpy() * scale
                _, matched = match_points(found, truth, 1.0)
                missed = np.setdiff1d(np.arange(len(truth)), matched)
                truth_total, missed_total = truth_total + len(truth), missed_total + len(missed)
                mine = suggestions[suggestions["t"] == t]
                for floor in args.floors:
                    offered = mine.loc[mine["score"] >= floor, ["z", "y", "x"]].to_numpy() * scale
                    _, hit = match_points(offered, truth[missed], 1.0)
                    counts[floor][0] += len(hit)
                    counts[floor][1] += len(offered)
                rows = np.flatnonzero(suggestions["t"].to_numpy() == t)
                hit, _ = match_points(suggestions.iloc[rows][["z", "y", "x"]].to_numpy() * scale, truth[missed], 1.0)
                accepted[rows[hit]] = True
            if review:
                before = evaluate_tracks(table, series.truth, series.voxel_size_um)
                new = evaluate_tracks(with_accepted(table, suggestions[accepted], False), series.truth,
                                      series.voxel_size_um)
                kept = evaluate_tracks(with_accepted(table, suggestions[accepted], True), series.truth,
                                       series.voxel_size_um)
                scores.append((before["f1"], before["idf1"], new["f1"], new["idf1"], kept["idf1"],
                               accepted.sum(), (suggestions["track_id"].to_numpy()[accepted] > 0).sum()))
        print(f"{case}: {truth_total} true spine-sessions, {missed_total} missed", flush=True)
        for floor, (hit, offered) in counts.items():
            share, precision = hit / max(missed_total, 1), hit / max(offered, 1)
            print(f"  floor {floor:.2f}: {offered} suggestions hold {hit} misses ({share:.0%} of the misses; "
                  f"precision {precision:.0%})", flush=True)
        if scores:
            mean, total = np.mean(scores, axis=0), np.sum(scores, axis=0)
            print(f"  a reviewer who accepts the {int(total[5])} that are misses ({int(total[6])} with a track id): "
                  f"F1 {mean[0]:.3f} -> {mean[2]:.3f}; IDF1 {mean[1]:.3f} -> {mean[3]:.3f} with new ids, "
                  f"{mean[4]:.3f} with the suggested ones (means over seeds)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
