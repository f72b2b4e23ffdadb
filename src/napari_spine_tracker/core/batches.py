"""Training patches: series brought to the model grid, cropped, augmented, with their targets.

Two sources feed the trainer through one interface (:class:`PreparedSeries`): a pool of
synthetic series from the data engine, refreshed as training goes (domain randomisation), and
training-set folders of corrected user data (DESIGN §3), where only the reviewed sessions count
as complete labels (elsewhere the heatmap loss is masked).

A patch follows the inference engine exactly: every session is cropped at the window position
moved by the (rounded) registration drift, so the network sees roughly aligned sessions and
learns the residual displacement, as it will at inference; a random jitter of the crop stands in
for registration error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .intensity import DEFAULT_NORMALIZATION, grid_scale, normalize, read_resampled, session_range
from .targets import SessionPoints, negative_weights, point_targets

log = logging.getLogger(__name__)


@dataclass
class PreparedSeries:
    """A series on the model grid, normalised per session, with labels in model-grid voxels."""

    image: np.ndarray  # (T, Z, Y, X) float16
    labels: pd.DataFrame  # track_id, t, z, y, x (model grid), radius_um (NaN if unknown)
    drift_vox: np.ndarray  # (T, 3) model-grid voxels; content of session 0 at p is at p + drift[t]
    labelled: np.ndarray  # (T,) bool: sessions whose labels are complete
    name: str = ""
    # a RigidMotion with turns (native voxels) and the native -> model grid scale: each session's
    # patch is then placed where the motion puts the patch centre (None: drift_vox alone)
    motion: Any = None
    scale: np.ndarray | None = None
    # known look-alikes that are not spines (the synthetic engine's boutons and varicosities), each
    # session's (M, 3) model-grid voxels; None where nobody knows (user data)
    distractors: list[np.ndarray] | None = None
    # each session's labels as arrays (patches are cut many times per series; pandas indexing
    # was a sixth of the time to prepare a batch)
    by_session: list[_SessionLabels] = field(init=False, repr=False)

    def __post_init__(self):
        t = self.labels["t"].to_numpy()
        ids, radius = self.labels["track_id"].to_numpy(), self.labels["radius_um"].to_numpy(np.float64)
        zyx = self.labels[["z", "y", "x"]].to_numpy(np.float64)
        self.by_session = [_SessionLabels(ids[t == s], zyx[t == s], radius[t == s]) for s in range(self.image.shape[0])]


@dataclass(frozen=True)
class _SessionLabels:
    track_id: np.ndarray  # (N,)
    zyx: np.ndarray  # (N, 3) model-grid voxels
    radius_um: np.ndarray  # (N,)


def prepare_series(image, voxel_size_um: Sequence[float], labels: pd.DataFrame, model_voxel_um: Sequence[float],
                   normalization: dict = DEFAULT_NORMALIZATION, labelled_sessions: Sequence[int] | None = None,
                   drift_vox: np.ndarray | None = None, name: str = "", motion=None,
                   distractors: pd.DataFrame | None = None) -> PreparedSeries:
    """Resample ``image`` (T, Z, Y, X) to the model grid, normalise it, and map the labels.

    ``labels`` is a spine table in native voxels (``head_radius_um`` used when present);
    ``drift_vox`` is in native voxels (see core/register.py), or ``motion`` (a ``RigidMotion``,
    which replaces it); ``labelled_sessions`` defaults to all. ``distractors`` (t, z, y, x in
    native voxels, as ``SynthSeries.distractors``) are kept as hard negatives.
    """
    if motion is not None:
        drift_vox = motion.drift_vox
    scale = grid_scale(voxel_size_um, model_voxel_um)
    t_count = image.shape[0]
    native_shape = image.shape[1:]
    model_shape = tuple(round(n * s) for n, s in zip(native_shape, scale))
    out = np.empty((t_count, *model_shape), np.float16)
    for t in range(t_count):
        session = np.asarray(image[t])
        block = read_resampled(session, (0, 0, 0), model_shape, scale, fill=float(np.median(session)))
        out[t] = normalize(block, session_range(session, normalization))
    def to_model_grid(table):
        return (table[["z", "y", "x"]].to_numpy(np.float64) + 0.5) * np.asarray(scale) - 0.5

    mapped = to_model_grid(labels)
    radius = (labels["head_radius_um"].to_numpy(np.float64) if "head_radius_um" in labels
              else np.full(len(labels), np.nan))
    table = pd.DataFrame({"track_id": labels["track_id"].to_numpy(), "t": labels["t"].to_numpy(),
                          "z": mapped[:, 0], "y": mapped[:, 1], "x": mapped[:, 2], "radius_um": radius})
    drift = np.zeros((t_count, 3)) if drift_vox is None else np.asarray(drift_vox, float) * np.asarray(scale)
    labelled = np.zeros(t_count, bool)
    labelled[list(range(t_count)) if labelled_sessions is None else list(labelled_sessions)] = True
    turned = motion is not None and motion.rotated
    negatives = None
    if distractors is not None:
        where, at = to_model_grid(distractors), distractors["t"].to_numpy()
        negatives = [where[at == t] for t in range(t_count)]
    return PreparedSeries(out, table, drift, labelled, name, motion=motion if turned else None,
                          scale=np.asarray(scale, float) if turned else None, distractors=negatives)


@dataclass
class PatchOptions:
    shape: tuple[int, int, int] = (16, 96, 96)  # model-grid voxels, z y x
    sessions: int = 3
    jitter_um: float = 0.4  # registration error to simulate, per axis, at most
    near_label_fraction: float = 0.6  # crops centred near a labelled spine (the rest anywhere)
    augment: bool = True


def crop(volume: np.ndarray, origin: Sequence[int], shape: Sequence[int], fill: float = 0.0,
         out: np.ndarray | None = None) -> np.ndarray:
    """``volume[origin : origin + shape]`` with out-of-range voxels set to ``fill`` (float32; into
    ``out`` when given)."""
    if out is None:
        out = np.empty(tuple(int(n) for n in shape), np.float32)
    src, dst = [], []
    for o, n, size in zip(origin, shape, volume.shape):
        a, b = max(o, 0), min(o + n, size)
        if a >= b:
            out.fill(fill)
            return out
        src.append(slice(a, b))
        dst.append(slice(a - o, b - o))
    if any(d.start > 0 or d.stop < n for d, n in zip(dst, shape)):
        out.fill(fill)
    out[tuple(dst)] = volume[tuple(src)]
    return out


def sample_patch(series: PreparedSeries, rng: np.random.Generator, options: PatchOptions,
                 model_voxel_um: Sequence[float]):
    """One training patch: image (T, 1, Z, Y, X) float32, per-session points, labelled mask (T,)."""
    t_count = series.image.shape[0]
    sessions = min(options.sessions, t_count)
    t0 = int(rng.integers(0, t_count - sessions + 1))
    shape = np.asarray(options.shape)
    labels0 = series.by_session[t0]
    if len(labels0.zyx) and rng.random() < options.near_label_fraction:
        centre = labels0.zyx[rng.integers(len(labels0.zyx))]
        centre = centre + rng.uniform(-0.35, 0.35, 3) * shape
    else:
        centre = rng.uniform(0, 1, 3) * np.asarray(series.image.shape[1:])
    origin0 = np.round(centre - shape / 2).astype(int)
    voxel_um = np.asarray(model_voxel_um)
    jitter_vox = options.jitter_um / voxel_um
    image = np.empty((sessions, 1, *options.shape), np.float32)
    points, labelled = [], []
    previous = None  # (track ids, positions in patch voxels) of the previous session in the window
    for i, t in enumerate(range(t0, t0 + sessions)):
        if series.motion is None:
            origin = origin0 + np.round(series.drift_vox[t] - series.drift_vox[t0]).astype(int)
        else:  # a turn: the patch centre, through the motion (a patch is too small for the turn to matter within it)
            native = (origin0 + shape / 2 + 0.5) / series.scale - 0.5
            there = (series.motion.between(native, t0, t) + 0.5) * series.scale - 0.5
            origin = np.round(there - shape / 2).astype(int)
        if t != t0:
            origin = origin + np.round(rng.uniform(-1, 1, 3) * jitter_vox).astype(int)
        crop(series.image[t], origin, shape, out=image[i, 0])
        rows = series.by_session[t]
        zyx = rows.zyx - origin
        inside = np.all((zyx > -1) & (zyx < shape), axis=1)
        disp = np.full((len(zyx), 3), np.nan)
        if previous is not None:
            found, where = _positions_in(previous[0], rows.track_id)
            disp[found] = (previous[1][where] - zyx[found]) * voxel_um
        is_labelled = bool(series.labelled[t])
        previous = (rows.track_id, zyx) if is_labelled else None
        labelled.append(is_labelled)
        if is_labelled:
            negatives = np.zeros((0, 3))
            if series.distractors is not None:
                negatives = series.distractors[t] - origin
                negatives = negatives[np.all((negatives > -1) & (negatives < shape), axis=1)]
            points.append(SessionPoints(zyx[inside], disp[inside], rows.radius_um[inside], negatives))
        else:
            points.append(SessionPoints.empty())
    if options.augment:
        image, points = augment(image, points, rng)
    return image, points, np.asarray(labelled)


def _positions_in(ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of ``wanted`` occur in ``ids`` (a bool mask over ``wanted``) and where (indices into
    ``ids``; the last occurrence of an id that occurs more than once)."""
    if not len(ids):
        return np.zeros(len(wanted), bool), np.zeros(0, int)
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    pos = np.searchsorted(ordered, wanted, side="right") - 1
    found = (pos >= 0) & (ordered[np.maximum(pos, 0)] == wanted)
    return found, order[pos[found]]


