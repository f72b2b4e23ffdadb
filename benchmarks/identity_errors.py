"""Where identity is lost: the linking's errors by kind, per case, on the same detections.

Detections are matched to the truth session by session (as ``evaluate_tracks`` does), then each true
spine's matched predicted ids are followed over its sessions:

- ``kept``: consecutive matched appearances (a gap in between allowed) with the same predicted id;
- ``switch``: the id changes to one that existed before (taken from another spine or a false detection);
- ``fragment``: the id changes to one born there (the track was broken and restarted);
- ``gain merged``: a spine that appears after the first session (a gain, or one drifting into the field)
  is matched to a predicted id that already existed: a gain and a loss read as one stable spine, which
  hides both from a turnover count;
- ``loss merged``: the predicted id of a spine's last matched session goes on after the spine is gone
  (with another spine, or a false detection).

``IDTP/TP`` is how much of the detection score identity keeps (IDF1 = F1 x IDTP / TP). Each gate relinks
the same detections (``link_detections(gate_um=...)``, registration as in ``detect``).

How fast a reviewer finds the wrong links: ``wrong links`` counts the links between consecutive
points of a predicted track that both match true spines, but different ones; ``in top 10%`` how many
of them lie among the tenth of all links that reached farthest (``link_um``, the order in which the
review's J key visits them), and ``top 10%`` how many links that tenth holds.

    python benchmarks/identity_errors.py                       # shipped model, test seeds, gates 1.2 and 0.8
    python benchmarks/identity_errors.py --cases crowded --seeds 2000 2001 2002 --gates 1.2
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import Counter

from napari_spine_tracker.core.link import parse_gate

KINDS = ("kept", "switch", "fragment", "gain merged", "gains", "loss merged", "losses", "wrong links",
         "in top 10%", "top 10%")
TOP = 0.1


def identity_errors(pred, truth, voxel_size_um) -> Counter:
    """Counts of the kinds in the module docstring, and ``tp``/``idtp``, for one series."""
    import numpy as np

    from napari_spine_tracker.core.metrics import evaluate_tracks, match_points

    scale = np.asarray(voxel_size_um, float)
    scores = evaluate_tracks(pred, truth, scale)
    counts = Counter(tp=scores["tp"], idtp=scores["idtp"])
    pred_t, true_t = pred["t"].to_numpy(), truth["t"].to_numpy()
    true_of_row = np.full(len(pred), -1)  # the true id each predicted point matches (-1: none)
    for t in np.unique(true_t):
        p, q = np.flatnonzero(pred_t == t), np.flatnonzero(true_t == t)
        rows_p, rows_q = match_points(pred.iloc[p][["z", "y", "x"]].to_numpy(float) * scale,
                                      truth.iloc[q][["z", "y", "x"]].to_numpy(float) * scale, 1.0)
        true_of_row[p[rows_p]] = truth["track_id"].to_numpy()[q[rows_q]]
    found = np.flatnonzero(true_of_row >= 0)
    matched = {(int(true_of_row[r]), int(pred_t[r])): int(pred["track_id"].iloc[r]) for r in found}  # -> predicted id
    counts.update(_doubtful_links(pred, true_of_row))
    born = pred.groupby("track_id")["t"].min().to_dict()
    last = pred.groupby("track_id")["t"].max().to_dict()
    first_session, last_session = int(true_t.min()), int(true_t.max())
    for true_id, rows in truth.groupby("track_id"):
        seen = [(t, matched[(true_id, t)]) for t in sorted(rows["t"]) if (true_id, t) in matched]
        for (_, before), (t, after) in itertools.pairwise(seen):
            counts["kept" if after == before else "fragment" if born[after] == t else "switch"] += 1
        sessions = sorted(rows["t"])
        if sessions[0] > first_session and seen and seen[0][0] == sessions[0]:
            counts["gains"] += 1
            counts["gain merged"] += born[seen[0][1]] < sessions[0]
        if sessions[-1] < last_session and seen and seen[-1][0] == sessions[-1]:
            counts["losses"] += 1
            counts["loss merged"] += last[seen[-1][1]] > sessions[-1]
    return counts


def _doubtful_links(pred, true_of_row) -> Counter:
    """Wrong links, and how many of them the farthest tenth of the links (by ``link_um``) holds."""
    import numpy as np

    order = np.lexsort((pred["t"].to_numpy(), pred["track_id"].to_numpy()))
    ids, true_ids = pred["track_id"].to_numpy()[order], true_of_row[order]
    distance = pred["link_um"].to_numpy(float)[order]
    linked = np.flatnonzero(ids[1:] == ids[:-1]) + 1  # points linked to the point before them
    wrong = linked[(true_ids[linked] >= 0) & (true_ids[linked - 1] >= 0) & (true_ids[linked] != true_ids[linked - 1])]
    flagged = np.argsort(-np.nan_to_num(distance, nan=-1.0), kind="stable")[:int(np.ceil(TOP * len(linked)))]
    return Counter({"wrong links": len(wrong), "in top 10%": len(np.intersect1d(wrong, flagged)),
                    "top 10%": len(flagged)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--gates", nargs="+", type=parse_gate, default=["auto", 1.2, 0.8],
                        help="µm, or auto (the default: chosen per series)")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke test)")
    args = parser.parse_args(argv)

    import logging

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.link import link_detections
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.register import estimate_motion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    model = load_model(args.model, device="cpu")
    small = {"sessions": 3, "shape": (16, 96, 96)} if args.quick else {}
    print(f"model {args.model}, seeds {args.seeds}; sums over seeds (matched appearances of true spines; "
          "gains and losses: the true ones that were found)")
    print(f"{'case':12s} {'gate':>5s} {'IDTP/TP':>8s}  " + "  ".join(f"{k:>11s}" for k in KINDS))
    for case in args.cases:
        runs = []
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **small))
            detections = detect_series(series.image, series.voxel_size_um, model=model).drop(columns=["track_id"])
            runs.append((series, detections, estimate_motion(series.image, series.voxel_size_um)))
        for gate in args.gates:
            total = Counter()
            for series, detections, motion in runs:
                linked = link_detections(detections, series.voxel_size_um, motion=motion, gate_um=gate)
                total += identity_errors(linked, series.truth, series.voxel_size_um)
            ratio = total["idtp"] / total["tp"] if total["tp"] else 0.0
            label = gate if isinstance(gate, str) else f"{gate:.2f}"
            print(f"{case:12s} {label:>5s} {ratio:8.3f}  " + "  ".join(f"{total[k]:11d}" for k in KINDS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
