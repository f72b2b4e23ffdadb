"""From network outputs to points: peak finding with 3D max-pool suppression, sub-voxel offsets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_DECODE = {
    "threshold": 0.35,  # peak probability; the shipped model stores the value chosen on validation
    "nms_radius_um": [0.6, 0.3, 0.3],  # z, y, x half-width of the suppression window
    "use_displacement": True,  # link with the displacement head (else registration only)
}


@dataclass
class Peaks:
    """Peaks of one session of one tile, in model-grid voxels of the tile's input (z, y, x)."""

    zyx: np.ndarray  # (N, 3) float
    score: np.ndarray  # (N,)
    displacement_um: np.ndarray  # (N, 3) position in previous session minus position here
    radius_um: np.ndarray  # (N,)


def nms_kernel(output_voxel_um, radius_um) -> tuple[int, int, int]:
    """Odd max-pool kernel covering ``radius_um`` on each side, at least 3 voxels wide."""
    return tuple(max(3, 2 * round(r / v) + 1) for r, v in zip(radius_um, output_voxel_um))


def decode_peaks(outputs: dict, stride: tuple[int, int, int], kernel: tuple[int, int, int],
                 threshold: float) -> list[Peaks]:
    """Decode a batch of one session: ``outputs[name]`` is (B, C, Z', Y', X') (torch).

    A voxel is a peak where its probability is the maximum of its ``kernel`` neighbourhood and
    above ``threshold``. Positions come back in input-grid voxels (output voxel i with offset o
    covers input ``(i + o + 0.5) * stride - 0.5``).
    """
    import torch
    from torch.nn import functional as F

    prob = torch.sigmoid(outputs["heatmap"].float())
    pooled = F.max_pool3d(prob, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    is_peak = (prob == pooled) & (prob >= threshold)
    stride_t = torch.tensor(stride, dtype=torch.float32, device=prob.device)
    result = []
    for b in range(prob.shape[0]):
        idx = torch.nonzero(is_peak[b, 0])  # (N, 3)
        z, y, x = idx.unbind(1)
        offset = outputs["offset"][b, :, z, y, x].float().T  # (N, 3)
        zyx = (idx.float() + offset + 0.5) * stride_t - 0.5
        peaks = Peaks(
            zyx=zyx.cpu().numpy().astype(np.float64),
            score=prob[b, 0, z, y, x].cpu().numpy().astype(np.float64),
            displacement_um=outputs["displacement"][b, :, z, y, x].float().T.cpu().numpy().astype(np.float64),
            radius_um=outputs["size"][b, 0, z, y, x].float().cpu().numpy().astype(np.float64),
        )
        result.append(peaks)
    return result
