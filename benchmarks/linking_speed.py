"""Linking's time alone: ``link_detections`` on the detections of one series, as ``detect`` links them.

On a GPU, linking runs on the CPU and was the largest share of end-to-end detection (the sixth
lease: 0.10 s of 0.40 s on the H200's host for a 16x series); this times it apart from the rest, on
the detections ``detect_series`` hands it (captured from the call), with linking's local motion
on the GPU (as ``detect`` links on CUDA), on the CPU in the process's kept threads (as on a CPU),
in threads started for each call (as before the pool was kept) and on one thread.

    python benchmarks/linking_speed.py                     # the 16x default series, detected on the CPU
    python benchmarks/linking_speed.py --device cuda --repeat-xy 4
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--case", default="default")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat-xy", type=int, default=4, help="tile the series N x N times in y and x")
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each (best and median are printed)")
    args = parser.parse_args(argv)

    import logging
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import napari_spine_tracker.core.detect as detect
    import napari_spine_tracker.core.link as link
    from napari_spine_tracker.core.devices import usable_cores
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    model = load_model(args.model, device=args.device)
    series = synthesize_series(SynthConfig.preset(args.case, seed=args.seed))
    image = np.tile(series.image, (1, 1, args.repeat_xy, args.repeat_xy))
    calls = []

    def captured(detections, voxel_size_um, **kwargs):  # what detect_series links
        calls.append((detections.copy(), voxel_size_um, {k: v for k, v in kwargs.items() if k != "should_stop"}))
        return linked(detections, voxel_size_um, **kwargs)

    linked, detect.link_detections = detect.link_detections, captured
    try:
        detect.detect_series(image, series.voxel_size_um, model=model)
    finally:
        detect.link_detections = linked
    (detections, voxel, kwargs), = calls
    print(f"{args.case} seed {args.seed}: {image.shape} voxels, {len(detections)} detections to link "
          f"(detected on {args.device}); {usable_cores()} usable cores")
    kept = link.thread_pool
    one = ThreadPoolExecutor(1)
    gpu = kwargs.pop("device", None)
    # (label, device, the pool linking's local motion runs on)
    variants = [("local motion on the CPU in threads (as shipped)", None, kept),
                ("the same, a pool of threads started for each call (before)",
                 None, lambda: ThreadPoolExecutor(usable_cores())),
                ("one thread", None, lambda: one)]
    if gpu is not None and gpu.type == "cuda":  # as detect links on a GPU
        variants[0] = ("local motion on the CPU in threads", None, kept)
        variants.insert(0, ("local motion's mean shifts on the GPU (as shipped on CUDA)", gpu, kept))
    for label, device, pool in variants:
        link.thread_pool = pool
        times = []
        try:
            link.link_detections(detections, voxel, device=device, **kwargs)  # a first run: kernels, imports
            for _ in range(args.runs):
                start = time.perf_counter()
                table = link.link_detections(detections, voxel, device=device, **kwargs)
                times.append(time.perf_counter() - start)
        finally:
            link.thread_pool = kept
        print(f"link_detections, {label}: best {min(times):.4f} s, median {np.median(times):.4f} s; "
              f"{table['track_id'].nunique()} tracks", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
