"""The CUDA paths, checked on a real GPU (the test suite can only skip them without one).

1. A few training steps on the GPU: bf16 autocast, channels-last 3D, batches from worker
   processes through pinned memory.
2. The shipped model on a synthetic series, on the GPU (fp16 autocast) and on the CPU: the same
   spines (F1 of the GPU points against the CPU points within 0.5 µm), and GPU memory given back
   after the run.
   2b. The same on a series whose sessions are turned (resampled through their motion on the GPU).
   2c. Registration on the GPU (torch.fft) against the CPU (SciPy): time and agreement.
   2d. A drifting series, its sessions cut to their fields, on the GPU against the CPU.
   2e. The series held on the GPU (tiles cut there) against tiles read on the CPU and copied
       over, both on the GPU: the same spines, and the time of each on a 16x larger field; and
       the page-locked host memory the held series' copies left in PyTorch's cache.
3. Out-of-memory recovery: with this process limited to a small share of the GPU's memory, a
   series that does not fit in one batch of tiles is still detected (after retries with smaller
   batches and tiles), with the same result.

Exits non-zero when 1 or 2 fail, so a device session can stop early.

    python benchmarks/gpu_checks.py               # on a machine with a CUDA GPU
    python benchmarks/gpu_checks.py --device cpu  # rehearsal of the script itself
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--memory-fraction", type=float, default=0.01,
                        help="share of the GPU's memory allowed in the out-of-memory check")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_spine_tracker.core.batches import PatchOptions
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.core.train import TrainOptions, train_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cuda = args.device.startswith("cuda")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}")

    # 1. training steps
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        out = train_model(TrainOptions(out=Path(folder) / "m.pt", steps=6, size="tiny", batch_size=4, pool_size=4,
                                       val_every=6, workers=2, device=args.device,
                                       patch=PatchOptions(shape=(8, 32, 32), sessions=2),
                                       validation=(("tiny", 1000),), validation_shape={}))
        seconds = time.perf_counter() - start
        print(f"[1] training: 6 steps with 2 batch workers in {seconds:.1f} s, wrote {out.name}: ok")

    # 2. GPU and CPU give the same spines; memory is given back
    series = synthesize_series(SynthConfig.preset("default", seed=1000, sessions=3))
    voxel = series.voxel_size_um
    cpu_table = detect_series(series.image, voxel, model=load_model("spinenet-synth", device="cpu"))
    model = load_model("spinenet-synth", device=args.device)
    detect_series(series.image, voxel, model=model)  # warm-up
    start = time.perf_counter()
    table = detect_series(series.image, voxel, model=model)
    seconds = time.perf_counter() - start
    agreement = evaluate_tracks(table, cpu_table, voxel, tol_um=0.5)["f1"]
    print(f"[2] {args.device} vs cpu: {len(table)} vs {len(cpu_table)} detections, F1 {agreement:.3f} within 0.5 µm; "
          f"{series.image.size / seconds / 1e6:.1f} Mvoxel/s end to end on {series.image.shape}")
    if cuda:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() / 2**20
        cached = torch.cuda.memory_reserved() / 2**20
        weights = sum(p.numel() * p.element_size() for p in model.net.parameters()) / 2**20
        print(f"    after the run: {held:.1f} MiB allocated ({weights:.1f} MiB of weights), {cached:.1f} MiB cached")
    if agreement < 0.97:
        print("[2] FAILED: the GPU result differs from the CPU one")
        return 1

    # 2b. turned sessions (resampled through their motion, on the model's device): the same spines
    turned = synthesize_series(SynthConfig.preset("rotated", seed=1000, sessions=3, shape=(16, 320, 320)))
    cpu_turned = detect_series(turned.image, turned.voxel_size_um, model=load_model("spinenet-synth", device="cpu"))
    start = time.perf_counter()
    gpu_turned = detect_series(turned.image, turned.voxel_size_um, model=model)
    seconds = time.perf_counter() - start
    same = evaluate_tracks(gpu_turned, cpu_turned, turned.voxel_size_um, tol_um=0.5)["f1"]
    print(f"[2b] turned sessions ({np.round(turned.rotation_deg, 2)} degrees), {args.device} vs cpu: "
          f"{len(gpu_turned)} vs {len(cpu_turned)} detections, F1 {same:.3f} within 0.5 µm; "
          f"{turned.image.size / seconds / 1e6:.1f} Mvoxel/s end to end{'' if same >= 0.97 else '  FAILED'}")

    # 2c. registration on the GPU (torch.fft) against the CPU's (SciPy), on a 16x larger field
    from napari_spine_tracker.core.register import estimate_motion

    wide = np.tile(series.image, (1, 1, 4, 4))
    timings, motions = {}, {}
    for where in ("cpu", args.device):
        estimate_motion(wide[:2], voxel, device=where)  # warm-up (cuFFT plans)
        start = time.perf_counter()
        motions[where] = estimate_motion(wide, voxel, device=where)
        timings[where] = time.perf_counter() - start
    gap = float(np.abs(motions[args.device].drift_vox - motions["cpu"].drift_vox).max())
    print(f"[2c] registration of {wide.shape}: {timings['cpu']:.2f} s on the CPU, {timings[args.device]:.2f} s on "
          f"{args.device}; largest difference {gap:.1e} voxel{'' if gap < 1e-2 else '  FAILED'}")
    if model.device.type == "cuda":  # what keeping registration's cuFFT plans and cached memory saves
        plans = torch.backends.cuda.cufft_plan_cache[model.device.index or 0]
        again, count, plans_hold = {}, plans.size, 0
        for label in ("all kept", "memory given back", "memory and plans given back"):
            if label != "all kept":
                torch.cuda.empty_cache()
            if label == "memory and plans given back":
                free_before = torch.cuda.mem_get_info(model.device)[0]
                plans.clear()
                plans_hold = torch.cuda.mem_get_info(model.device)[0] - free_before
            torch.cuda.synchronize()
            start = time.perf_counter()
            estimate_motion(wide, voxel, device=args.device)
            torch.cuda.synchronize()
            again[label] = time.perf_counter() - start
        print("    registered again, " + "; ".join(f"{k}: {v:.3f} s" for k, v in again.items())
              + f" ({count} cuFFT plans, holding {plans_hold / 2**20:.1f} MiB of device memory)")

    # 2d. a drifting series: each session cut to its own field on the GPU (infer.session_cuts), as on the CPU
    drifting = synthesize_series(SynthConfig.preset("large_drift", seed=1000, sessions=4))
    cpu_drift = detect_series(drifting.image, drifting.voxel_size_um, model=load_model("spinenet-synth", device="cpu"))
    gpu_drift = detect_series(drifting.image, drifting.voxel_size_um, model=model)
    same = evaluate_tracks(gpu_drift, cpu_drift, drifting.voxel_size_um, tol_um=0.5)["f1"]
    print(f"[2d] drifting sessions cut to their fields, {args.device} vs cpu: {len(gpu_drift)} vs {len(cpu_drift)} "
          f"detections, F1 {same:.3f} within 0.5 µm{'' if same >= 0.97 else '  FAILED'}")

    # 2e. the series held on the GPU against tiles read on the CPU, on the wide field of 2c
    from napari_spine_tracker.core.infer import InferenceOptions

    runs = {}
    for resident in (True, False):
        options = InferenceOptions(resident=resident)
        detect_series(series.image[:2], voxel, model=model, options=options)  # warm-up
        start = time.perf_counter()
        runs[resident] = (detect_series(wide, voxel, model=model, options=options), time.perf_counter() - start)
    (held, held_s), (read, read_s) = runs[True], runs[False]
    same = evaluate_tracks(held, read, voxel, tol_um=0.5)["f1"]
    print(f"[2e] {wide.shape} on {args.device}, the series held there: {wide.size / held_s / 1e6:.0f} Mvoxel/s "
          f"end to end; tiles read on the CPU: {wide.size / read_s / 1e6:.0f} Mvoxel/s; {len(held)} vs {len(read)} "
          f"detections, F1 {same:.3f} within 0.5 µm{'' if same >= 0.99 else '  FAILED'}")
    if cuda and hasattr(torch.cuda, "host_memory_stats"):  # the held series crossed through page-locked buffers
        stats = torch.cuda.host_memory_stats()  # key names differ between torch versions
        cached = stats.get("reserved_bytes.current", stats.get("allocated_bytes.current", 0))
        print(f"    page-locked host memory in PyTorch's cache after the runs: {cached / 2**20:.0f} MiB in "
              f"{stats.get('num_host_alloc', '?')} blocks made in {stats.get('host_alloc_time.total', 0) / 1e3:.1f} ms "
              "(the staging's 4 x 8 MiB buffers, and the pinned batches of [1])")

    # 3. out-of-memory recovery
    if cuda:
        big = np.tile(series.image, (1, 1, 2, 2))
        reference = detect_series(big, voxel, model=model)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("napari_spine_tracker").addHandler(handler)
        try:
            limited = detect_series(big, voxel, model=model)
            retries = [r.getMessage() for r in records if "out of GPU memory" in r.getMessage()]
            same = evaluate_tracks(limited, reference, voxel, tol_um=0.5)["f1"]
            print(f"[3] limited to {args.memory_fraction:.0%} of GPU memory: {len(retries)} retries "
                  f"({'; '.join(retries[-2:])}), F1 {same:.3f} against the unlimited run")
        except Exception as exc:  # reported, not fatal: the session goes on
            print(f"[3] FAILED: {type(exc).__name__}: {exc}")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
