"""From network outputs to points: peak finding with 3D max-pool suppression, sub-voxel offsets."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: peaks are found down to this probability when the threshold adapts to the series
ADAPT_FLOOR = 0.1
#: fewer peaks than this above the floor say too little about a series' scores: the ceiling is kept
ADAPT_MIN_PEAKS = 50
#: the lowest an adapted threshold goes (where spines are few or none the split falls among
#: background peaks, as low as 0.15; a second microscope's spines are best found at 0.25-0.30;
#: 0.3 lost least on its series with few spines; benchmarks/adaptive_threshold.py)
ADAPT_LOWEST = 0.3
#: peaks from this probability up to the threshold are offered to the review as suggestions of
#: missed spines (``detect_series(return_suggestions=True)``): on the tuning seeds 2000-2002 they hold
#: half to two-thirds of the spines the threshold misses (low_snr 46 of 69, crowded 99 of 194, a second
#: microscope 125 of 252), at 21-45 % precision; docs/model_report.md, "Suggestions of missed spines"
SUGGEST_FLOOR = 0.2
#: a suggestion this close (µm) to a kept detection of its session is that spine's shoulder, not
#: another spine
SUGGEST_APART_UM = 0.5
#: track evidence: peaks down to this far below the threshold are linked, and one under the
#: threshold is kept where the mean score of its track reaches ``threshold + VOUCH_MEAN_ABOVE``
#: (``link.vouched_by_track``). Chosen on the tuning seeds among 0.10-0.20 below and 0-0.10 above,
#: as the rule that lost no more than 0.003 F1 on any synthetic case; held out it raised F1 / IDF1
#: on every set (test 0.928 / 0.918 -> 0.935 / 0.920, a second microscope 0.808 / 0.764 -> 0.838 /
#: 0.784; docs/model_report.md, "Track evidence"; benchmarks/track_evidence.py)
VOUCH_BELOW = 0.1
VOUCH_MEAN_ABOVE = 0.05

DEFAULT_DECODE = {
    "threshold": 0.35,  # peak probability; the shipped model stores the value chosen on validation
    "nms_radius_um": [0.6, 0.3, 0.3],  # z, y, x half-width of the suppression window
    "use_displacement": True,  # link with the displacement head (else registration only)
}


@dataclass
class Peaks:
    """Peaks of one session of one tile, in model-grid voxels of the tile's input (z, y, x)."""

    zyx: np.ndarray  # (N, 3) float
    # (N, 3) the first input voxel of each peak's output voxel: on a grid that tiles aligned to the
    # network's stride share, so that it decides which tile's core a peak belongs to
    voxel: np.ndarray
    score: np.ndarray  # (N,)
    displacement_um: np.ndarray  # (N, 3) position in previous session minus position here
    radius_um: np.ndarray  # (N,)


def nms_kernel(output_voxel_um, radius_um) -> tuple[int, int, int]:
    """Odd max-pool kernel covering ``radius_um`` on each side, at least 3 voxels wide."""
    return tuple(max(3, 2 * round(r / v) + 1) for r, v in zip(radius_um, output_voxel_um))


