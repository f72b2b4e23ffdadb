"""Peak memory of detection against series size: it must stay flat (input on disk + tiles).

Writes synthetic series of growing size to TIFF files (a generated 256 x 256 field repeated along
x), then runs ``detect_series`` on each, lazily loaded from disk, in a fresh process that samples
its own memory every 20 ms. Reported per size:

- ``anon MB``: peak anonymous memory (heap: arrays, tensors, Python), from /proc/self/status
  ``RssAnon``; this is what the process itself allocates;
- ``rss MB``: peak resident set (``VmHWM``), which also counts pages of the memory-mapped input
  file that were touched (page cache the kernel can drop at any time).

    python benchmarks/memory.py                       # 1x, 2x, 4x, 8x a 4 x 32 x 256 x 256 series
    python benchmarks/memory.py --repeats 1 4 16 --model path/to/model.pt
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, threading, time
from pathlib import Path

def status():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return fields

peak = {"RssAnon": 0.0}
running = True
def sample():
    while running:
        peak["RssAnon"] = max(peak["RssAnon"], status()["RssAnon"])
        time.sleep(0.02)

from napari_spine_tracker.core.detect import detect_series
from napari_spine_tracker.core.models import load_model
from napari_spine_tracker.io.series import load_series

path, model_name, device = sys.argv[1], sys.argv[2], sys.argv[3]
model = load_model(model_name, device=device)
series = load_series(path)
before = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
table = detect_series(series, model=model, device=device)
seconds = time.perf_counter() - start
running = False
thread.join()
after = status()
print(json.dumps({"seconds": seconds, "anon_before_mb": before["RssAnon"], "anon_peak_mb": peak["RssAnon"],
                  "rss_peak_mb": after["VmHWM"], "spines": len(table)}))
"""


def write_series(path: Path, repeats: int, sessions: int, seed: int) -> tuple[tuple[int, ...], float]:
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.io.series import write_series_tiff

    synth = synthesize_series(SynthConfig.preset("default", seed=seed, sessions=sessions))
    image = np.tile(synth.image, (1, 1, 1, repeats))
    write_series_tiff(path, image, synth.voxel_size_um)
    return image.shape, path.stat().st_size / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", nargs="+", type=int, default=[1, 2, 4, 8],
                        help="series sizes, as multiples of one 256 x 256 field along x")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    rows = []
    print(f"{'shape (T,Z,Y,X)':>24} {'file MB':>8} {'anon MB':>8} {'+anon MB':>9} {'rss MB':>7} "
          f"{'s':>6} {'Mvox/s':>7} {'spines':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for repeats in args.repeats:
            path = Path(tmp) / f"series-{repeats}.tif"
            shape, file_mb = write_series(path, repeats, args.sessions, args.seed)
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), args.model, args.device],
                                 capture_output=True, text=True, check=False)
            if out.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            result = json.loads(out.stdout.strip().splitlines()[-1])
            voxels = int(np.prod(shape))
            row = {"shape": list(shape), "voxels": voxels, "file_mb": file_mb, **result,
                   "mvoxel_per_s": voxels / result["seconds"] / 1e6, "wall_s": time.perf_counter() - started}
            rows.append(row)
            print(f"{tuple(shape)!s:>24} {file_mb:8.0f} {result['anon_peak_mb']:8.0f} "
                  f"{result['anon_peak_mb'] - result['anon_before_mb']:9.0f} {result['rss_peak_mb']:7.0f} "
                  f"{result['seconds']:6.1f} {row['mvoxel_per_s']:7.2f} {result['spines']:7d}", flush=True)
            path.unlink()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
