"""How many true spine heads a reader of the image could tell apart at all, and what the model
finds of each kind, on the test series.

A head *has a bump of its own* when the noise-free image (the expected photons before the
detector, ``synthesize_series(..., noise_free=True)``) has a local maximum (3 x 3 x 3 voxels,
above 1.2 x the session's median) that lies nearer to it than to any other true head, within
1.5 µm in z and 0.5 µm in y, x (the blurred maximum of a head on a neck pointing along z sits up
to a micrometre off its centre, towards the shaft). A head without one shows no intensity bump
of its own: it sits on the flank of a brighter neighbour (mostly another head stacked within the
PSF's 2.5 µm in z), and only the shape of the neighbour's bump gives it away. The report gives,
per case, the share of such heads in the truth, the model's recall on them and on the rest, the
share of all misses they make up, and the F1 the model would score if the missed ones were left
out of the truth (a what-if, not the benchmark's score).

    python benchmarks/resolvable.py
    python benchmarks/resolvable.py --model runs/m.pt --cases crowded --seeds 1000
"""

from __future__ import annotations

import argparse
import sys

#: a local maximum this close to a head's centre (z, y, x µm, an ellipsoid), and nearer to it than
#: to any other head, is that head's bump
OWN_BUMP_UM = (1.5, 0.5, 0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    args = parser.parse_args(argv)

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import match_points
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device="cpu")
    print(f"model {args.model}, seeds {args.seeds}; a head's own bump: a local maximum of the noise-free "
          f"image nearest to it, within {OWN_BUMP_UM[0]} um in z and {OWN_BUMP_UM[1]} um in y, x; matching "
          f"within 1 um")
    for case in args.cases:
        tp = fp = 0
        has_bump, found = [], []
        for seed in args.seeds:
            config = SynthConfig.preset(case, seed=seed)
            series = synthesize_series(config)
            clean = synthesize_series(config, noise_free=True)
            voxel = np.asarray(series.voxel_size_um)
            table = detect_series(series.image, series.voxel_size_um, model=model)
            for t in range(series.image.shape[0]):
                truth_um = series.truth.loc[series.truth["t"] == t, ["z", "y", "x"]].to_numpy() * voxel
                pred_um = table.loc[table["t"] == t, ["z", "y", "x"]].to_numpy() * voxel
                _, matched = match_points(pred_um, truth_um, 1.0)
                hit = np.zeros(len(truth_um), bool)
                hit[matched] = True
                tp += len(matched)
                fp += len(pred_um) - len(matched)
                has_bump.append(own_bumps(clean.image[t], voxel, truth_um))
                found.append(hit)
        has_bump, found = np.concatenate(has_bump), np.concatenate(found)
        fn = int(np.sum(~found))
        lone = ~has_bump
        missed_lone = int(np.sum(lone & ~found))
        print(f"\n{case}: {len(found)} true spine-sessions; F1 {2 * tp / (2 * tp + fp + fn):.3f} "
              f"(TP {tp}, FP {fp}, FN {fn})")
        print(f"  without a bump of their own: {lone.sum()} ({lone.mean():.1%}), recall {found[lone].mean():.2f}; "
              f"with one: recall {found[has_bump].mean():.3f}")
        print(f"  misses without a bump of their own: {missed_lone} of {fn} ({missed_lone / max(fn, 1):.0%}); "
              f"F1 with those left out of the truth {2 * tp / (2 * tp + fp + fn - missed_lone):.3f}")
    return 0


def own_bumps(image, voxel_um, heads_um):
    """Whether each head (N, 3) µm has a local maximum of ``image`` (Z, Y, X) of its own: one
    nearer to it than to any other head, within :data:`OWN_BUMP_UM`."""
    import numpy as np
    from scipy import ndimage
    from scipy.spatial import cKDTree

    own = np.zeros(len(heads_um), bool)
    peaks = (image == ndimage.maximum_filter(image, size=3)) & (image > 1.2 * np.median(image))
    if not len(heads_um) or not peaks.any():
        return own
    scale = np.asarray(OWN_BUMP_UM)
    distance, nearest = cKDTree(np.asarray(heads_um) / scale).query(np.argwhere(peaks) * voxel_um / scale)
    own[nearest[distance <= 1.0]] = True
    return own

if __name__ == "__main__":
    sys.exit(main())
