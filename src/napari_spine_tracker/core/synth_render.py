"""Render synthetic tissue into two-photon images: rasterise, blur with the PSF, add haze and noise.

The image model of a point-scanning microscope: the expected photon count of a pixel is the dye
concentration convolved with the PSF, sampled at the pixel centre, so it does not depend on the
voxel size. The PSF is an anisotropic Gaussian core plus wide wings (out-of-focus haze, measured on
real stacks: ``benchmarks/realism.py``). Objects are rasterised into their bounding boxes as partial
volumes (a soft edge one voxel wide along the surface normal, each object then scaled to its true
volume, so thin necks and small heads keep their mass between coarse z planes) and blurred with a
separable Gaussian. The detector then counts: Poisson photons, each amplified by a PMT with a random
pulse height (gamma distributed), summed in ADU, low-pass filtered in y and x (the correlated
speckle of real two-photon backgrounds: one photon is a blob of a few pixels), plus Gaussian read
noise and an offset, rounded to uint16.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


class Canvas:
    """A float32 occupancy volume covering a session's field plus ``pad`` voxels on every side.

    Objects are drawn in batches (one row per object), each evaluated analytically over its bounding
    box (all boxes of a batch at once, as one ragged array), combined by maximum (a union of
    overlapping parts counts once) and weighted by their dye concentration. Positions are µm in the
    session frame.
    """

    #: voxels evaluated at once; bounds the temporary memory of a batch
    chunk_voxels = 1 << 20

    def __init__(self, shape: tuple[int, int, int], voxel_um: np.ndarray, pad: np.ndarray):
        self.voxel = np.asarray(voxel_um, float)
        self.pad = np.asarray(pad, int)
        self.data = np.zeros(tuple(np.asarray(shape) + 2 * self.pad), np.float32)
        self._edge = 0.6 * self.voxel   # the soft edge reaches half a voxel beyond a surface

    def _chunks(self, lo_um: np.ndarray, hi_um: np.ndarray):
        """Boxes (voxel index ``lo``, ``hi``) of objects that touch the canvas, in chunks of objects,
        and whether each box lies whole inside the canvas."""
        lo = np.ceil(lo_um / self.voxel).astype(np.int64) + self.pad
        hi = np.floor(hi_um / self.voxel).astype(np.int64) + self.pad + 1
        whole = np.all((lo >= 0) & (hi <= self.data.shape), axis=1)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, self.data.shape)
        keep = np.flatnonzero(np.all(hi > lo, axis=1))
        sizes = np.prod(hi[keep] - lo[keep], axis=1)
        cut = np.searchsorted(np.cumsum(sizes), np.arange(1, 1 + sizes.sum() // self.chunk_voxels) * self.chunk_voxels)
        for part in np.split(keep, np.unique(cut)):
            if len(part):
                yield part, lo[part], hi[part], whole[part]

    def _ragged_grid(self, lo: np.ndarray, hi: np.ndarray):
        """Every voxel of every box: owning box (M,), flat canvas index (M,), and z, y, x in µm (M,)."""
        index = np.int32 if self.data.size < 2**31 else np.int64
        dims = (hi - lo).astype(index)
        n = np.prod(dims, axis=1)
        box = np.repeat(np.arange(len(n), dtype=index), n)
        local = np.arange(n.sum(), dtype=index) - np.repeat(np.cumsum(n) - n, n)
        nyx = np.repeat(dims[:, 1] * dims[:, 2], n)
        nx = np.repeat(dims[:, 2], n)
        iz = local // nyx
        rest = local - iz * nyx
        iy = rest // nx
        ix = rest - iy * nx
        lo = lo.astype(index)
        iz += lo[box, 0]
        iy += lo[box, 1]
        ix += lo[box, 2]
        shape = self.data.shape
        flat = (iz * index(shape[1]) + iy) * index(shape[2]) + ix
        coords = [(i - index(self.pad[a])).astype(np.float32) * np.float32(self.voxel[a])
                  for a, i in enumerate((iz, iy, ix))]
        return box, flat, coords

    def _blend(self, box, flat, sd, normal, weight, volume_um3, whole) -> None:
        """Occupancy from a signed distance, combined into the canvas.

        A soft edge one voxel wide along the surface normal gives partial volumes; objects thinner
        than a (coarse z) voxel would still come out too big, so each object whole inside the canvas
        is scaled to its true ``volume_um3``: after the PSF blur, what counts is its mass.
        """
        nz, ny, nx = normal
        v2 = (self.voxel**2).astype(np.float32)
        h = np.sqrt((nz * nz * v2[0] + ny * ny * v2[1] + nx * nx * v2[2]) / (nz * nz + ny * ny + nx * nx + 1e-12))
        np.maximum(h, np.float32(0.5 * self.voxel.min()), out=h)
        occ = np.clip(np.float32(0.5) - sd / h, 0.0, 1.0)
        raster = np.bincount(box, weights=occ, minlength=len(weight)) * np.prod(self.voxel)
        scale = np.where(whole & (raster > 0), volume_um3 / np.maximum(raster, 1e-12), 1.0)
        occ *= (weight * np.clip(scale, 0.0, 1.5)).astype(np.float32)[box]
        np.maximum.at(self.data.reshape(-1), flat, occ)

    def capsules(self, p0, p1, r0, r1, weight) -> None:
        """Tubes from ``p0`` (N, 3; radius ``r0``) to ``p1`` (radius ``r1``) with round ends."""
        p0, p1 = np.atleast_2d(p0).astype(float), np.atleast_2d(p1).astype(float)
        r0, r1, weight = (np.broadcast_to(np.asarray(a, float), (len(p0),)) for a in (r0, r1, weight))
        margin = np.maximum(r0, r1)[:, None] + self._edge
        length = np.linalg.norm(p1 - p0, axis=1)
        mean_r = 0.5 * (r0 + r1)   # a truncated cone with round ends
        volume = np.pi * length * (r0 * r0 + r0 * r1 + r1 * r1) / 3 + 2 / 3 * np.pi * (r0**3 + r1**3)
        volume = np.where(length > 0, volume, 4 / 3 * np.pi * mean_r**3)
        for part, lo, hi, whole in self._chunks(np.minimum(p0, p1) - margin, np.maximum(p0, p1) + margin):
            box, flat, (z, y, x) = self._ragged_grid(lo, hi)
            a = p0[part].astype(np.float32)[box]
            d = (p1[part] - p0[part]).astype(np.float32)
            dd = np.sum(d * d, axis=1)
            inv = (1.0 / np.maximum(dd, 1e-12) * (dd > 1e-12)).astype(np.float32)[box]
            d = d[box]
            z -= a[:, 0]
            y -= a[:, 1]
            x -= a[:, 2]
            t = np.clip((z * d[:, 0] + y * d[:, 1] + x * d[:, 2]) * inv, 0.0, 1.0)
            z -= t * d[:, 0]
            y -= t * d[:, 1]
            x -= t * d[:, 2]
            radius = r0[part].astype(np.float32)[box] + (r1[part] - r0[part]).astype(np.float32)[box] * t
            sd = np.sqrt(z * z + y * y + x * x) - radius
            self._blend(box, flat, sd, (z, y, x), weight[part], volume[part], whole)

    def ellipsoids(self, centre, axes, radii, weight) -> None:
        """Ellipsoids: ``centre`` (N, 3), ``axes`` (N, 3, 3) unit vectors as rows, ``radii`` (N, 3) µm."""
        centre, radii = np.atleast_2d(centre).astype(float), np.atleast_2d(radii).astype(float)
        axes = np.asarray(axes, np.float32).reshape(-1, 3, 3)
        weight = np.broadcast_to(np.asarray(weight, float), (len(centre),))
        margin = radii.max(axis=1)[:, None] + self._edge
        volume = 4 / 3 * np.pi * np.prod(radii, axis=1)
        for part, lo, hi, whole in self._chunks(centre - margin, centre + margin):
            box, flat, (z, y, x) = self._ragged_grid(lo, hi)
            c = centre[part].astype(np.float32)[box]
            z -= c[:, 0]
            y -= c[:, 1]
            x -= c[:, 2]
            a = axes[part][box]                                            # (M, 3, 3)
            inv_r = (1.0 / radii[part]).astype(np.float32)[box]            # (M, 3)
            q = [(z * a[:, k, 0] + y * a[:, k, 1] + x * a[:, k, 2]) * inv_r[:, k] for k in range(3)]  # q / r
            k0 = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
            g = [q[k] * inv_r[:, k] for k in range(3)]                     # gradient of k0^2 / 2, local frame
            k1 = np.sqrt(g[0] * g[0] + g[1] * g[1] + g[2] * g[2]) + np.float32(1e-12)
            sd = k0 * (k0 - 1.0) / k1                                      # ~ signed distance (µm)
            normal = [g[0] * a[:, 0, j] + g[1] * a[:, 1, j] + g[2] * a[:, 2, j] for j in range(3)]
            self._blend(box, flat, sd, normal, weight[part], volume[part], whole)


def psf_sigma_vox(psf_fwhm_z_um: float, psf_fwhm_xy_um: float, voxel_um) -> np.ndarray:
    """Gaussian PSF sigmas in voxels, z y x."""
    return np.array([psf_fwhm_z_um, psf_fwhm_xy_um, psf_fwhm_xy_um]) / FWHM_PER_SIGMA / np.asarray(voxel_um)


def blur_and_crop(canvas: Canvas, sigma_vox: np.ndarray) -> np.ndarray:
    """The canvas blurred with the PSF, cropped to the field (float32). Separable, cropping each
    axis's padding as soon as it has been used."""
    out, p = canvas.data, canvas.pad
    for axis in range(3):
        out = ndi.gaussian_filter1d(out, sigma_vox[axis], axis=axis, mode="constant", truncate=3.0)
        out = out[(slice(None),) * axis + (slice(p[axis], out.shape[axis] - p[axis]),)]
    return out


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation, cell-centre aligned, edges held (like ``grid_mode=True``)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.minimum(pos.astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1 - (pos - lo))
    np.add.at(m, (np.arange(n_out), hi), pos - lo)
    return m


