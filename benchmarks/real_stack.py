"""What the shipped model finds on real tissue: the bundled DeepD3 stack (one session, no labels).

Writes one figure: the stack's max projection with the detections on top (colour = score) and the
suggestions of missed spines (cyan squares; ``detect_series(return_suggestions=True)``), and a side
view (x-z) of the same; prints both.

    python benchmarks/real_stack.py [--model spinenet-synth] [--out docs/real_predictions.png]
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np

REAL_VOXEL_UM = (0.5, 0.094, 0.094)  # the file's metadata does not carry it (data/README.md)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--threshold", type=float, help="default: the model's")
    parser.add_argument("--out", default="docs/real_predictions.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.io.series import load_series

    path = resources.files("napari_spine_tracker") / "data" / "deepd3_crop_dendrite.tif"
    series = load_series(path, voxel_size_um=REAL_VOXEL_UM)
    image = np.asarray(series.data[0], dtype=np.float32)
    model = load_model(args.model, device="cpu")
    spines, suggestions = detect_series(series, model=model, threshold=args.threshold, return_suggestions=True)
    print(f"{len(spines)} spines detected (threshold {spines.attrs['threshold']:.2f})")
    print(spines[["z", "y", "x", "score", "head_radius_um"]].round(2).to_string(index=False))
    print(f"{len(suggestions)} suggestions of missed spines")
    print(suggestions[["z", "y", "x", "score"]].round(2).to_string(index=False))

    low, high = np.percentile(image, [1, 99.8])
    ratios = [image.shape[1], image.shape[0] * REAL_VOXEL_UM[0] / REAL_VOXEL_UM[2]]
    fig, (top, side) = plt.subplots(2, 1, figsize=(11, 11), dpi=110, layout="constrained",
                                    gridspec_kw={"height_ratios": ratios})
    top.imshow(image.max(0), cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    colours = plt.get_cmap("autumn")(spines["score"].to_numpy())
    top.scatter(spines["x"], spines["y"], s=110, facecolors="none", edgecolors=colours, linewidths=1.4)
    top.scatter(suggestions["x"], suggestions["y"], s=110, marker="s", facecolors="none", edgecolors="cyan",
                linewidths=1.0)
    top.set_title(f"DeepD3 real stack, max projection over z: {len(spines)} detections of {args.model} "
                  f"(ring colour = score), {len(suggestions)} suggestions (cyan squares)")
    top.set_axis_off()
    mappable = plt.cm.ScalarMappable(cmap="autumn", norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=[top, side], fraction=0.02, pad=0.01, label="score")
    side.imshow(image.max(1), cmap="gray", vmin=low, vmax=high, aspect=0.5 / 0.094, interpolation="nearest")
    side.scatter(spines["x"], spines["z"], s=50, facecolors="none", edgecolors=colours, linewidths=1.2)
    side.scatter(suggestions["x"], suggestions["z"], s=50, marker="s", facecolors="none", edgecolors="cyan",
                 linewidths=0.8)
    side.set_title("side view (max over y; z stretched to scale)")
    side.set_axis_off()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
