"""Does a confident track vouch for its dim sessions? Track evidence against one threshold.

A spine that scores 0.6 in four sessions and 0.33 in the fifth is most likely there in the fifth
too; a lone peak of 0.33 most likely is not. The rule tried here links the peaks down to
``low = threshold - d`` (the series' threshold, adapted as ``detect`` adapts it), then keeps a peak
under the threshold only when the mean score of the track it joined is at least
``threshold + e``. Peaks at or above the threshold are kept as before. Unlike hysteresis
(``hysteresis.py``: k peaks above the threshold) a track of steady, middling scores counts, and one
strong session does not vouch for many dim ones.

Peaks are decoded once per series (down to 0.1; peak finding does not depend on the threshold),
linked as ``detect`` links them (registration, gate auto, gaps of 2). ``d`` and ``e`` are chosen on
the ``*_tuning`` sets (the rule that lost no more than 0.003 F1 on any synthetic case, d 0.10, e
0.05, ``detect_series(track_evidence=True)`` since); the others were read once, after.

    python benchmarks/track_evidence.py
    python benchmarks/track_evidence.py --sets tuning second_tuning --model runs/m.pt
"""

from __future__ import annotations

import argparse
import itertools
import sys

CASES = ("default", "large_drift", "low_snr", "crowded")
SECOND = {"sessions": 8}  # scored on sessions 3-7, as in second_microscope.py
#: name -> [(case, seeds, preset overrides, first session scored)]
SETS = {
    "tuning": [(case, (2000, 2001, 2002, 2003), {}, 0) for case in CASES],
    "second_tuning": [("second_microscope", tuple(range(2000, 2006)), SECOND, 3)],
    "confirm": [(case, (2100, 2101, 2102, 2103), {}, 0) for case in CASES],
    "test": [(case, (1000, 1001, 1002), {}, 0) for case in CASES],
    "second_held": [("second_microscope", tuple(range(2018, 2024)), SECOND, 3)],
    "sparse": [("low_snr", (31, 32), {"spine_density_per_um": 0.1}, 0),
               ("default", (31, 32), {"spine_density_per_um": 0.1}, 0)],
}
RULES = [(0.0, 0.0), *itertools.product((0.1, 0.15, 0.2), (0.0, 0.05, 0.1))]  # (d, e); (0, 0): one threshold


def peaks(model, case: str, seed: int, extra: dict):
    """(peaks down to 0.1 with the series' threshold in attrs, motion, series)."""
    from napari_spine_tracker.core.infer import InferenceOptions, predict_series
    from napari_spine_tracker.core.register import estimate_motion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    series = synthesize_series(SynthConfig.preset(case, seed=seed, **extra))
    motion = estimate_motion(series.image, series.voxel_size_um)
    found = predict_series(series.image, series.voxel_size_um, model, motion=motion,
                           options=InferenceOptions(suggest_floor=0.1))
    if not model.decode.get("use_displacement", True):
        found = found.drop(columns=["dz", "dy", "dx"])
    return found, motion, series


def vouched(found, motion, voxel, d: float, e: float):
    """The spine table under rule (d, e)."""
    from napari_spine_tracker.core.link import keep_vouched, link_detections

    threshold = float(found.attrs["threshold"])
    table = link_detections(found[found["score"] >= threshold - d].reset_index(drop=True), voxel, motion=motion)
    return table if d == 0 else keep_vouched(table, threshold, mean_above=e)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    model = load_model(args.model, device="cpu")
    print(f"model {args.model}; a peak under the series' threshold t is kept when it links (down to t - d) "
          f"into a track whose mean score is >= t + e; d = 0: one threshold. F1 / IDF1, means over seeds")
    for set_name in args.sets:
        print(f"\n{set_name}")
        print(f"| d | e | {' | '.join(case for case, *_ in SETS[set_name])} | mean |")
        print("|---|---|" + "---|" * (len(SETS[set_name]) + 1))
        found = {(case, seed): (peaks(model, case, seed, extra), first)
                 for case, seeds, extra, first in SETS[set_name] for seed in seeds}
        for d, e in RULES:
            per_case: dict[str, list] = {}
            for (case, _seed), ((detected, motion, series), first) in found.items():
                table = vouched(detected, motion, series.voxel_size_um, d, e)
                truth = series.truth[series.truth["t"] >= first]
                scores = evaluate_tracks(table[table["t"] >= first], truth, series.voxel_size_um)
                per_case.setdefault(case, []).append((scores["f1"], scores["idf1"]))
            means = {case: np.mean(v, axis=0) for case, v in per_case.items()}
            overall = np.mean(list(means.values()), axis=0)
            cells = " | ".join(f"{m[0]:.3f} / {m[1]:.3f}" for m in means.values())
            label = "- | -" if d == 0 else f"{d:.2f} | {e:.2f}"
            print(f"| {label} | {cells} | {overall[0]:.4f} / {overall[1]:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
