"""Geometry and dynamics of the synthetic tissue (DESIGN §5), in µm, independent of any voxel grid.

The world is a box a little larger than the imaged field (so that drift brings content in and out),
holding dendritic shafts (smooth 3D tubes), their spines (neck + head), shaft varicosities, and thin
axons with boutons. Each spine has a lifetime (gain and loss), a head radius per session and a
direction that may point sideways or up/down in z. Sessions see this world through a rigid drift,
an optional small rotation in the imaging plane (re-mounting the animal) and a small smooth
deformation (:class:`SessionWarp`).

Coordinates are always ``z, y, x`` in µm; the voxel ``(0, 0, 0)`` of a session's image sits at
``(0, 0, 0)`` µm of that session's frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPINE_KINDS = ("thin", "stubby", "mushroom", "filopodium")

# Per kind: head radius and neck length as windows of quantiles of the configured ranges (a
# filopodium's neck goes beyond the range; its "head" is a tip at the low end of the head range; a
# stubby spine has almost no neck, see _draw_spines_on), head semi-axis factors along / across the
# spine axis, and relative turnover (filopodia are the most dynamic, mushroom spines the most stable;
# normalised to the kind mix so that the configured rates hold on average).
_HEAD_QUANTILES = {"thin": (0.0, 0.45), "stubby": (0.25, 0.75), "mushroom": (0.5, 1.0), "filopodium": (0.0, 0.0)}
_NECK_QUANTILES = {"thin": (0.35, 1.0), "stubby": (0.0, 0.0), "mushroom": (0.1, 0.6), "filopodium": (1.0, 2.0)}
_HEAD_SHAPE = {"thin": (1.0, 1.0), "stubby": (0.85, 1.05), "mushroom": (0.85, 1.1), "filopodium": (1.0, 1.0)}
_TURNOVER = {"thin": 1.5, "stubby": 0.8, "mushroom": 0.4, "filopodium": 3.0}

def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _perpendiculars(tangent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit normals of each tangent: ``n_lat`` in the imaging plane, ``n_up`` mostly along z."""
    lateral = np.stack([np.zeros(len(tangent)), tangent[:, 2], -tangent[:, 1]], axis=1)
    small = np.linalg.norm(lateral, axis=1) < 1e-6  # a tangent along z: any lateral direction will do
    lateral[small] = (0.0, 1.0, 0.0)
    n_lat = _unit(lateral)
    return n_lat, _unit(np.cross(tangent, n_lat))


def _smooth_wiggle(rng: np.random.Generator, s: np.ndarray, amplitude: float, wavelengths: tuple[float, float],
                   modes: int = 3) -> np.ndarray:
    """A smooth random 1D function of arc length ``s``: a few sinusoids, RMS about ``amplitude``."""
    out = np.zeros_like(s)
    for _ in range(modes):
        lam = rng.uniform(*wavelengths)
        out += rng.normal(0.0, 1.0) * np.sin(2 * np.pi * s / lam + rng.uniform(0, 2 * np.pi))
    return out * amplitude * np.sqrt(2.0 / modes)


