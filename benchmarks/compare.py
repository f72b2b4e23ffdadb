"""Side-by-side comparison of spine detection + tracking methods on synthetic validation series.

    python benchmarks/compare.py                                   # both methods, all cases, 3 seeds
    python benchmarks/compare.py --methods trackpy --seeds 1000 1001 --cases default crowded
    python benchmarks/compare.py --quick                           # small series, one seed
    python benchmarks/compare.py --tune-peer                       # the trackpy parameter search
    python benchmarks/compare.py --paired new.json old.json        # two --json runs, series by series

Methods come from ``napari_spine_tracker.core.bench.METHODS`` (the same registry as the ``bench``
command). See benchmarks/README.md for what is measured and the latest figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from napari_spine_tracker.core.bench import (
    CASES,
    METHODS,
    QUICK_OVERRIDES,
    VALIDATION_SEEDS,
    format_table,
    run_cases,
)

#: seeds of the series the peer is tuned on (never validation seeds, which are >= 1000)
TUNING_SEEDS = (0, 1)


def tune_peer(cases, seeds, quick: bool) -> pd.DataFrame:
    """Grid search of the trackpy peer on tuning seeds: locate parameters and the relative mass
    threshold for detection F1, then the linking search range and memory for IDF1.

    Returns every configuration's mean scores over the tuning series (one row each).
    """
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.peer import link_spots, locate_spots
    from napari_spine_tracker.core.register import estimate_drift
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    changes = QUICK_OVERRIDES if quick else {}
    series = [synthesize_series(SynthConfig.preset(c, seed=s, **changes)) for c in cases for s in seeds]
    rows = []
    # 1. detection: locate once per (diameter, separation, percentile) with no mass filter, then
    #    sweep the relative mass threshold over the spots found (the same filter locate applies)
    best = (-1.0, None)
    for (dz, dxy), sep_fraction, percentile in itertools.product(
            [(1.5, 0.9), (2.0, 0.9), (2.5, 0.9), (2.0, 1.1)], [1.0], [95, 97]):
        start = time.perf_counter()
        diameter = (dz, dxy, dxy)
        separation = tuple(d * sep_fraction for d in diameter)
        spots = [locate_spots(s.image, s.voxel_size_um, diameter_um=diameter, separation_um=separation,
                              percentile=percentile, min_relative_mass=0.0) for s in series]
        for k in (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04):
            f1 = []
            for found, s in zip(spots, series, strict=True):
                kept = found[found["relative_mass"] >= k]
                f1.append(evaluate_tracks(kept.assign(track_id=np.arange(1, len(kept) + 1)), s.truth,
                                          s.voxel_size_um)["f1"])
            row = {"stage": "locate", "diameter_um": diameter, "separation_um": separation,
                   "percentile": percentile, "min_relative_mass": k, "f1": float(np.mean(f1)),
                   "f1_per_series": np.round(f1, 3).tolist()}
            rows.append(row)
            best = max(best, (row["f1"], row), key=lambda b: b[0])
        logging.info("locate %s %s %s: %.1f s", diameter, sep_fraction, percentile, time.perf_counter() - start)
    chosen = best[1]
    # 2. linking, with the chosen detection parameters
    drifts = [estimate_drift(s.image, s.voxel_size_um) for s in series]
    spots = [locate_spots(s.image, s.voxel_size_um, diameter_um=chosen["diameter_um"],
                          separation_um=chosen["separation_um"], percentile=chosen["percentile"],
                          min_relative_mass=chosen["min_relative_mass"]) for s in series]
    for search_range_um, memory in itertools.product((0.8, 1.0, 1.5, 2.0), (0, 1, 2)):
        scores = [evaluate_tracks(link_spots(found, s.voxel_size_um, drift_vox=drift,
                                             search_range_um=search_range_um, memory=memory),
                                  s.truth, s.voxel_size_um)
                  for found, drift, s in zip(spots, drifts, series, strict=True)]
        rows.append({"stage": "link", **{k: chosen[k] for k in ("diameter_um", "separation_um", "percentile",
                                                                "min_relative_mass")},
                     "search_range_um": search_range_um, "memory": memory,
                     "f1": float(np.mean([x["f1"] for x in scores])),
                     "idf1": float(np.mean([x["idf1"] for x in scores])),
                     "association_accuracy": float(np.mean([x["association_accuracy"] for x in scores]))})
    return pd.DataFrame(rows)


def measure_registration(cases, seeds, quick: bool) -> pd.DataFrame:
    """Registration error and linking of perfect detections, per case (means over seeds).

    Step errors compare each estimated consecutive step (µm) with the median displacement of the
    true spines present in both sessions and with the engine's rigid drift; ``link_idf1`` links the
    true positions (ids removed) with the estimated drift alone, with and without the local
    correction.
    """
    from napari_spine_tracker.core.link import link_detections
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.register import estimate_drift
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    changes = QUICK_OVERRIDES if quick else {}
    rows = []
    for case in cases:
        per_seed = []
        for seed in seeds:
            s = synthesize_series(SynthConfig.preset(case, seed=seed, **changes))
            voxel = np.asarray(s.voxel_size_um)
            start = time.perf_counter()
            drift = estimate_drift(s.image, voxel)
            seconds = time.perf_counter() - start
            steps = np.diff(drift * voxel, axis=0)
            rigid = np.diff(s.drift_um, axis=0)
            median, residual = [], []
            for t in range(1, s.image.shape[0]):
                a = s.truth[s.truth.t == t - 1].set_index("track_id")
                b = s.truth[s.truth.t == t].set_index("track_id")
                common = a.index.intersection(b.index)
                moved = (b.loc[common, ["z", "y", "x"]].to_numpy() - a.loc[common, ["z", "y", "x"]].to_numpy()) * voxel
                median.append(np.median(moved, axis=0))
                residual.append(np.linalg.norm(moved - steps[t - 1], axis=1))
            residual = np.concatenate(residual)
            detections = s.truth.drop(columns=["track_id"]).sample(frac=1.0, random_state=0)
            per_seed.append({
                "step_vs_spines_mean": np.linalg.norm(steps - np.array(median), axis=1).mean(),
                "step_vs_spines_max": np.linalg.norm(steps - np.array(median), axis=1).max(),
                "step_vs_rigid_mean": np.linalg.norm(steps - rigid, axis=1).mean(),
                "cumulative_vs_rigid_mean": np.linalg.norm(drift * voxel - (s.drift_um - s.drift_um[0]),
                                                           axis=1)[1:].mean(),
                "spine_residual_p50": np.percentile(residual, 50),
                "spine_residual_p90": np.percentile(residual, 90),
                "seconds": seconds,
                "link_idf1": evaluate_tracks(link_detections(detections, voxel, drift_vox=drift), s.truth,
                                             voxel)["idf1"],
                "link_idf1_rigid_only": evaluate_tracks(
                    link_detections(detections, voxel, drift_vox=drift, local_scale_um=None), s.truth, voxel)["idf1"],
            })
        rows.append({"case": case, **pd.DataFrame(per_seed).mean().round(3).to_dict()})
    return pd.DataFrame(rows)


def paired_differences(new: list[dict], old: list[dict], metrics=("f1", "idf1")) -> str:
    """Two runs (``--json`` records) compared series by series, per method present in both: the
    mean difference of each metric, its standard error, and on how many series the new run scored
    higher. Differences within about two standard errors are noise these series cannot resolve."""
    def keyed(rows):
        return {(r["method"], r["case"], r["seed"]): r for r in rows}

    a, b = keyed(new), keyed(old)
    common = sorted(set(a) & set(b))
    if not common:
        return "no series in common (match on method, case and seed)"
    lines = []
    for method in sorted({k[0] for k in common}):
        keys = [k for k in common if k[0] == method]
        for metric in metrics:
            d = np.array([a[k][metric] - b[k][metric] for k in keys])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            lines.append(f"{method:9s} {metric:5s} new - old: mean {d.mean():+.4f}, standard error {se:.4f}, "
                         f"higher on {int((d > 0).sum())} and lower on {int((d < 0).sum())} of {len(d)} series")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="synthetic presets")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help=f"validation seeds (default {' '.join(map(str, VALIDATION_SEEDS))}; >= 1000)")
    parser.add_argument("--quick", action="store_true", help=f"small series {QUICK_OVERRIDES}")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--views", type=int, choices=[1, 2, 4], default=1,
                        help="SpineNet's test-time augmentation (mirror images averaged per tile)")
    parser.add_argument("--tol-um", type=float, default=1.0)
    parser.add_argument("--no-isolate", action="store_true",
                        help="run methods in this process (no per-method peak memory)")
    parser.add_argument("--json", help="also write every run's figures to this JSON file")
    parser.add_argument("--tune-peer", action="store_true",
                        help=f"grid-search trackpy's parameters on tuning seeds {TUNING_SEEDS} instead")
    parser.add_argument("--registration", action="store_true",
                        help="instead: registration error (µm) and linking of perfect detections")
    parser.add_argument("--paired", nargs=2, metavar=("NEW.json", "OLD.json"),
                        help="instead: compare two --json runs series by series (mean difference, standard error)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.paired:
        new, old = (json.loads(Path(path).read_text()) for path in args.paired)
        print(paired_differences(new, old))
        return 0
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    if args.tune_peer:
        seeds = args.seeds or list(TUNING_SEEDS)
        if any(s >= 1000 for s in seeds):
            parser.error("tune on tuning seeds (< 1000), never on validation seeds")
        table = tune_peer(args.cases, seeds, args.quick)
        with pd.option_context("display.width", 200, "display.max_rows", 500):
            print(table.sort_values(["stage", "f1", "idf1"], ascending=False).to_string(index=False))
        if args.json:
            table.to_json(args.json, orient="records", indent=1)
        return 0

    seeds = args.seeds or (list(VALIDATION_SEEDS[:1]) if args.quick else list(VALIDATION_SEEDS))
    if args.registration:
        with pd.option_context("display.width", 200):
            print(measure_registration(args.cases, seeds, args.quick).to_string(index=False))
        return 0
    if any(s < 1000 for s in seeds):
        print("warning: seeds < 1000 are training / tuning seeds, not validation seeds", file=sys.stderr)
    results = run_cases(args.methods, args.cases, seeds, quick=args.quick, device=args.device, model=args.model,
                        tol_um=args.tol_um, isolate=not args.no_isolate, views=args.views)
    print(f"seeds {seeds}, cases {args.cases}, tolerance {args.tol_um} µm, means over seeds")
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_row() | {"scores": r.scores} for r in results], f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
