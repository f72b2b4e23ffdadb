"""Training targets for SpineNet's heads (CenterNet/CenterTrack style), as numpy arrays.

Points come in input-grid voxels of a patch (z, y, x); targets live on the output grid, which is
the input grid divided by ``stride``. Output voxel ``i`` covers input ``(i + 0.5) * stride - 0.5``
(see core/decode.py, which inverts exactly this mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HEATMAP_SIGMA_UM = (0.5, 0.2, 0.2)
#: reach of a hard negative's extra weight (see :func:`negative_weights`): about a bouton's body
NEGATIVE_SIGMA_UM = (0.6, 0.3, 0.3)


@dataclass
class SessionPoints:
    """Labelled spines of one session of a patch."""

    zyx: np.ndarray  # (N, 3) input-grid voxels
    displacement_um: np.ndarray  # (N, 3) position in previous session minus here, µm; NaN if absent
    radius_um: np.ndarray  # (N,) head radius, NaN if unknown
    # (M, 3) input-grid voxels of known look-alikes that are not spines (axon boutons, shaft
    # varicosities of the synthetic engine): hard negatives
    negatives: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))

    @classmethod
    def empty(cls) -> SessionPoints:
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))


#: the dense target arrays of :func:`make_targets` and their channels
TARGET_CHANNELS = {"heatmap": 1, "offset": 3, "displacement": 3, "size": 1, "centre": 1, "has_previous": 1,
                   "has_size": 1}


def make_targets(sessions: list[SessionPoints], out_shape: tuple[int, int, int], stride: tuple[int, int, int],
                 output_voxel_um: tuple[float, float, float],
                 sigma_um: tuple[float, float, float] = HEATMAP_SIGMA_UM) -> dict[str, np.ndarray]:
    """Targets for T sessions, each array (T, C, Z', Y', X') float32:

    ``heatmap`` (C=1, Gaussian bumps, exactly 1 at each centre voxel), ``offset`` (C=3),
    ``displacement`` (C=3), ``size`` (C=1), and masks ``centre`` (C=1: where the offset is
    supervised), ``has_size`` and ``has_previous`` (C=1: where size and displacement are).
    Training uses the same targets with all but the heatmap as lists (:func:`point_targets`).
    """
    out = {name: np.zeros((len(sessions), c, *out_shape), np.float32) for name, c in TARGET_CHANNELS.items()}
    for t, voxel, offset, radius, disp in _centres(sessions, out_shape, stride, output_voxel_um, sigma_um,
                                                   out["heatmap"]):
        z, y, x = voxel
        out["centre"][t, 0, z, y, x] = 1.0
        out["offset"][t, :, z, y, x] = offset
        if not np.isnan(radius):
            out["size"][t, 0, z, y, x] = radius
            out["has_size"][t, 0, z, y, x] = 1.0
        if not np.any(np.isnan(disp)):
            out["displacement"][t, :, z, y, x] = disp
            out["has_previous"][t, 0, z, y, x] = 1.0
    return out


def point_targets(sessions: list[SessionPoints], out_shape: tuple[int, int, int], stride: tuple[int, int, int],
                  output_voxel_um: tuple[float, float, float], heatmap: np.ndarray,
                  sigma_um: tuple[float, float, float] = HEATMAP_SIGMA_UM) -> dict[str, np.ndarray]:
    """The targets of :func:`make_targets`, the heatmap drawn into ``heatmap`` (T, 1, Z', Y', X',
    zeros) and the rest as one row per centre voxel: ``centre`` (N, 4) int64 (t, z, y, x),
    ``offset`` (N, 3), ``displacement`` (N, 3), ``size`` (N,), ``has_previous`` (N,) and
    ``has_size`` (N,), float32, holding what the dense arrays hold there. The other heads are
    supervised at the centres only, so dense arrays of them are mostly zeros (six sevenths of a
    batch's bytes, all carried from the batch workers to the GPU)."""
    rows: dict[tuple, list] = {}  # centre voxel -> [offset, displacement, size, has_previous, has_size]
    for t, voxel, offset, radius, disp in _centres(sessions, out_shape, stride, output_voxel_um, sigma_um, heatmap):
        row = rows.setdefault((t, *voxel), [None, np.zeros(3), 0.0, 0.0, 0.0])
        row[0] = offset  # a later spine in the same voxel overwrites, as in the dense arrays
        if not np.isnan(radius):
            row[2], row[4] = radius, 1.0
        if not np.any(np.isnan(disp)):
            row[1], row[3] = disp, 1.0
    values = list(rows.values())
    return {
        "centre": np.array(list(rows), np.int64).reshape(-1, 4),
        "offset": np.array([r[0] for r in values], np.float32).reshape(-1, 3),
        "displacement": np.array([r[1] for r in values], np.float32).reshape(-1, 3),
        "size": np.array([r[2] for r in values], np.float32),
        "has_previous": np.array([r[3] for r in values], np.float32),
        "has_size": np.array([r[4] for r in values], np.float32),
    }


def negative_weights(sessions: list[SessionPoints], out_shape: tuple[int, int, int], stride: tuple[int, int, int],
                     output_voxel_um: tuple[float, float, float], weight: float, into: np.ndarray,
                     sigma_um: tuple[float, float, float] = NEGATIVE_SIGMA_UM) -> np.ndarray:
    """Per-voxel weights of the heatmap's negative term, written into ``into`` (T, 1, Z', Y', X'):
    1 everywhere, rising to ``weight`` at each session's ``negatives`` (a Gaussian bump of
    ``sigma_um``), so that a look-alike the engine knows is not a spine costs more when it is
    called one. Near a true spine the focal loss's own ``(1 - heatmap) ** 4`` factor still rules."""
    into[:] = 0.0
    for t, pts in enumerate(sessions):
        for c in _output_coordinates(pts.negatives, stride):
            _draw_bump(into[t, 0], c, out_shape, output_voxel_um, sigma_um)
    into *= np.float32(weight - 1.0)
    into += np.float32(1.0)
    return into


def _output_coordinates(zyx: np.ndarray, stride) -> np.ndarray:
    """Input-grid voxels -> output-grid coordinates (see core/decode.py)."""
    return (np.asarray(zyx, np.float64).reshape(-1, 3) + 0.5) / np.asarray(stride, np.float64) - 0.5


def _draw_bump(volume: np.ndarray, c: np.ndarray, out_shape, output_voxel_um, sigma_um) -> np.ndarray | None:
    """Raise ``volume`` (Z', Y', X') to a unit Gaussian bump of ``sigma_um`` at output-grid
    coordinates ``c`` (a pointwise maximum); returns the nearest voxel, or None (nothing drawn)
    if that voxel is outside the grid."""
    voxel = np.floor(c + 0.5).astype(int)
    if np.any(voxel < 0) or np.any(voxel >= out_shape):
        return None
    sigma_vox = np.asarray(sigma_um, np.float64) / np.asarray(output_voxel_um, np.float64)
    reach = np.ceil(3 * sigma_vox).astype(int)
    lo = np.maximum(voxel - reach, 0)
    hi = np.minimum(voxel + reach + 1, out_shape)
    grids = [np.arange(a, b) for a, b in zip(lo, hi)]
    g = [np.exp(-((grid - cc) ** 2) / (2 * s**2)) for grid, cc, s in zip(grids, c, sigma_vox)]
    bump = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    region = volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    np.maximum(region, bump.astype(np.float32), out=region)
    return voxel


def _centres(sessions, out_shape, stride, output_voxel_um, sigma_um, heatmap):
    """Draw each point's Gaussian bump into ``heatmap`` (T, 1, Z', Y', X') and yield, in order,
    ``(t, centre voxel, offset, radius_um, displacement_um)`` of the points inside the grid."""
    for t, pts in enumerate(sessions):
        for n, c in enumerate(_output_coordinates(pts.zyx, stride)):
            voxel = _draw_bump(heatmap[t, 0], c, out_shape, output_voxel_um, sigma_um)
            if voxel is None:
                continue
            z, y, x = voxel
            heatmap[t, 0, z, y, x] = 1.0
            radius = pts.radius_um[n] if len(pts.radius_um) else np.nan
            yield t, (int(z), int(y), int(x)), c - voxel, radius, pts.displacement_um[n]