@dataclass
class Tube:
    """A smooth tube: centreline points (N, 3) µm every ``step_um``, radius (N,) µm."""

    points: np.ndarray
    radius: np.ndarray
    step_um: float

    def at(self, s_um: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point, unit tangent and radius at arc lengths ``s_um`` (linear interpolation)."""
        f = np.clip(np.asarray(s_um) / self.step_um, 0, len(self.points) - 1.000001)
        i = f.astype(int)
        w = (f - i)[:, None]
        point = self.points[i] * (1 - w) + self.points[i + 1] * w
        tangent = _unit(self.points[i + 1] - self.points[i])
        radius = self.radius[i] * (1 - w[:, 0]) + self.radius[i + 1] * w[:, 0]
        return point, tangent, radius

    @property
    def length_um(self) -> float:
        return self.step_um * (len(self.points) - 1)


@dataclass
class Spines:
    """All spines ever present, one entry each (arrays of length S). Per-session arrays are (T, S)."""

    dendrite: np.ndarray        # (S,) index of the parent dendrite
    kind: np.ndarray            # (S,) index into SPINE_KINDS
    base: np.ndarray            # (S, 3) point on the shaft axis where the neck starts
    direction: np.ndarray       # (S, 3) unit vector from the shaft to the head
    bend: np.ndarray            # (S, 3) offset of the neck's middle from the straight line, µm
    shaft_radius: np.ndarray    # (S,)
    neck_length: np.ndarray     # (S,) from the shaft surface to the head surface, µm
    neck_radius: np.ndarray     # (S,)
    head_shape: np.ndarray      # (S, 2) head semi-axis factors along / across the spine axis
    brightness: np.ndarray      # (S,) dye concentration relative to the shaft
    birth: np.ndarray           # (S,) first session in which the spine exists
    death: np.ndarray           # (S,) first session in which it no longer exists (T if never)
    head_radius: np.ndarray     # (T, S) equivalent head radius per session, µm

    def head_centre(self, t: int) -> np.ndarray:
        """(S, 3) head centres in world µm in session ``t``."""
        reach = self.shaft_radius + self.neck_length + self.head_radius[t] * self.head_shape[:, 0]
        return self.base + self.direction * reach[:, None]

    def exists(self, t: int) -> np.ndarray:
        return (self.birth <= t) & (t < self.death)


@dataclass
class Blobs:
    """Ellipsoids (varicosities, boutons): centre (N, 3), unit axes (N, 3, 3) as rows, radii (N, 3)."""

    centre: np.ndarray
    axes: np.ndarray
    radii: np.ndarray
    brightness: np.ndarray
    kind: list[str]


@dataclass
class World:
    extent_um: np.ndarray       # (3,) size of the imaged field, z y x
    dendrites: list[Tube]
    axons: list[Tube]
    axon_brightness: np.ndarray
    spines: Spines
    blobs: Blobs


# ----------------------------------------------------------------------------------------------------
# generation


def _random_line(rng, extent, margin, z_slope_max, centre_spread, near: np.ndarray | None = None):
    """Centre and unit direction of a straight line crossing the field, mostly in the imaging plane."""
    if near is None:
        centre = extent * np.array([rng.uniform(0.5 - centre_spread[0], 0.5 + centre_spread[0]),
                                    *rng.uniform(0.5 - centre_spread[1], 0.5 + centre_spread[1], 2)])
    else:
        centre = near + rng.normal(0, [0.6, 1.5, 1.5])
    angle = rng.uniform(0, np.pi)
    direction = _unit(np.array([rng.uniform(-z_slope_max, z_slope_max), np.sin(angle), np.cos(angle)]))
    half_length = 0.5 * float(np.hypot(extent[1], extent[2])) + margin
    return centre, direction, half_length


def _tube_along(rng, centre, direction, half_length, radius, bend_um, radius_variation, step_um=0.25):
    s = np.arange(-half_length, half_length + step_um, step_um)
    n_lat, n_up = _perpendiculars(direction[None])
    # meanders that pass through ``centre`` itself, so a small field still holds the tube
    lateral = _smooth_wiggle(rng, s, bend_um, (12.0, 40.0))
    vertical = _smooth_wiggle(rng, s, 0.3 * bend_um, (15.0, 40.0))
    lateral -= np.interp(0.0, s, lateral)
    vertical -= np.interp(0.0, s, vertical)
    points = centre + s[:, None] * direction + lateral[:, None] * n_lat + vertical[:, None] * n_up
    r = radius * (1 + _smooth_wiggle(rng, s, radius_variation, (3.0, 12.0)))
    return Tube(points=points, radius=np.clip(r, 0.5 * radius, 1.6 * radius), step_um=step_um)


def _draw_spines_on(rng, cfg, tube: Tube, count: int, kind_p: np.ndarray, taken: list[np.ndarray]) -> dict:
    """``count`` spines at random places along ``tube`` (arrays by name), their heads kept at least
    0.3 µm apart from each other and from the heads already ``taken`` (rows ``z, y, x, radius``)."""
    kind = rng.choice(len(SPINE_KINDS), size=count, p=kind_p)
    names = [SPINE_KINDS[k] for k in kind]
    u = rng.random((count, 2))
    lo_h, hi_h = cfg.head_radius_um_range
    lo_n, hi_n = cfg.neck_length_um_range
    head_q = np.array([_HEAD_QUANTILES[n] for n in names]).reshape(count, 2)
    neck_q = np.array([_NECK_QUANTILES[n] for n in names]).reshape(count, 2)
    head_r = lo_h + (hi_h - lo_h) * (head_q[:, 0] + (head_q[:, 1] - head_q[:, 0]) * u[:, 0])
    neck_len = lo_n + (hi_n - lo_n) * (neck_q[:, 0] + (neck_q[:, 1] - neck_q[:, 0]) * u[:, 1])
    neck_r = rng.uniform(*cfg.neck_radius_um_range, count)
    is_filo = kind == SPINE_KINDS.index("filopodium")
    is_stubby = kind == SPINE_KINDS.index("stubby")
    # filopodia: a long thin protrusion whose "head" is its tip; stubby: a wide neckless bump
    head_r[is_filo] = lo_h * rng.uniform(0.8, 1.0, is_filo.sum())
    neck_r[is_filo] = np.minimum(neck_r[is_filo], 0.7 * head_r[is_filo])
    neck_len[is_stubby] = 0.15 * u[is_stubby, 1]
    neck_r[is_stubby] = head_r[is_stubby] * rng.uniform(0.6, 0.85, is_stubby.sum())
    shape = np.array([_HEAD_SHAPE[n] for n in names]).reshape(count, 2)

    attempts = 6
    s = rng.uniform(0, tube.length_um, (attempts, count))
    phi = rng.uniform(0, 2 * np.pi, (attempts, count))     # all around the shaft: some point up or down in z
    tilt = np.tan(np.deg2rad(rng.uniform(-25, 25, (attempts, count))))
    base, tangent, shaft_r = tube.at(s.ravel())
    n_lat, n_up = _perpendiculars(tangent)
    direction = _unit(np.cos(phi.ravel())[:, None] * n_lat + np.sin(phi.ravel())[:, None] * n_up
                      + tilt.ravel()[:, None] * tangent)
    reach = shaft_r + np.tile(neck_len + head_r * shape[:, 0], attempts)
    head = (base + direction * reach[:, None]).reshape(attempts, count, 3)

    chosen = np.full(count, -1)
    before = np.concatenate(taken) if taken else np.zeros((0, 4))
    placed = np.concatenate([before, np.zeros((count, 4))])
    n = len(before)
    for i in range(count):
        # all attempts at once: the first whose head clears every placed head by 0.3 µm
        gap = (np.linalg.norm(head[:, i, None, :] - placed[None, :n, :3], axis=2) - placed[None, :n, 3]
               - head_r[i])
        ok = np.flatnonzero(gap.min(axis=1, initial=np.inf) > 0.3)
        if len(ok):
            chosen[i] = ok[0]
            placed[n] = (*head[ok[0], i], head_r[i])
            n += 1
    keep = np.flatnonzero(chosen >= 0)
    flat = chosen[keep] * count + keep
    taken.append(placed[len(before):n])
    side = _unit(np.cross(direction[flat], rng.normal(size=(len(keep), 3))))
    return dict(
        kind=kind[keep], base=base[flat], direction=direction[flat], shaft_radius=shaft_r[flat],
        bend=side * (rng.uniform(0, 0.2, len(keep)) * neck_len[keep])[:, None],
        neck_length=neck_len[keep], neck_radius=neck_r[keep], head_shape=shape[keep], head_radius=head_r[keep],
        brightness=rng.uniform(*cfg.spine_brightness_range, len(keep)),
    )


def _lifetimes(rng, cfg, kinds: np.ndarray, births: np.ndarray, kind_p: np.ndarray) -> np.ndarray:
    """First session in which each spine no longer exists (``sessions`` if it survives)."""
    mean_turnover = float(np.dot(kind_p, [_TURNOVER[k] for k in SPINE_KINDS]))
    p_loss = np.clip(cfg.spine_loss_probability * np.array([_TURNOVER[SPINE_KINDS[k]] for k in kinds])
                     / max(mean_turnover, 1e-9), 0, 1)
    sessions_lived = rng.geometric(np.maximum(p_loss, 1e-12))   # a loss chance at every later session
    return np.minimum(births + sessions_lived, cfg.sessions)


def _head_radius_series(rng, cfg, base_radius: np.ndarray) -> np.ndarray:
    """(T, S) head radius per session: a mean-reverting random walk of relative size changes."""
    eps = np.zeros(len(base_radius))
    out = np.empty((cfg.sessions, len(base_radius)))
    sigma = cfg.head_radius_change_fraction
    for t in range(cfg.sessions):
        eps = 0.6 * eps + rng.normal(0, sigma, len(base_radius)) if t else rng.normal(0, 0.5 * sigma, len(eps))
        out[t] = base_radius * np.exp(eps)
    lo = np.minimum(0.5 * cfg.head_radius_um_range[0], base_radius)
    return np.clip(out, lo, 1.3 * cfg.head_radius_um_range[1])


def _varicosities(rng, cfg, tube: Tube) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    n = rng.poisson(cfg.varicosity_density_per_um * tube.length_um)
    out = []
    for s in rng.uniform(0, tube.length_um, n):
        centre, tangent, r = (a[0] for a in tube.at(np.array([s])))
        n_lat, n_up = (a[0] for a in _perpendiculars(tangent[None]))
        across = r * rng.uniform(1.4, 1.9)
        out.append((centre, np.stack([tangent, n_lat, n_up]), np.array([rng.uniform(0.5, 1.1), across, across])))
    return out


def build_world(cfg, rng: np.random.Generator) -> World:
    """Draw the whole tissue for a series from ``cfg`` (a SynthConfig). Depends only on the field in µm."""
    extent = np.asarray(cfg.shape, float) * np.asarray(cfg.voxel_size_um, float)
    max_drift = 3.0 * cfg.drift_um   # session_warps keeps the walk within ~1.5 steps of the start
    margin = 3.0 + max_drift + 2 * cfg.deformation_um + _rotation_reach_um(cfg)
    kind_p = np.asarray(cfg.spine_kind_fractions, float)
    kind_p = kind_p / kind_p.sum()

    dendrites = []
    for _ in range(cfg.dendrites):
        centre, direction, half = _random_line(rng, extent, margin, cfg.shaft_z_slope_max, (0.1, 0.2))
        radius = rng.uniform(*cfg.shaft_radius_um_range)
        dendrites.append(_tube_along(rng, centre, direction, half, radius, cfg.shaft_bend_um, 0.12))

    parts, taken = [], []
    for d, tube in enumerate(dendrites):
        n0 = rng.poisson(cfg.spine_density_per_um * tube.length_um)
        for t in range(cfg.sessions):   # the first session's spines, then those gained in each later one
            count = n0 if t == 0 else rng.poisson(cfg.spine_gain_probability * n0)
            new = _draw_spines_on(rng, cfg, tube, count, kind_p, taken)
            n = len(new["kind"])
            parts.append(dict(new, dendrite=np.full(n, d), birth=np.full(n, t)))

    def col(name):
        return np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)

    kinds = col("kind").astype(int)
    births = col("birth").astype(int)
    spines = Spines(
        dendrite=col("dendrite").astype(int), kind=kinds,
        base=col("base").reshape(-1, 3), direction=col("direction").reshape(-1, 3), bend=col("bend").reshape(-1, 3),
        shaft_radius=col("shaft_radius"), neck_length=col("neck_length"), neck_radius=col("neck_radius"),
        head_shape=col("head_shape").reshape(-1, 2), brightness=col("brightness"), birth=births,
        death=_lifetimes(rng, cfg, kinds, births, kind_p),
        head_radius=_head_radius_series(rng, cfg, col("head_radius")),
    )

    blobs = [(c, a, r, 1.0, "varicosity") for tube in dendrites for c, a, r in _varicosities(rng, cfg, tube)]
    axons, axon_brightness = [], []
    for i in range(cfg.axons):
        near = None
        if cfg.axons_near_dendrites and dendrites:
            tube = dendrites[i % len(dendrites)]
            near = tube.at(np.array([rng.uniform(0.35, 0.65) * tube.length_um]))[0][0]
        centre, direction, half = _random_line(rng, extent, margin, 2 * cfg.shaft_z_slope_max, (0.35, 0.45), near)
        tube = _tube_along(rng, centre, direction, half, rng.uniform(*cfg.axon_radius_um_range),
                           0.6 * cfg.shaft_bend_um, 0.05)
        axons.append(tube)
        brightness = rng.uniform(*cfg.axon_brightness_range)
        axon_brightness.append(brightness)
        for s in rng.uniform(0, tube.length_um, rng.poisson(cfg.bouton_density_per_um * tube.length_um)):
            c, tangent, _ = (a[0] for a in tube.at(np.array([s])))
            n_lat, n_up = (a[0] for a in _perpendiculars(tangent[None]))
            radius = rng.uniform(*cfg.bouton_radius_um_range)
            radii = radius * np.array([rng.uniform(1.0, 1.6), 1.0, rng.uniform(0.8, 1.0)])
            blobs.append((c, np.stack([tangent, n_lat, n_up]), radii, brightness * rng.uniform(1.0, 1.4), "bouton"))

    return World(
        extent_um=extent, dendrites=dendrites, axons=axons, axon_brightness=np.array(axon_brightness),
        spines=spines,
        blobs=Blobs(
            centre=np.array([b[0] for b in blobs]).reshape(-1, 3),
            axes=np.array([b[1] for b in blobs]).reshape(-1, 3, 3),
            radii=np.array([b[2] for b in blobs]).reshape(-1, 3),
            brightness=np.array([b[3] for b in blobs], float),
            kind=[b[4] for b in blobs],
        ),
    )


# ----------------------------------------------------------------------------------------------------
# sessions: rigid drift, a small rotation in y, x and a small smooth deformation


def _field_centre_um(cfg) -> np.ndarray:
    return 0.5 * (np.asarray(cfg.shape, float) - 1) * np.asarray(cfg.voxel_size_um, float)


def _rotation_reach_um(cfg) -> float:
    """How far the largest rotation moves the corners of the field (0 without rotation)."""
    if cfg.rotation_deg <= 0:
        return 0.0
    half = _field_centre_um(cfg)[1:]
    return float(np.hypot(*half) * 2 * np.sin(np.radians(cfg.rotation_deg) / 2))


@dataclass
class SessionWarp:
    """Maps world µm to a session's frame: ``R (p + deformation(p) - c) + c + drift``, where ``R``
    turns y, x by ``rotation_rad`` about the field centre ``c`` (z is untouched)."""

    drift_um: np.ndarray        # (3,)
    wavevectors: np.ndarray     # (K, 3) cycles per µm
    phases: np.ndarray          # (K,)
    amplitudes: np.ndarray      # (K, 3) µm
    rotation_rad: float = 0.0
    centre_um: np.ndarray | None = None   # (3,); the rotation's centre

    def __call__(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, float)
        if len(self.phases):
            arg = 2 * np.pi * points @ self.wavevectors.T + self.phases
            points = points + np.sin(arg) @ self.amplitudes
        if self.rotation_rad:
            centre = np.zeros(3) if self.centre_um is None else np.asarray(self.centre_um, float)
            c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
            rel = points - centre
            points = centre + np.stack([rel[..., 0], c * rel[..., 1] - s * rel[..., 2],
                                        s * rel[..., 1] + c * rel[..., 2]], axis=-1)
        return points + self.drift_um


def session_warps(cfg, rng: np.random.Generator) -> list[SessionWarp]:
    """One warp per session. Drift starts at zero; each step's xy length is ``drift_um`` x U(0.5, 1.5)
    in a random direction, its z part ``drift_z_um`` x U(-1, 1). Each session is re-centred on the same
    dendrite, so the walk is kept within ~1.5 steps of the start: a step that would leave that range
    is taken backwards instead. With ``rotation_deg`` > 0, each session after the first is also turned
    about the field centre by an angle drawn from U(-1, 1) x ``rotation_deg`` (each session is
    mounted anew, so the angles do not add up); these angles are drawn after everything else, so a
    series without rotation is the same as before rotation existed."""
    warps, drift = [], np.zeros(3)
    for t in range(cfg.sessions):
        if t:
            angle = rng.uniform(0, 2 * np.pi)
            length = cfg.drift_um * rng.uniform(0.5, 1.5)
            step = np.array([cfg.drift_z_um * rng.uniform(-1, 1), length * np.sin(angle), length * np.cos(angle)])
            for axes, bound in (([1, 2], 1.5 * cfg.drift_um), ([0], 1.5 * cfg.drift_z_um)):
                if np.linalg.norm(drift[axes] + step[axes]) > bound and (
                        np.linalg.norm(drift[axes] - step[axes]) < np.linalg.norm(drift[axes] + step[axes])):
                    step[axes] = -step[axes]
            drift = drift + step
        k = 4 if cfg.deformation_um > 0 else 0
        directions = _unit(rng.normal(size=(k, 3)) * [0.3, 1.0, 1.0]) if k else np.zeros((0, 3))
        wavelength = cfg.deformation_scale_um * rng.uniform(0.7, 1.4, k)
        amplitudes = rng.normal(0, cfg.deformation_um / np.sqrt(k / 2), (k, 3)) * [0.5, 1, 1] if k else np.zeros((0, 3))
        warps.append(SessionWarp(drift.copy(), directions / wavelength[:, None] if k else directions,
                                 rng.uniform(0, 2 * np.pi, k), amplitudes))
    if cfg.rotation_deg > 0:
        angles = np.radians(cfg.rotation_deg) * rng.uniform(-1, 1, cfg.sessions)
        for t, warp in enumerate(warps[1:], start=1):
            warp.rotation_rad, warp.centre_um = float(angles[t]), _field_centre_um(cfg)
    return warps
