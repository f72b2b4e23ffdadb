"""Sessions turned in the imaging plane (the animal mounted anew): detection and tracking with
and without the rotation search in registration, beside the trackpy peer, on the ``rotated``
preset (a 100 µm field, 6 x 32 x 512 x 512 at 0.2 µm), for several largest turns.

For each series: SpineNet with ``max_rotation_deg`` 0 (translation only) and 3 (the default),
and trackpy linking through the same two registrations, with the seconds of each run; and how far
each registration maps the true spine heads of one session from where they are in the next
(median over heads, mean over session pairs, µm). That error, not the angle, is the fair measure:
the engine also deforms each session (0.2 µm RMS), and the turn that fits the deformed field best
is not the engine's turn parameter (without deformation the turns are found within 0.1 degrees).

    python benchmarks/rotation.py                           # turns up to 0, 1, 2, 3 degrees, seeds 2000-2001
    python benchmarks/rotation.py --turns 2 --seeds 2000 --no-peer
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--turns", nargs="+", type=float, default=[0.0, 1.0, 2.0, 3.0],
                        help="the preset's largest turn per session, degrees")
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001])
    parser.add_argument("--no-peer", action="store_true", help="leave trackpy out")
    args = parser.parse_args(argv)

    import numpy as np

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.peer import trackpy_detect_track
    from napari_spine_tracker.core.register import estimate_motion
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device="cpu")
    methods = [("spinenet", 0.0), ("spinenet", 3.0)] + ([] if args.no_peer else [("trackpy", 0.0), ("trackpy", 3.0)])
    print(f"rotated preset (6 x 32 x 512 x 512, 0.2 µm voxels); model {args.model}; CPU; F1 / IDF1 (seconds)")
    names = "  ".join(f"{m} rot {r:.0f}".ljust(22) for m, r in methods)
    print(f"{'turn':>4s} {'seed':>5s} {'reg. error µm':>15s}  {names}")
    print(f"{'':>4s} {'':>5s} {'rot 0':>7s} {'rot 3':>7s}")
    means: dict[tuple[float, str, float], list] = {}
    for turn in args.turns:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset("rotated", seed=seed, rotation_deg=turn))
            errors = [_registration_error_um(series, estimate_motion(series.image, series.voxel_size_um,
                                                                       max_rotation_deg=r)) for r in (0.0, 3.0)]
            cells = []
            for method, max_turn in methods:
                start = time.perf_counter()
                if method == "spinenet":
                    table = detect_series(series.image, series.voxel_size_um, model=model, device="cpu",
                                          max_rotation_deg=max_turn)
                else:
                    table = trackpy_detect_track(series.image, series.voxel_size_um, max_rotation_deg=max_turn)
                seconds = time.perf_counter() - start
                s = evaluate_tracks(table, series.truth, series.voxel_size_um)
                means.setdefault((turn, method, max_turn), []).append((s["f1"], s["idf1"]))
                cells.append(f"{s['f1']:.3f} / {s['idf1']:.3f} ({seconds:4.1f} s)".ljust(22))
            print(f"{turn:4.1f} {seed:5d} {errors[0]:7.2f} {errors[1]:7.2f}  " + "  ".join(cells), flush=True)
    print("means over seeds")
    for turn in args.turns:
        cells = []
        for method, max_turn in methods:
            f1, idf1 = np.mean(means[(turn, method, max_turn)], axis=0)
            cells.append(f"{f1:.3f} / {idf1:.3f}".ljust(22))
        print(f"{turn:4.1f} {'mean':>5s} {'':15s}  " + "  ".join(cells))
    return 0


def _registration_error_um(series, motion) -> float:
    """Mean over consecutive sessions of the median distance (µm) between each true head mapped
    from one session into the next by ``motion`` and where it is there."""
    import numpy as np

    voxel = np.asarray(series.voxel_size_um)
    truth = series.truth.set_index("spine_id")
    errors = []
    for t in range(1, series.image.shape[0]):
        before, after = truth[truth.t == t - 1], truth[truth.t == t]
        common = before.index.intersection(after.index)
        moved = motion.between(before.loc[common, ["z", "y", "x"]].to_numpy(), t - 1, t)
        there = after.loc[common, ["z", "y", "x"]].to_numpy()
        errors.append(np.median(np.linalg.norm((moved - there) * voxel, axis=1)))
    return float(np.mean(errors))


if __name__ == "__main__":
    sys.exit(main())