def augment(image: np.ndarray, points: list[SessionPoints], rng: np.random.Generator):
    """Geometry (same for all sessions): flips in z, y, x and a y/x swap; intensity per session:
    gain, offset, gamma and extra noise. ``image`` (T, 1, Z, Y, X) float32; changed in place
    unless a flip or swap makes a new array."""
    shape = np.asarray(image.shape[2:])
    pts = [SessionPoints(p.zyx.copy(), p.displacement_um.copy(), p.radius_um, p.negatives.copy()) for p in points]
    for axis in range(3):
        if rng.random() < 0.5:
            image = np.flip(image, axis=2 + axis)
            for p in pts:
                p.zyx[:, axis] = shape[axis] - 1 - p.zyx[:, axis]
                p.negatives[:, axis] = shape[axis] - 1 - p.negatives[:, axis]
                p.displacement_um[:, axis] *= -1
    if rng.random() < 0.5 and shape[1] == shape[2]:
        image = np.swapaxes(image, 3, 4)
        for p in pts:
            p.zyx[:, [1, 2]] = p.zyx[:, [2, 1]]
            p.negatives[:, [1, 2]] = p.negatives[:, [2, 1]]
            p.displacement_um[:, [1, 2]] = p.displacement_um[:, [2, 1]]
    image = np.ascontiguousarray(image, dtype=np.float32)
    for t in range(image.shape[0]):
        x = image[t]
        gamma = float(np.exp(rng.uniform(-0.35, 0.35)))
        np.power(x, np.float32(gamma), out=x, where=x > 0)
        x *= np.float32(np.exp(rng.uniform(-0.35, 0.35)))
        x += np.float32(rng.uniform(-0.05, 0.05))
        if rng.random() < 0.5:
            sigma = np.float32(rng.uniform(0, 0.15))
            noise = rng.standard_normal(x.shape, dtype=np.float32)
            noise *= sigma
            x += noise
    return image, pts


