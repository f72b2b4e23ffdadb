"""The comparison table: our network against the trackpy peer on synthetic validation series.

One registry of methods, ``METHODS`` (name -> function ``(image (T, Z, Y, X), voxel_size_um,
**options) -> spine table``), serves the ``bench`` command (:func:`run_bench`) and
``benchmarks/compare.py``. Each (method, series) run happens in a fresh process (``spawn``), so its
peak memory is its own: we report the process's peak resident memory and how much of it the method
added on top of the loaded input and the imported libraries; seconds are measured around the
method call alone (imports, and for the network the model load, happen before the clock starts,
so that a first run does not pay them), and Mvoxel/s is the series' voxel count over those seconds.

Test series are synthetic presets with seeds 1000-1002, never seen in training (training draws
randomised series from seed 100000 on and selects models on seeds 1500+) nor in tuning the peer
(seeds 0-1).
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np
import pandas as pd

from ..errors import InputError
from .metrics import evaluate_tracks

log = logging.getLogger(__name__)

__all__ = ["CASES", "METHODS", "QUICK_OVERRIDES", "VALIDATION_SEEDS", "BenchResult", "format_table",
           "method_unavailable", "run_bench", "run_cases"]

#: named validation cases: synthetic presets
CASES = ("default", "large_drift", "low_snr", "crowded")
#: seeds of the test series (training uses seeds >= 1500; the peer was tuned on seeds 0-1)
VALIDATION_SEEDS = (1000, 1001, 1002)
#: a small series for a smoke run (``bench --quick``)
QUICK_OVERRIDES = {"sessions": 3, "shape": (16, 96, 96)}
NO_MODEL = "n/a (no model)"


def _trackpy(image: np.ndarray, voxel_size_um, **_options) -> pd.DataFrame:
    from .peer import trackpy_detect_track

    return trackpy_detect_track(image, voxel_size_um)


def _spinenet(image: np.ndarray, voxel_size_um, *, device: str = "auto", model: str = "spinenet-synth",
              loaded=None, views: int = 1, **_options) -> pd.DataFrame:
    from .detect import detect_series

    return detect_series(image, voxel_size_um, model=loaded if loaded is not None else model, device=device,
                         views=views)


def _spinenet_prepare(device: str = "auto", model: str = "spinenet-synth", **_options) -> dict:
    """Load the model, and import what detection imports on first use (the detection module,
    registration, linking, scipy.optimize: 0.4 s), before the clock starts: neither is detection
    time, as importing trackpy is not the peer's."""
    from . import detect, link, register  # noqa: F401
    from .models import load_model

    return {"loaded": load_model(model, device=device)}


def _trackpy_prepare(**_options) -> dict:
    import trackpy  # noqa: F401  (import time is not detection time)

    from . import peer  # noqa: F401

    return {}


#: name -> method ``(image, voxel_size_um, **options) -> spine table``
METHODS: dict[str, Callable[..., pd.DataFrame]] = {"trackpy": _trackpy, "spinenet": _spinenet}
#: name -> what a method needs before its timed call (imports, model load); returns extra options
_PREPARE: dict[str, Callable[..., dict]] = {"trackpy": _trackpy_prepare, "spinenet": _spinenet_prepare}


