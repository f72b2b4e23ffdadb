"""Where end-to-end detection spends its time: one synthetic test series under cProfile.

Each stage is a function of ours, so its cumulative time is the stage's time (the network's
PyTorch kernels count under ``SpineNet.forward_sessions``). What remains is bookkeeping:
tiling, copies, building the table.

    python benchmarks/profile_detect.py                       # default preset, seed 1000
    python benchmarks/profile_detect.py --case crowded --model runs/stage2.pt
    python benchmarks/profile_detect.py --device cuda --repeat-xy 4   # a 16x larger series on a GPU
    python benchmarks/profile_detect.py --device cuda --repeat-xy 4 --resident off   # tiles read on the CPU
    python benchmarks/profile_detect.py --device cuda --repeat-xy 4 --staging pageable   # held, copied without staging
    python benchmarks/profile_detect.py --device cuda --repeat-xy 4 --series 3   # three series in turn
    python benchmarks/profile_detect.py --device cuda --repeat-xy 4 --epilogues off   # biases and ReLUs apart

A first run of the series pays for what each size needs once (kernels chosen, FFT plans, memory
first allocated) and is shown apart; then it is timed ``--repeat`` times without the profiler (the
best is the figure to quote) and once under it (the stages). With ``--series N`` the timed runs
take N series of consecutive seeds in turn (each with its own drift, so its own registration
shapes), as a batch of one experiment's series would.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import pstats
import sys
import time

#: (label, module file suffix, function name)
STAGES = [
    ("registration (estimate_motion)", "core/register.py", "estimate_motion"),
    ("  of which the rotation search", "core/register.py", "_turn"),
    ("intensity range per session", "core/intensity.py", "session_range"),
    ("intensity range per session, counted on the device", "core/infer.py", "range"),
    ("reading + resampling tiles", "core/intensity.py", "read_resampled"),
    ("holding the series on the device", "core/infer.py", "for_run"),
    ("cutting held tiles (read_resampled_tensor)", "core/intensity.py", "read_resampled_tensor"),
    ("reading turned tiles (read_turned)", "core/infer.py", "read_turned"),
    ("network (forward_sessions)", "core/model.py", "forward_sessions"),
    ("peak decoding (decode_peaks)", "core/decode.py", "decode_peaks"),
    ("linking (link_detections)", "core/link.py", "link_detections"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--case", default="default")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat-xy", type=int, default=1,
                        help="tile the series N x N times in y and x (a larger field of view)")
    parser.add_argument("--resident", choices=["auto", "on", "off"], default="auto",
                        help="hold the series in the device's memory and cut tiles there (auto: on a "
                             "CUDA GPU when it fits in a quarter of its free memory)")
    parser.add_argument("--staging", choices=["pinned", "pageable"], default="pinned",
                        help="how a held series crosses to a GPU: through page-locked buffers, the next "
                             "session read while the last one crosses (the default), or each session "
                             "copied from where it is read")
    parser.add_argument("--series", type=int, default=1,
                        help="time N series of consecutive seeds in turn (default 1: the same series each run)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="let cuDNN time its convolution algorithms for each new shape "
                             "(torch.backends.cudnn.benchmark; off in the package)")
    parser.add_argument("--epilogues", choices=["on", "off"], default="on",
                        help="on CUDA, run the biases, residual additions and ReLUs inside cuDNN's "
                             "convolutions (on, as shipped) or as kernels of their own (off)")
    parser.add_argument("--top", type=int, default=0, help="also list the N functions with the most time of their own")
    parser.add_argument("--trace", type=int, default=0,
                        help="also run once under torch.profiler and list its N operations with the most time "
                             "of their own, on the CPU and on the GPU (copies, waits for the GPU, kernels)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after the first (the best is quoted)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.infer import DeviceSessions, InferenceOptions
    from napari_spine_tracker.core.model import use_cudnn_epilogues
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    model = load_model(args.model, device=args.device)
    use_cudnn_epilogues(model.net, args.epilogues == "on")
    batch = [synthesize_series(SynthConfig.preset(args.case, seed=args.seed + k)) for k in range(max(1, args.series))]
    images = [np.tile(s.image, (1, 1, args.repeat_xy, args.repeat_xy)) for s in batch]
    image = images[0]
    turn = itertools.count()
    options = InferenceOptions(resident={"auto": None, "on": True, "off": False}[args.resident])
    DeviceSessions.staged = args.staging == "pinned"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark

    def run():
        k = next(turn) % len(images)
        detect_series(images[k], batch[k].voxel_size_um, model=model, options=options)
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    def timed() -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    # the first run of a size pays for kernels chosen, FFT plans made and memory first allocated
    first = timed()
    plain = sorted(timed() for _ in range(args.repeat))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    run()
    profiler.disable()
    total = time.perf_counter() - start

    stats = pstats.Stats(profiler).stats
    voxels = image.size
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else "CPU"
    seeds = f"seeds {args.seed}-{args.seed + len(images) - 1} in turn" if len(images) > 1 else f"seed {args.seed}"
    print(f"{args.case} {seeds}: {image.shape} voxels on {where}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; series held on the device: {args.resident} ({args.staging} copies)"
          f"{'; cuDNN benchmark mode' if args.cudnn_benchmark else ''}"
          f"{'; cuDNN epilogues off' if args.epilogues == 'off' and model.device.type == 'cuda' else ''}")
    print(f"first run {first:.2f} s = {voxels / first / 1e6:.2f} Mvoxel/s")
    print(f"end to end {plain[0]:.2f} s = {voxels / plain[0] / 1e6:.2f} Mvoxel/s without the profiler "
          f"(best of {args.repeat}; median {np.median(plain):.2f} s)")
    print(f"end to end {total:.2f} s = {voxels / total / 1e6:.2f} Mvoxel/s (under the profiler)\n")
    print("| stage | s | share |\n|---|---|---|")
    for label, suffix, name in STAGES:
        seconds = sum(entry[3] for (path, _, func), entry in stats.items()
                      if func == name and path.replace("\\", "/").endswith(suffix))
        print(f"| {label} | {seconds:.2f} | {seconds / total:.0%} |")
    if args.trace:
        trace(run, model.device.type == "cuda", args.trace)
    if args.top:
        print(f"\nthe {args.top} functions with the most time of their own (under the profiler):")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    return 0


def trace(run, cuda: bool, rows: int) -> None:
    """One run under ``torch.profiler``: the operations with the most time of their own."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
    table = prof.key_averages()
    for sort_by in ["self_cpu_time_total"] + (["self_device_time_total"] if cuda else []):
        print(f"\ntorch.profiler, one run, by {sort_by}:")
        try:
            print(table.table(sort_by=sort_by, row_limit=rows, max_name_column_width=60))
        except (AttributeError, KeyError):  # torch before 2.4 names it after CUDA
            print(table.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())