def make_batch(patches, out_shape, stride, output_voxel_um, negative_weight: float = 1.0):
    """Patches as one batch of numpy arrays: ``image`` (B, T, 1, Z, Y, X), ``heatmap`` (B, T, 1,
    Z', Y', X'), ``labelled`` (B, T), and the other targets at the centres (see
    :func:`~napari_spine_tracker.core.targets.point_targets`), ``centre`` (N, 5) holding b, t, z,
    y, x. With ``negative_weight`` other than 1, also ``negative_weight`` (B, T, 1, Z', Y', X'):
    the heatmap's negative term weighted up to that at the patches' hard negatives (see
    :func:`~napari_spine_tracker.core.targets.negative_weights`)."""
    b, t = len(patches), patches[0][0].shape[0]
    heatmap = np.zeros((b, t, 1, *out_shape), np.float32)
    weights = np.empty_like(heatmap) if negative_weight != 1.0 else None
    points = []
    for i, (_, sessions, _) in enumerate(patches):
        if weights is not None:
            negative_weights(sessions, out_shape, stride, output_voxel_um, negative_weight, weights[i])
        rows = point_targets(sessions, out_shape, stride, output_voxel_um, heatmap[i])
        rows["centre"] = np.concatenate([np.full((len(rows["centre"]), 1), i), rows["centre"]], axis=1)
        points.append(rows)
    batch = {name: np.concatenate([rows[name] for rows in points]) for name in points[0]}
    batch["heatmap"] = heatmap
    batch["image"] = np.stack([image for image, _, _ in patches])
    batch["labelled"] = np.stack([mask for _, _, mask in patches]).astype(np.float32)
    if weights is not None:
        batch["negative_weight"] = weights
    return batch
