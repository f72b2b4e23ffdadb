"""Spine dynamics from our detections beside the same figures from the generator's truth.

For each synthetic test series (presets x seeds 1000-1002, 6 sessions of 32 x 256 x 256) the
shipped model detects and tracks the spines, and ``core.dynamics.compute_dynamics`` runs on the
detections and on ``truth``; the truth's figures equal the generator's own record of gains and
losses (``tests/test_dynamics.py``), so the difference is what detection and tracking errors do
to the biology a user would report.

    python benchmarks/dynamics.py
    python benchmarks/dynamics.py --cases default --seeds 1000 --model runs/stage2.pt
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd


def summarize(table: pd.DataFrame, n_sessions: int) -> dict:
    """The figures a chronic-imaging paper reports, for one series."""
    from napari_spine_tracker.core.dynamics import compute_dynamics

    sessions = compute_dynamics(table, n_sessions=n_sessions).sessions
    later = sessions[sessions["t"] > 0]
    return {
        "spines/session": sessions["n_present"].mean(),
        "gained/session": later["gained"].mean(),
        "lost/session": later["lost"].mean(),
        "turnover": later["turnover"].mean(),
        "survival_last": sessions["survival"].iloc[-1],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device=args.device)
    rows = []
    for case in args.cases:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed))
            n_sessions = series.image.shape[0]
            detected = detect_series(series.image, series.voxel_size_um, model=model)
            for source, table in (("truth", series.truth), ("detected", detected)):
                rows.append({"case": case, "seed": seed, "source": source, **summarize(table, n_sessions)})
            print(f"{case} {seed}: " + "  ".join(
                f"{k} {rows[-2][k]:.2f}/{rows[-1][k]:.2f}" for k in list(rows[-1])[3:]), flush=True)

    frame = pd.DataFrame(rows)
    figures = list(frame.columns[3:])
    means = frame.groupby(["case", "source"], sort=False)[figures].mean()
    print("\nMeans over seeds", ", ".join(map(str, args.seeds)), "(truth / detected):\n")
    print("| case | " + " | ".join(figures) + " |")
    print("|---" * (len(figures) + 1) + "|")
    for case in args.cases:
        truth, detected = means.loc[(case, "truth")], means.loc[(case, "detected")]
        cells = [f"{truth[f]:.2f} / {detected[f]:.2f}" if np.isfinite(detected[f]) else f"{truth[f]:.2f} / n/a"
                 for f in figures]
        print(f"| {case} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
