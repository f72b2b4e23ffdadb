"""Training targets for SpineNet's heads (CenterNet/CenterTrack style), as numpy arrays.

Points come in input-grid voxels of a patch (z, y, x); targets live on the output grid, which is
the input grid divided by ``stride``. Output voxel ``i`` covers input ``(i + 0.5) * stride - 0.5``
(see core/decode.py, which inverts exactly this mapping).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEATMAP_SIGMA_UM = (0.5, 0.2, 0.2)


@dataclass
class SessionPoints:
    """Labelled spines of one session of a patch."""

    zyx: np.ndarray  # (N, 3) input-grid voxels
    displacement_um: np.ndarray  # (N, 3) position in previous session minus here, µm; NaN if absent
    radius_um: np.ndarray  # (N,) head radius, NaN if unknown

    @classmethod
    def empty(cls) -> SessionPoints:
        return cls(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0))


#: the target arrays and their channels
TARGET_CHANNELS = {"heatmap": 1, "offset": 3, "displacement": 3, "size": 1, "centre": 1, "has_previous": 1,
                   "has_size": 1}


def make_targets(sessions: list[SessionPoints], out_shape: tuple[int, int, int], stride: tuple[int, int, int],
                 output_voxel_um: tuple[float, float, float],
                 sigma_um: tuple[float, float, float] = HEATMAP_SIGMA_UM,
                 out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Targets for T sessions, each array (T, C, Z', Y', X') float32:

    ``heatmap`` (C=1, Gaussian bumps, exactly 1 at each centre voxel), ``offset`` (C=3),
    ``displacement`` (C=3), ``size`` (C=1), and masks ``centre`` (C=1: where the offset is
    supervised), ``has_size`` and ``has_previous`` (C=1: where size and displacement are).
    ``out``: arrays of these shapes, all zeros, to fill instead of new ones (a batch's rows).
    """
    t_count = len(sessions)
    if out is None:
        out = {name: np.zeros((t_count, c, *out_shape), np.float32) for name, c in TARGET_CHANNELS.items()}
    stride_a = np.asarray(stride, np.float64)
    vox = np.asarray(output_voxel_um, np.float64)
    sigma_vox = np.asarray(sigma_um, np.float64) / vox
    reach = np.ceil(3 * sigma_vox).astype(int)
    for t, pts in enumerate(sessions):
        centres = (np.asarray(pts.zyx, np.float64).reshape(-1, 3) + 0.5) / stride_a - 0.5  # output-grid coordinates
        for n, c in enumerate(centres):
            voxel = np.floor(c + 0.5).astype(int)
            if np.any(voxel < 0) or np.any(voxel >= out_shape):
                continue
            lo = np.maximum(voxel - reach, 0)
            hi = np.minimum(voxel + reach + 1, out_shape)
            grids = [np.arange(a, b) for a, b in zip(lo, hi)]
            g = [np.exp(-((grid - cc) ** 2) / (2 * s**2)) for grid, cc, s in zip(grids, c, sigma_vox)]
            bump = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
            region = out["heatmap"][t, 0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            np.maximum(region, bump.astype(np.float32), out=region)
            z, y, x = voxel
            out["heatmap"][t, 0, z, y, x] = 1.0
            out["centre"][t, 0, z, y, x] = 1.0
            out["offset"][t, :, z, y, x] = c - voxel
            radius = pts.radius_um[n] if len(pts.radius_um) else np.nan
            if not np.isnan(radius):
                out["size"][t, 0, z, y, x] = radius
                out["has_size"][t, 0, z, y, x] = 1.0
            disp = pts.displacement_um[n]
            if not np.any(np.isnan(disp)):
                out["displacement"][t, :, z, y, x] = disp
                out["has_previous"][t, 0, z, y, x] = 1.0
    return out
