"""How real does the synthetic engine look? Compare it with a real two-photon stack.

    python benchmarks/realism.py [REAL.tif] [--voxel-size Z Y X] [--seeds N] [--out docs/realism.png]

Measures the same figures on the real stack and on synthetic stacks of the same shape and voxel size
(``default`` preset, one session, several seeds): intensity percentiles, offset, background level and
noise, the noise's spatial correlation (detector low-pass), the size of single-photon events (gain),
shaft width and spine-head sizes (FWHM in voxels, found by the same code on both), and writes one
figure: the real maximum projection beside a synthetic one, both side views, and both intensity
histograms on a log scale. Prints a table: real, synthetic seed 0, and the synthetic range over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REAL = REPO / ".." / "shared" / "data" / "real" / "deepd3_crop_dendrite.tif"
REAL_VOXEL_UM = (0.5, 0.094, 0.094)


# ----------------------------------------------------------------------------------------------------
# measurements (identical for real and synthetic stacks)


def _fwhm(profile: np.ndarray, base: float) -> float:
    """Full width at half maximum (samples, linear interpolation) of the peak nearest the centre."""
    p = np.asarray(profile, float) - base
    i = len(p) // 2
    half = p[i] / 2
    if half <= 0:
        return np.nan
    left = i
    while left > 0 and p[left] > half:
        left -= 1
    right = i
    while right < len(p) - 1 and p[right] > half:
        right += 1
    if p[left] > half or p[right] > half:
        return np.nan
    lf = left + (p[left] - half) / (p[left] - p[left + 1])
    rf = right - (p[right] - half) / (p[right] - p[right - 1])
    return float(rf - lf)


def _profile(volume: np.ndarray, centre: tuple[int, int, int], axis: int, half: int) -> np.ndarray:
    index = list(centre)
    lo = max(centre[axis] - half, 0)
    hi = min(centre[axis] + half + 1, volume.shape[axis])
    index[axis] = slice(lo, hi)
    prof = volume[tuple(index)]
    # centre the peak sample in the returned profile
    pad_lo = half - (centre[axis] - lo)
    pad_hi = half - (hi - 1 - centre[axis])
    return np.pad(prof, (pad_lo, pad_hi), mode="edge")


def measure(stack: np.ndarray) -> dict:
    """Figures of one (Z, Y, X) stack; sizes in voxels."""
    img = stack.astype(np.float32)
    out: dict[str, float] = {}
    for q in (1, 50, 95, 99, 99.9):
        out[f"percentile {q}"] = float(np.percentile(img, q))
    out["max"] = float(img.max())
    values, counts = np.unique(stack, return_counts=True)
    offset = float(values[np.argmax(counts)])
    out["offset (mode)"] = offset

    mip = img.max(axis=0)
    mip_s = ndi.gaussian_filter(mip, 1.0)
    top = float(np.percentile(mip_s, 99.5))
    structure = ndi.gaussian_filter(mip, 3.0) > offset + 0.15 * (top - offset)
    background = ~ndi.binary_dilation(structure, iterations=15)
    out["structure fraction of MIP"] = float(structure.mean())
    bg = img[:, background]
    out["background mean - offset"] = float(bg.mean() - offset)
    out["background std"] = float(bg.std())
    out["background var / (mean - offset)"] = float(bg.var() / max(bg.mean() - offset, 1e-3))
    centred = img - ndi.uniform_filter(img, (1, 15, 15))
    both = background[:, :-1] & background[:, 1:]
    a, b = centred[:, :, :-1][:, both], centred[:, :, 1:][:, both]
    out["background noise corr, lag 1 px"] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    out.update(_photon_events(img, background, offset))
    out.update(_sizes(img, mip_s, offset, top))
    across, along_z = profiles(stack)
    out["MIP across shaft at 0.5 µm (rel.)"] = float(np.interp(0.5, across[0], across[1]))
    out["MIP across shaft at 1.2 µm (rel.)"] = float(np.interp(1.2, across[0], across[1]))
    out["z profile at +-2.5 µm (rel.)"] = float(np.interp(2.5, along_z[0], along_z[1]))
    out["z profile at +-4 µm (rel.)"] = float(np.interp(4.0, along_z[0], along_z[1]))
    return out


def profiles(stack: np.ndarray, voxel_size_um=REAL_VOXEL_UM):
    """Mean profiles, each relative to its peak: the maximum projection against the distance (µm) from
    the shaft's centre line, and the z profile through the structure against the distance (µm) from
    its brightest plane (both sides averaged). Returns ``(d_um, across), (dz_um, along_z)``."""
    img = stack.astype(np.float32)
    values, counts = np.unique(stack, return_counts=True)
    offset = float(values[np.argmax(counts)])
    mip = img.max(axis=0) - offset
    mip_s = ndi.gaussian_filter(mip, 1.0)
    mask = mip_s > 0.3 * np.percentile(mip_s, 99.5)
    yy, xx = np.mgrid[-3:4, -3:4]
    shaft = ndi.binary_opening(mask, structure=(yy**2 + xx**2) <= 9)
    dist = ndi.distance_transform_edt(shaft)
    ridge = (dist >= ndi.maximum_filter(dist, 3)) & (dist > 1)
    from_ridge = ndi.distance_transform_edt(~ridge) * voxel_size_um[2]
    d = np.arange(0, 1.6, voxel_size_um[2])
    level = np.median(mip[ridge])
    across = np.array([np.median(mip[np.abs(from_ridge - r) < 0.5 * voxel_size_um[2]]) for r in d]) / level
    column = img[:, mask].mean(axis=1) - offset
    peak = int(np.argmax(column))
    dz = np.arange(0, max(peak, len(column) - 1 - peak) + 1)
    along = [np.mean([column[peak + k] for k in (-i, i) if 0 <= peak + k < len(column)]) for i in dz]
    return (d, across), (dz * voxel_size_um[0], np.array(along) / column[peak])


def _photon_events(img: np.ndarray, background: np.ndarray, offset: float) -> dict:
    """Isolated bright specks in the background: single detected photons. Their summed ADU is the gain."""
    sums, peaks = [], []
    for z in range(img.shape[0]):
        plane = img[z] - offset
        maxima = (plane == ndi.maximum_filter(plane, 7)) & background & (plane > 8)
        for y, x in zip(*np.nonzero(maxima), strict=True):
            if 3 <= y < plane.shape[0] - 3 and 3 <= x < plane.shape[1] - 3:
                patch = plane[y - 3: y + 4, x - 3: x + 4]
                rim = np.concatenate([patch[0], patch[-1], patch[:, 0], patch[:, -1]])
                if rim.max() < 4:
                    sums.append(patch.sum())
                    peaks.append(patch[3, 3])
    if len(sums) < 10:
        return {"photon event ADU (median sum)": np.nan, "photon event peak ADU": np.nan, "photon events": len(sums)}
    return {"photon event ADU (median sum)": float(np.median(sums)),
            "photon event peak ADU": float(np.median(peaks)), "photon events": len(sums)}


def _sizes(img: np.ndarray, mip_s: np.ndarray, offset: float, top: float) -> dict:
    """Shaft width and spine-head FWHM, from the maximum projection and the stack."""
    coarse = mip_s > offset + 0.3 * (top - offset)
    dist0 = ndi.distance_transform_edt(coarse)
    ridge0 = (dist0 >= ndi.maximum_filter(dist0, 3)) & (dist0 > 1)
    level = float(np.median(mip_s[ridge0])) if ridge0.any() else top
    half = mip_s > offset + 0.5 * (level - offset)
    dist = ndi.distance_transform_edt(half)
    ridge = (dist >= ndi.maximum_filter(dist, 3)) & (dist > 1)
    shaft_width = float(np.median(2 * dist[ridge])) if ridge.any() else np.nan
    # the shaft: the half-maximum mask opened with a disk as wide as the shaft (spines fall off)
    r = max(1, round(0.45 * shaft_width))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    shaft = ndi.binary_opening(half, structure=(yy**2 + xx**2) <= r * r)
    shaft_dist = ndi.distance_transform_edt(~shaft)

    sm = ndi.gaussian_filter(img, (0.5, 1.0, 1.0))
    peaks = (sm == ndi.maximum_filter(sm, (5, 7, 7))) & (sm > offset + 0.3 * (level - offset))
    heads = [(z, y, x) for z, y, x in zip(*np.nonzero(peaks), strict=True) if shaft_dist[y, x] >= 3]
    fw = {"x": [], "y": [], "z": []}
    for c in heads:
        fw["y"].append(_fwhm(_profile(sm, c, 1, 15), offset))
        fw["x"].append(_fwhm(_profile(sm, c, 2, 15), offset))
        fw["z"].append(_fwhm(_profile(sm, c, 0, 10), offset))
    zs = []
    ys, xs = np.nonzero(ridge & shaft)
    for y, x in zip(ys, xs, strict=True):
        z = int(np.argmax(sm[:, y, x]))
        zs.append(_fwhm(_profile(sm, (z, y, x), 0, 10), offset))
    head_xy = np.nanmedian(np.r_[fw["x"], fw["y"]]) if heads else np.nan
    return {
        "shaft level - offset (ADU)": level - offset,
        "shaft width at half max (px)": shaft_width,
        "shaft FWHM z (slices)": float(np.nanmedian(zs)) if zs else np.nan,
        "heads found": len(heads),
        "head FWHM xy (px)": float(head_xy),
        "head FWHM z (slices)": float(np.nanmedian(fw["z"])) if heads else np.nan,
        "head peak - offset (ADU)": float(np.median([sm[c] for c in heads]) - offset) if heads else np.nan,
    }


# ----------------------------------------------------------------------------------------------------
# figure and table


def synthetic_like(shape, voxel_size_um, seed: int) -> np.ndarray:
    """One session of the ``default`` preset with the real stack's shape and voxel size."""
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    cfg = SynthConfig.preset("default", seed=seed, sessions=1, shape=tuple(shape), voxel_size_um=tuple(voxel_size_um))
    return synthesize_series(cfg).image[0]


