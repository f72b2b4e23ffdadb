"""Test-time augmentation on the validation seeds: F1 / IDF1 per peak threshold with 1, 2 and 4
mirror views, to see whether the threshold the checkpoint stores (chosen with one view) also
serves the averaged heatmap. The test series: ``compare.py --views 4``.

    python benchmarks/views.py                       # the shipped model
    python benchmarks/views.py --model runs/m.pt --views 1 4
    python benchmarks/views.py --views 1 --nms-radius 0.5 0.2 0.2   # another peak suppression window
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--views", nargs="+", type=int, default=[1, 2, 4], choices=[1, 2, 4])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.3, 0.35, 0.4, 0.45, 0.5])
    parser.add_argument("--nms-radius", nargs=3, type=float, metavar=("Z", "Y", "X"),
                        help="peak suppression half-width in µm (default: the model's)")
    args = parser.parse_args(argv)

    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.core.train import SYNTHETIC_VALIDATION, VALIDATION_SHAPE, validate

    model = load_model(args.model, device="cpu")
    if args.nms_radius:
        model.decode["nms_radius_um"] = list(args.nms_radius)
    cases = []
    for preset, seed in SYNTHETIC_VALIDATION:
        series = synthesize_series(SynthConfig.preset(preset, seed=seed, **VALIDATION_SHAPE))
        cases.append((f"{preset}-{seed}", series.image, series.voxel_size_um, series.truth, None))
    print(f"model {args.model} (stored threshold {model.decode['threshold']}, peak suppression "
          f"{model.decode['nms_radius_um']} µm); validation cases "
          f"{', '.join(name for name, *_ in cases)}; mean F1 / IDF1 over the cases, linking as stored")
    print("views  " + "  ".join(f"thr {t:<9.2f}" for t in args.thresholds))
    use_displacement = model.decode.get("use_displacement", True)
    for views in args.views:
        cells = []
        for threshold in args.thresholds:
            rows = validate(model, cases, thresholds=(threshold,), views=views, linking=(use_displacement,))["cases"]
            f1 = sum(r["f1"] for r in rows) / len(rows)
            idf1 = sum(r["idf1"] for r in rows) / len(rows)
            cells.append(f"{f1:.3f} / {idf1:.3f}")
        print(f"{views:<6d} " + "  ".join(f"{c:<13s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