def _resize(a: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear up-sampling of a small 3D array: three small matrix products (zoom is slow)."""
    mz, my, mx = (_interpolation_matrix(n, m) for n, m in zip(shape, a.shape, strict=True))
    out = (mz @ a.astype(np.float32).reshape(a.shape[0], -1)).reshape(shape[0], *a.shape[1:])  # (Z, b, c)
    out = np.einsum("yb,zbc->zyc", my, out)                                                   # (Z, Y, c)
    return (out.reshape(-1, a.shape[2]) @ mx.T).reshape(shape)   # 2D: a batched matmul is much slower


def haze_and_background(rng: np.random.Generator, signal: np.ndarray, voxel_um, *, haze_fwhm_um: tuple[float, float],
                        haze_photons: float, background_photons: float, background_variation: float) -> np.ndarray:
    """Expected photons of out-of-focus haze and of autofluorescence, float32 like ``signal``.

    Haze: the wide wings of a real two-photon PSF (aberrations, scattering) that a Gaussian core
    lacks, i.e. ``signal`` blurred further to ``haze_fwhm_um`` (z, xy), times ``haze_photons``.
    Background: a positive field of mean ``background_photons`` varying smoothly (log-normal,
    coefficient of variation ~ ``background_variation``). Both on a coarse grid, up-sampled once.
    """
    voxel = np.asarray(voxel_um, float)
    sigma_um = np.array([haze_fwhm_um[0], haze_fwhm_um[1], haze_fwhm_um[1]]) / FWHM_PER_SIGMA
    step = np.maximum(1, np.floor(sigma_um / voxel / 2.0)).astype(int)
    coarse_shape = tuple(-(-n // k) for n, k in zip(signal.shape, step, strict=True))
    low = np.zeros(coarse_shape, np.float32)
    if haze_photons > 0:
        coarse = signal[:: step[0], :: step[1], :: step[2]]
        low += ndi.gaussian_filter(coarse, sigma_um / (voxel * step), mode="nearest", truncate=3.0)
        low *= np.float32(haze_photons)
    if background_photons > 0:
        pattern = rng.normal(0.0, background_variation, (3, 5, 5)) - 0.5 * background_variation**2
        low += _resize(np.exp(pattern), coarse_shape) * np.float32(background_photons)
    return _resize(low, signal.shape)


def detect(rng: np.random.Generator, photons: np.ndarray, *, gain_adu_per_photon: float, pmt_gain_cv: float,
           noise_smoothing_px: float, read_noise_adu: float, offset_adu: float) -> np.ndarray:
    """Expected photons -> uint16 ADU: Poisson counts, PMT pulse heights, xy low-pass, read noise, offset."""
    counts = rng.poisson(photons).astype(np.float32)
    if pmt_gain_cv > 0:
        shape = 1.0 / pmt_gain_cv**2   # a sum of n gamma(k) pulses is gamma(n k)
        hit = np.flatnonzero(counts)
        pulses = counts.reshape(-1)
        pulses[hit] = rng.gamma(pulses[hit] * shape).astype(np.float32) * np.float32(1.0 / shape)
    adu = counts
    adu *= np.float32(gain_adu_per_photon)
    if noise_smoothing_px > 0:
        adu = ndi.gaussian_filter(adu, (0, noise_smoothing_px, noise_smoothing_px), mode="nearest", truncate=3.0)
    if read_noise_adu > 0:
        noise = rng.standard_normal(adu.shape, dtype=np.float32)
        noise *= np.float32(read_noise_adu)
        adu += noise
    adu += np.float32(offset_adu + 0.5)   # + 0.5 then truncation = rounding
    np.clip(adu, 0, 65535, out=adu)
    return adu.astype(np.uint16)
