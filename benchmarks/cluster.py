"""Series per minute of batch detection: in this process, and on a Dask LocalCluster of 1 and 2 workers.

    python benchmarks/cluster.py                          # 6 series, 4 sessions of 24x160x160
    python benchmarks/cluster.py --series 8 --workers 1 2 4 --shape 32 256 256 --sessions 6
    python benchmarks/cluster.py --model path/to/model.pt

All runs read the same generated series (written once as TIFFs) and write their tables to their
own folders. "start-up" is the time to start the cluster, import torch and the detector on every
worker and stop it again, measured on its own; "steady" leaves it out. Without the shipped model
(``spinenet-synth``) an untrained model of the shipped architecture stands in: its speed is the
same, its detections are not (see the spine-sessions column).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_spine_tracker.core.cluster import detect_many


def write_series(folder: Path, count: int, sessions: int, shape: tuple[int, int, int]) -> list[Path]:
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.io.series import write_series_tiff

    paths = []
    for k in range(count):
        synth = synthesize_series(SynthConfig.preset("default", seed=2000 + k, sessions=sessions, shape=shape))
        paths.append(write_series_tiff(folder / f"series{k:02d}.tif", synth.image, synth.voxel_size_um))
    return paths


def stand_in_model(folder: Path) -> str:
    """An untrained checkpoint of the shipped ("lean") architecture."""
    import torch

    from napari_spine_tracker.core.decode import DEFAULT_DECODE
    from napari_spine_tracker.core.intensity import DEFAULT_NORMALIZATION
    from napari_spine_tracker.core.model import SpineNet, build_config
    from napari_spine_tracker.core.train import MODEL_VOXEL_UM
    from napari_spine_tracker.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = SpineNet(build_config("lean"))
    path = save_checkpoint(folder / "untrained-lean.pt", {
        "config": net.config, "voxel_size_um": list(MODEL_VOXEL_UM), "normalization": dict(DEFAULT_NORMALIZATION),
        "decode": dict(DEFAULT_DECODE), "state_dict": net.state_dict(),
        "training": {"steps": 0, "note": "untrained stand-in for benchmarks/cluster.py"},
    })
    return str(path)


def _warm_worker() -> int:
    import torch

    import napari_spine_tracker.core.detect  # noqa: F401  (what every task imports first)

    return torch.get_num_threads()


def cluster_startup_seconds(workers: int) -> float:
    """Start a LocalCluster like detect_many does, import the detector on every worker, stop it."""
    from distributed import Client, LocalCluster

    started = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(_warm_worker)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=6)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(24, 160, 160), metavar=("Z", "Y", "X"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="LocalCluster sizes to time")
    parser.add_argument("--model", help="model name or checkpoint (default: spinenet-synth, else a stand-in)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", help="keep the series and tables here (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import distributed  # noqa: F401  (it sets its loggers up when imported; quieten them afterwards)

    logging.getLogger("distributed").setLevel(logging.ERROR)  # the scheduler logs every start and stop

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        inputs = write_series(work, args.series, args.sessions, tuple(args.shape))
        model = args.model
        if model is None:
            from napari_spine_tracker.core.models import list_models

            names = {info.name for info in list_models()}
            model = "spinenet-synth" if "spinenet-synth" in names else stand_in_model(work)
        voxels = args.series * args.sessions * int(np.prod(args.shape))
        print(f"{args.series} series of {args.sessions} x {tuple(args.shape)} voxels ({voxels / 1e6:.1f} Mvoxel "
              f"in all); model {Path(model).name}; {os.cpu_count()} CPU cores; load average before "
              f"{os.getloadavg()[0]:.1f}", flush=True)

        rows = []
        runs = [("this process", None, None)] + [(f"LocalCluster, {n} worker(s)", "local", n) for n in args.workers]
        for label, scheduler, workers in runs:
            out = work / f"tables-{scheduler or 'inprocess'}-{workers or 0}"
            startup = cluster_startup_seconds(workers) if scheduler else 0.0
            report = detect_many(inputs, out, scheduler=scheduler, workers=workers, model=model,
                                 device=args.device, skip_done=False)
            if report.failed:
                print(report.format(), file=sys.stderr)
                return 1
            wall = report.seconds
            per_series = sum(r.seconds for r in report.done) / len(report.done)
            rows.append((label, wall, startup, 60 * len(report.done) / wall,
                         60 * len(report.done) / max(wall - startup, 1e-9), per_series,
                         sum(r.spine_sessions for r in report.done)))
            print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)

    print(f"{'run':<26} {'wall s':>7} {'start-up s':>10} {'series/min':>10} {'steady/min':>10} "
          f"{'s/series':>9} {'spine-sessions':>14}")
    for label, wall, startup, rate, steady, per_series, spines in rows:
        print(f"{label:<26} {wall:>7.1f} {startup:>10.1f} {rate:>10.2f} {steady:>10.2f} {per_series:>9.1f} "
              f"{spines:>14d}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