def figure(real: np.ndarray, synth: np.ndarray, voxel_size_um, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = float(np.percentile(real, 1))
    hi = float(np.percentile(real.max(axis=0), 99.7))
    aspect_xz = voxel_size_um[0] / voxel_size_um[2]
    ny, nx = real.shape[1:]
    nz = real.shape[0] * aspect_xz
    fig = plt.figure(figsize=(12, 10.5), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[ny, nz, 0.9 * ny])
    for col, (name, stack) in enumerate((("real (DeepD3 crop)", real), ("synthetic (default preset)", synth))):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(stack.max(axis=0), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{name}: max projection over z", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = 5.0 / voxel_size_um[2]
        ax.plot([nx - bar - 8, nx - 8], [ny - 8, ny - 8], color="w", lw=2)
        ax.text(nx - bar / 2 - 8, ny - 12, "5 µm", color="w", ha="center", va="bottom", fontsize=8)
        ax = fig.add_subplot(grid[1, col])
        ax.imshow(stack.max(axis=1), cmap="gray", vmin=lo, vmax=hi, aspect=aspect_xz, interpolation="nearest")
        ax.set_title("max projection over y (x-z side view)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    bottom = grid[2, :].subgridspec(1, 3, width_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(bottom[0])
    top = int(max(real.max(), synth.max())) + 1
    bins = np.unique(np.geomspace(max(lo - 10, 1), top, 160).astype(int))
    for name, stack, color in (("real", real, "k"), ("synthetic", synth, "tab:red")):
        counts, edges = np.histogram(stack, bins=bins)
        density = counts / np.diff(edges) / stack.size
        ax.step(edges[:-1], np.where(density > 0, density, np.nan), where="post", color=color, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [t for t in (150, 200, 300, 500, 1000, 2000, 3000, 5000, 10000, 30000) if lo - 10 <= t <= top]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("intensity (ADU)")
    ax.set_ylabel("fraction of voxels per ADU")
    ax.set_title("intensity histograms (all voxels)", fontsize=10)
    ax.legend()
    (d_r, across_r), (z_r, along_r) = profiles(real, voxel_size_um)
    (d_s, across_s), (z_s, along_s) = profiles(synth, voxel_size_um)
    for ax, title, xlabel, curves in (
        (fig.add_subplot(bottom[1]), "across the shaft (max projection)", "distance from centre line (µm)",
         ((d_r, across_r), (d_s, across_s))),
        (fig.add_subplot(bottom[2]), "along z through the structure", "distance from brightest plane (µm)",
         ((z_r, along_r), (z_s, along_s))),
    ):
        for (x, y), color, name in zip(curves, ("k", "tab:red"), ("real", "synthetic"), strict=True):
            ax.plot(x, y, color=color, marker=".", label=name)
        ax.set_yscale("log")
        ax.set_ylim(0.01, 1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("relative intensity")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("real", nargs="?", default=str(DEFAULT_REAL), help="real (Z, Y, X) stack, TIFF")
    parser.add_argument("--voxel-size", nargs=3, type=float, default=REAL_VOXEL_UM, metavar=("Z", "Y", "X"),
                        help="voxel size of the real stack in µm (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=5, help="synthetic stacks to measure (default 5)")
    parser.add_argument("--out", default=str(REPO / "docs" / "realism.png"), help="figure path")
    args = parser.parse_args(argv)

    import tifffile

    real_path = Path(args.real)
    if not real_path.is_file():
        print(f"no real stack at {real_path}; pass its path as the first argument", file=sys.stderr)
        return 2
    real = tifffile.imread(real_path)
    if real.ndim != 3:
        print(f"{real_path}: expected a (Z, Y, X) stack, got shape {real.shape}", file=sys.stderr)
        return 2
    synth = [synthetic_like(real.shape, args.voxel_size, seed) for seed in range(args.seeds)]
    figure(real, synth[0], args.voxel_size, Path(args.out))

    rows = [measure(real)] + [measure(s) for s in synth]
    print(f"real: {real_path.name} {real.shape}, voxel {tuple(args.voxel_size)} µm; synthetic: default preset, "
          f"same shape and voxel size, seeds 0..{args.seeds - 1}")
    print(f"{'figure':42s} {'real':>10s} {'synth s0':>10s} {'synth min':>10s} {'synth med':>10s} {'synth max':>10s}")
    for key in rows[0]:
        values = np.array([r[key] for r in rows[1:]], float)
        print(f"{key:42s} {rows[0][key]:10.3g} {values[0]:10.3g} {np.nanmin(values):10.3g} "
              f"{np.nanmedian(values):10.3g} {np.nanmax(values):10.3g}")
    print(f"figure written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
