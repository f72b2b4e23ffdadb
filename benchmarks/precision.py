"""What reduced precision does to accuracy: detection with fp16 or bf16 autocast, emulated on the CPU.

On a GPU, autocast runs the network in 16-bit floats; this script runs the same autocast on the
CPU (slowly: minutes per series, the CPU has no fast 16-bit convolutions) so that the effect on
F1 and IDF1 can be measured without a GPU, against float32 on the same series. It chose fp16 for
detection on CUDA (core/devices.py: inference_autocast).

    python benchmarks/precision.py --precision float16 --cases large_drift
    python benchmarks/precision.py --precision bfloat16 --cases default --seeds 1000
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--cases", nargs="+", default=["large_drift"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1000, 1001, 1002])
    parser.add_argument("--model", default="spinenet-synth")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_spine_tracker.core import infer
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    if args.precision != "float32":
        dtype = getattr(torch, args.precision)
        infer.inference_autocast = lambda device, precision=None: torch.autocast("cpu", dtype=dtype)
    else:
        infer.inference_autocast = lambda device, precision=None: contextlib.nullcontext()
    model = load_model(args.model, device="cpu")
    for case in args.cases:
        scores, start = [], time.perf_counter()
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed))
            table = detect_series(series.image, series.voxel_size_um, model=model)
            s = evaluate_tracks(table, series.truth, series.voxel_size_um)
            scores.append((s["f1"], s["idf1"]))
        per_seed = ", ".join(f"{f:.3f}/{i:.3f}" for f, i in scores)
        f1, idf1 = np.mean(scores, axis=0)
        print(f"{args.precision} {case}: F1 {f1:.3f} IDF1 {idf1:.3f} (per seed {per_seed}; "
              f"{(time.perf_counter() - start) / len(args.seeds):.0f} s per series)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