def decode_peaks(outputs: dict, stride: tuple[int, int, int], kernel: tuple[int, int, int],
                 threshold: float, heads_at: Callable | None = None) -> list[Peaks]:
    """Decode a batch of one session: ``outputs[name]`` is (B, C, Z', Y', X') (torch).

    A voxel is a peak where its probability is the maximum of its ``kernel`` neighbourhood and
    above ``threshold``. Positions come back in input-grid voxels (output voxel i with offset o
    covers input ``(i + o + 0.5) * stride - 0.5``). Where ``outputs`` holds the heatmap and the
    ``trunk`` features only (``SpineNet.forward_sessions(..., point_heads=True)``), the other
    heads are computed at the peaks by ``heads_at`` (``SpineNet.heads_at``).
    """
    import torch

    logits = outputs["heatmap"][:, 0].float()
    # only voxels above the threshold can be peaks, and they are few: compare each with its
    # neighbourhood instead of max-pooling the whole volume (10-20x faster on CPU). On logits,
    # since the sigmoid is monotonic; probabilities are computed at the peaks only.
    candidates = torch.nonzero(logits >= _logit(threshold))  # (N, 4): b, z, y, x
    b, z, y, x = candidates.unbind(1)
    value = logits[b, z, y, x]
    half = [k // 2 for k in kernel]
    padded = torch.nn.functional.pad(logits, (half[2], half[2], half[1], half[1], half[0], half[0]),
                                     value=float("-inf"))
    is_peak = torch.ones_like(value, dtype=torch.bool)
    for dz, dy, dx in itertools.product(*(range(k) for k in kernel)):
        is_peak &= padded[b, z + dz, y + dy, x + dx] <= value
    b, z, y, x = candidates[is_peak].unbind(1)
    if "trunk" in outputs:
        if heads_at is None:
            raise ValueError("outputs hold trunk features: decode_peaks needs heads_at")
        heads = heads_at(outputs["trunk"][b, :, z, y, x])
    else:
        heads = {name: outputs[name][b, :, z, y, x].float() for name in ("offset", "displacement", "size")}
    stride_t = torch.tensor(stride, dtype=torch.float32, device=logits.device)
    grid = torch.stack([z, y, x], 1).float()  # output voxels
    columns = {
        "zyx": (grid + heads["offset"] + 0.5) * stride_t - 0.5,
        "voxel": grid * stride_t,
        "score": torch.sigmoid(logits[b, z, y, x]),
        "displacement_um": heads["displacement"],
        "radius_um": heads["size"][:, 0],
    }
    columns = {name: value.cpu().numpy().astype(np.float64) for name, value in columns.items()}
    item = b.cpu().numpy()
    return [Peaks(**{name: value[item == i] for name, value in columns.items()}) for i in range(logits.shape[0])]


def series_threshold(scores, ceiling: float, floor: float = ADAPT_FLOOR, lowest: float = ADAPT_LOWEST,
                     min_peaks: int = ADAPT_MIN_PEAKS) -> float:
    """The peak threshold for one series: ``ceiling`` (the model's, chosen on validation),
    lowered to the split of the series' own peak scores where that split is lower, but not below
    ``lowest``.

    Peak scores (all sessions, those at or above ``floor``) are a mixture of true spines and of
    background bumps. A model's scores shift on another microscope: on the ``second_microscope``
    preset the shipped model's true spines score a median 0.35 against 0.8 on data like its
    training data, while background peaks stay at 0.1-0.25, so a threshold chosen on validation
    (0.40) keeps only the brightest spines there. The split is Otsu's (the cut that maximises the
    between-class variance) on the logits of the scores. On series like the training data it
    falls at or above the ceiling, which is then kept (``benchmarks/adaptive_threshold.py``).
    Where spines are few or none, the split falls among background peaks, and the lowered
    threshold keeps more of them than the ceiling would: hence ``lowest`` (0.3, at most 0.1 below
    the shipped models' 0.40).
    """
    scores = np.asarray(scores, dtype=float)
    scores = scores[scores >= floor]
    if len(scores) < min_peaks:
        return float(ceiling)
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    x = np.sort(np.log(p / (1 - p)))
    n = len(x)
    below = np.arange(1, n)  # a cut after each of the first n - 1 values
    cumulative = np.cumsum(x)
    mean_below = cumulative[:-1] / below
    mean_above = (cumulative[-1] - cumulative[:-1]) / (n - below)
    between = below * (n - below) * (mean_below - mean_above) ** 2
    between[x[1:] <= x[:-1]] = -1.0  # cut only between different values
    cut = int(np.argmax(between))
    if between[cut] <= 0:
        return float(ceiling)
    split = 1.0 / (1.0 + np.exp(-(x[cut] + x[cut + 1]) / 2))
    return float(min(ceiling, max(split, lowest)))


def _logit(probability: float) -> float:
    """The logit of a threshold probability (-inf for 0, +inf for 1)."""
    p = min(max(float(probability), 0.0), 1.0)
    if p in (0.0, 1.0):
        return float("-inf") if p == 0.0 else float("inf")
    return float(np.log(p / (1.0 - p)))
