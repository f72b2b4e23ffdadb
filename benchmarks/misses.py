"""What the model misses, and what it finds that is not a spine, on the test series.

Misses: recall by quartile of a spine's local contrast-to-noise, head radius, neck length, how
much it points along z, and the distance in y, x to its nearest true neighbour in the same
session (close pairs that come out as one detection: how many misses had a neighbour within
0.6 µm that was found). False detections: how many lie within 1 µm of a distractor of the
synthetic tissue (an axon's bouton or a shaft varicosity), or 1-2 µm from a true spine.

Contrast-to-noise: the smoothed image at the true head centre above the session's median,
over a robust noise estimate (median absolute deviation of the darker 60 % of voxels).

    python benchmarks/misses.py
    python benchmarks/misses.py --model runs/m.pt --cases low_snr crowded
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["low_snr", "crowded", "default"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--views", type=int, default=1, choices=[1, 2, 4])
    args = parser.parse_args(argv)

    import numpy as np
    import pandas as pd
    from scipy import ndimage
    from scipy.spatial import cKDTree

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import match_points
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device="cpu")
    rows, false_rows = [], []
    for case in args.cases:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed))
            voxel = np.asarray(series.voxel_size_um)
            table = detect_series(series.image, series.voxel_size_um, model=model, views=args.views)
            for t in range(series.image.shape[0]):
                image = series.image[t].astype(np.float32)
                smooth = ndimage.gaussian_filter(image, (0.5, 1.5, 1.5))
                background = np.median(image)
                dark = image[image < np.percentile(image, 60)]
                noise = 1.4826 * np.median(np.abs(dark - background))
                truth = series.truth[series.truth["t"] == t]
                pred = table[table["t"] == t]
                pred_um = pred[["z", "y", "x"]].to_numpy() * voxel
                truth_um = truth[["z", "y", "x"]].to_numpy() * voxel
                matched, found = match_points(pred_um, truth_um, 1.0)
                hit = np.zeros(len(truth), bool)
                hit[found] = True
                truth_tree = cKDTree(truth_um) if len(truth) else None
                # nearest true neighbour in the same session, and whether it was found
                if len(truth) > 1:
                    _, near = truth_tree.query(truth_um, k=2)
                    near = near[:, 1]
                    neighbour_xy = np.hypot(*(truth_um[near, 1:] - truth_um[:, 1:]).T)
                    neighbour_hit = hit[near]
                else:
                    neighbour_xy, neighbour_hit = np.full(len(truth), np.inf), np.zeros(len(truth), bool)
                # false detections: near a distractor (and which kind), or near a true spine
                false = np.setdiff1d(np.arange(len(pred)), matched)
                distractors = series.distractors[series.distractors["t"] == t]
                to_distractor, kind = np.full(len(false), np.inf), np.full(len(false), "", dtype=object)
                if len(distractors) and len(false):
                    tree = cKDTree(distractors[["z", "y", "x"]].to_numpy() * voxel)
                    to_distractor, which = tree.query(pred_um[false])
                    kind = distractors["kind"].to_numpy()[which]
                to_spine = truth_tree.query(pred_um[false])[0] if len(truth) else np.full(len(false), np.inf)
                false_rows.append(pd.DataFrame({"case": case, "to_distractor": to_distractor, "kind": kind,
                                                "to_spine": to_spine}))
                centre = np.clip(np.round(truth[["z", "y", "x"]].to_numpy()).astype(int), 0,
                                 np.array(image.shape) - 1)
                cnr = (smooth[tuple(centre.T)] - background) / noise
                rows.append(pd.DataFrame({"case": case, "hit": hit, "contrast/noise": cnr,
                                          "head radius um": truth["head_radius_um"].to_numpy(),
                                          "neck um": truth["neck_length_um"].to_numpy(),
                                          "|pointing z|": truth["pointing_z"].abs().to_numpy(),
                                          "neighbour xy um": neighbour_xy, "neighbour hit": neighbour_hit}))
    df = pd.concat(rows, ignore_index=True)
    false_df = pd.concat(false_rows, ignore_index=True)
    print(f"model {args.model}, views {args.views}, seeds {args.seeds}; recall per quartile (range: recall)")
    for case, group in df.groupby("case", sort=False):
        print(f"\n{case}: {len(group)} true spine-sessions, recall {group['hit'].mean():.3f}")
        for column in ("contrast/noise", "head radius um", "neck um", "|pointing z|", "neighbour xy um"):
            bins = pd.qcut(group[column], 4, duplicates="drop")
            recall = group.groupby(bins, observed=True)["hit"].mean()
            print(f"  {column:15s}", "  ".join(f"{b.left:.2f}-{b.right:.2f}: {r:.2f}" for b, r in recall.items()))
        # the same on fixed contrast steps: how many spines are faint in absolute terms, and found
        steps = pd.cut(group["contrast/noise"], [0, 3, 5, 8, np.inf], right=False)
        counts = group.groupby(steps, observed=False)["hit"].agg(["size", "mean"])
        print("  contrast/noise  " + "  ".join(
            f"{b.left:g}-{b.right:g}: {int(n)} ({n / len(group):.0%}) found {r:.2f}" for b, (n, r) in
            zip(counts.index, counts.itertuples(index=False)) if n))
        missed = group[~group["hit"]]
        close = group["neighbour xy um"] < 0.6
        merged = int(((missed["neighbour xy um"] < 0.6) & missed["neighbour hit"]).sum())
        print(f"  neighbour within 0.6 um in y, x: {int(close.sum())} spines, "
              f"found {group.loc[close, 'hit'].mean():.2f}; {merged} of {len(missed)} misses had such a "
              "neighbour, which was found (a close pair seen as one)")
        false = false_df[false_df["case"] == case]
        near = false["to_distractor"] < 1.0
        kinds = ", ".join(f"{k} {n}" for k, n in false.loc[near, "kind"].value_counts().items()) or "none"
        print(f"  false detections {len(false)}: within 1 um of a distractor {int(near.sum())} ({kinds}); "
              f"else 1-2 um from a true spine {int((~near & (false['to_spine'] < 2.0)).sum())}; "
              f"other {int((~near & (false['to_spine'] >= 2.0)).sum())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