def method_unavailable(name: str, model: str = "spinenet-synth") -> str | None:
    """Why a method cannot run here (a short note for the table), or None when it can."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    if name == "spinenet":
        try:
            from .detect import detect_series  # noqa: F401
            from .models import resolve_model
        except ImportError:
            return NO_MODEL
        try:
            resolve_model(model)
        except InputError:
            return NO_MODEL
    return None


@dataclass
class BenchResult:
    """One method on one series."""

    method: str
    case: str
    seed: int
    voxels: int
    scores: dict = field(default_factory=dict)
    seconds: float = float("nan")
    peak_rss_mb: float = float("nan")
    added_rss_mb: float = float("nan")
    peak_gpu_mb: float = float("nan")
    note: str = ""

    @property
    def mvoxel_per_s(self) -> float:
        return self.voxels / self.seconds / 1e6 if self.seconds > 0 else float("nan")

    def as_row(self) -> dict:
        row = {"method": self.method, "case": self.case, "seed": self.seed, "voxels": self.voxels,
               "seconds": self.seconds, "mvoxel_per_s": self.mvoxel_per_s, "peak_rss_mb": self.peak_rss_mb,
               "added_rss_mb": self.added_rss_mb, "peak_gpu_mb": self.peak_gpu_mb, "note": self.note}
        for key in ("f1", "idf1", "association_accuracy", "precision", "recall"):
            row[key] = self.scores.get(key, float("nan"))
        return row


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB (Linux /proc; peak elsewhere)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)
    current = float("nan")
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = float(line.split()[1]) / 1024
    except OSError:
        pass
    return current, peak


def _run_in_child(method: str, image_path: str, voxel_size_um, options: dict) -> dict:
    """Body of the isolated process: load the input, prepare, time the method, measure memory."""
    extra = _PREPARE[method](**options)
    image = np.load(image_path)
    before, _ = _rss_mb()
    gpu = _gpu_reset()
    start = time.perf_counter()
    table = METHODS[method](image, voxel_size_um, **options, **extra)
    seconds = time.perf_counter() - start
    _, peak = _rss_mb()
    return {"table": table, "seconds": seconds, "peak_rss_mb": peak, "added_rss_mb": max(0.0, peak - before),
            "peak_gpu_mb": _gpu_peak(gpu)}


def _gpu_reset():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch
    return None


def _gpu_peak(torch) -> float:
    if torch is None:
        return float("nan")
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def run_cases(methods: Sequence[str] = ("trackpy", "spinenet"), cases: Sequence[str] = CASES,
              seeds: Sequence[int] = VALIDATION_SEEDS, *, quick: bool = False, device: str = "auto",
              model: str = "spinenet-synth", tol_um: float = 1.0, isolate: bool = True,
              overrides: dict | None = None, views: int = 1,
              progress: Callable[[int, int], None] | None = None) -> list[BenchResult]:
    """Run every method on every (case, seed) synthetic series; returns one result per run.

    ``isolate=False`` runs the methods in this process (faster to start; peak memory then is not
    per method and is left out). ``overrides`` change the synthetic configuration (e.g. ``shape``).
    ``views``: SpineNet's test-time augmentation (core/infer.py); its rows are then named
    ``spinenet xN``.
    """
    from .synth import SynthConfig, synthesize_series

    for name in methods:
        method_unavailable(name)  # raises on an unknown name
    unavailable = {m: method_unavailable(m, model) for m in methods}
    changes = dict(QUICK_OVERRIDES if quick else {}) | dict(overrides or {})
    options = {"device": device, "model": model, "views": views}
    results: list[BenchResult] = []
    total, done = len(cases) * len(seeds) * len(methods), 0
    context = get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="spine-bench-") as tmp:
        for case in cases:
            for seed in seeds:
                series = synthesize_series(SynthConfig.preset(case, seed=seed, **changes))
                image_path = os.path.join(tmp, "image.npy")
                np.save(image_path, series.image)
                voxel = series.voxel_size_um
                for name in methods:
                    label = f"{name} x{views}" if name == "spinenet" and views > 1 else name
                    result = BenchResult(label, case, int(seed), int(series.image.size))
                    if unavailable[name]:
                        result.note = unavailable[name]
                    else:
                        try:
                            if isolate:
                                with ProcessPoolExecutor(1, mp_context=context) as pool:
                                    out = pool.submit(_run_in_child, name, image_path, voxel, options).result()
                            else:
                                extra = _PREPARE[name](**options)
                                start = time.perf_counter()
                                table = METHODS[name](series.image, voxel, **options, **extra)
                                out = {"table": table, "seconds": time.perf_counter() - start}
                            result.seconds = float(out["seconds"])
                            for key in ("peak_rss_mb", "added_rss_mb", "peak_gpu_mb"):
                                setattr(result, key, float(out.get(key, float("nan"))))
                            result.scores = evaluate_tracks(out["table"], series.truth, voxel, tol_um=tol_um)
                        except Exception as exc:  # one failing method must not sink the table
                            log.exception("%s failed on %s seed %d", name, case, seed)
                            result.note = f"error: {type(exc).__name__}: {exc}"[:120]
                    results.append(result)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                    log.info("%s %s %d: %s", name, case, seed, result.as_row())
    return results


def format_table(results: Sequence[BenchResult]) -> str:
    """Plain-text table: per method and case, means over seeds."""
    if not results:
        return "(no results)"
    rows = pd.DataFrame([r.as_row() for r in results])
    header = (f"{'method':11s} {'case':12s} {'seeds':>5s} {'F1':>6s} {'IDF1':>6s} {'assoc':>6s} "
              f"{'s':>7s} {'Mvox/s':>7s} {'peakMB':>7s} {'+MB':>6s} {'GPU MB':>7s}  note")
    lines = [header, "-" * len(header)]

    def fmt(value: float, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(value, spec) if np.isfinite(value) else "-".rjust(width)

    for (method, case), group in rows.groupby(["method", "case"], sort=False):
        note = "; ".join(sorted({n for n in group["note"] if n}))
        mean = group[["f1", "idf1", "association_accuracy", "seconds", "mvoxel_per_s", "peak_rss_mb",
                      "added_rss_mb", "peak_gpu_mb"]].mean(skipna=True)
        ok = group["note"].eq("").sum()
        lines.append(
            f"{method:11s} {case:12s} {ok:5d} {fmt(mean.f1, '6.3f')} {fmt(mean.idf1, '6.3f')} "
            f"{fmt(mean.association_accuracy, '6.3f')} {fmt(mean.seconds, '7.2f')} "
            f"{fmt(mean.mvoxel_per_s, '7.2f')} {fmt(mean.peak_rss_mb, '7.0f')} {fmt(mean.added_rss_mb, '6.0f')} "
            f"{fmt(mean.peak_gpu_mb, '7.0f')}  {note}".rstrip())
    return "\n".join(lines)


def run_bench(quick: bool = False, device: str = "auto", model: str = "spinenet-synth", views: int = 1) -> str:
    """The ``bench`` command: both methods on the validation cases; returns the printed table.

    ``quick``: one seed of small series (a smoke run of a minute or so on 2 CPU cores).
    """
    seeds = VALIDATION_SEEDS[:1] if quick else VALIDATION_SEEDS
    results = run_cases(tuple(METHODS), CASES, seeds, quick=quick, device=device, model=model, views=views)
    shape = QUICK_OVERRIDES["shape"] if quick else None
    title = (f"spine detection + tracking on synthetic validation series (seeds {', '.join(map(str, seeds))}"
             f"{', shape ' + str(shape) if shape else ''}; tolerance 1.0 µm; means over seeds)")
    return title + "\n" + format_table(results) + "\n" + _footnote()


def _footnote() -> str:
    return ("s and Mvox/s: the method call alone, end to end (image in memory -> spine table; imports and\n"
            "model load excluded). peakMB: peak resident memory of the method's own process; +MB: what the\n"
            f"method added over the loaded input and libraries. CPU cores: {os.cpu_count()}.")

