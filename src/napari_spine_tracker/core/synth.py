"""The synthetic two-photon data engine (DESIGN §5): chronic series of spiny dendrites with truth.

``synthesize_series(SynthConfig.preset("default"))`` returns a :class:`SynthSeries`: a
``(T, Z, Y, X)`` uint16 image like a real two-photon stack, the spine table of truth (one row per
spine visible in a session, head centre in that session's own voxel grid), the distractors
(varicosities, axonal boutons) and the rigid drift of each session. Every physical parameter lives
in :class:`SynthConfig`, with its unit in its name; :meth:`SynthConfig.random` draws them all from
wide ranges for training (domain randomisation). The geometry and dynamics are in
``synth_geometry``, the optics and detector in ``synth_render``.

Truth semantics (the model and the metrics rely on them):

- a row per spine *visible* in a session, ``z, y, x`` its head centre in voxels of that session's
  image (drift applied); only heads whose centre lies inside the volume (``0 <= z <= Z - 1`` ...);
- ``track_id`` (1..N) persists across sessions; a spine gained appears from some session on, a lost
  one disappears for good. A transient miss (the spine exists but is dimmed out of sight) removes
  its row for one session strictly inside its run of visible sessions, so existence is the rows with
  single-session gaps filled. A spine that leaves the field and comes back keeps its id if it was
  out of sight for at most :data:`KEPT_ID_GAP` (2) sessions, the gap over which the tracker is asked
  to keep an id ("a spine missed in one or two sessions keeps its id"), and gets a new id after a
  longer absence;
- ``head_radius_um`` changes a little between sessions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import InputError
from . import synth_render as render
from .synth_geometry import SPINE_KINDS, SessionWarp, World, build_world, session_warps

Range = tuple[float, float]

#: sessions a spine may be out of sight (outside the field) and keep its track id in the truth: the
#: gap the tracker is asked to close (``link.DEFAULT_MAX_GAP``). A longer absence starts a new id.
KEPT_ID_GAP = 2


@dataclass(frozen=True)
class SynthConfig:
    """Every parameter of a synthetic series. Lengths in µm, intensities in photons or ADU.

    Ranges are ``(low, high)``; each object draws uniformly from them. Per-session changes are
    log-normal with the given fractional spread. :data:`PRESETS` names useful sets; the defaults are
    tuned to a real two-photon stack (``benchmarks/realism.py``). Immutable: use :meth:`replace`, :meth:`preset` or
    :meth:`random`.
    """

    seed: int = 0
    sessions: int = 6                                           # T
    shape: tuple[int, int, int] = (32, 256, 256)                # Z, Y, X voxels
    voxel_size_um: tuple[float, float, float] = (0.5, 0.1, 0.1)  # z, y, x
    # optics: Gaussian PSF (full width at half maximum)
    psf_fwhm_xy_um: float = 0.30
    psf_fwhm_z_um: float = 2.5
    # photons: expected count per pixel inside a large uniformly labelled region (session 0 scale)
    brightness_photons: float = 85.0
    background_photons: float = 0.05          # autofluorescence per pixel, mean
    background_variation: float = 0.3         # coefficient of variation of its smooth spatial pattern
    haze_fraction: float = 0.45               # light in the PSF's wide wings (out-of-focus haze)
    haze_fwhm_xy_um: float = 1.3              # width of those wings
    haze_fwhm_z_um: float = 8.0
    # detector: PMT with random pulse heights, low-pass along the scan, read noise, offset
    gain_adu_per_photon: float = 93.0
    pmt_gain_cv: float = 0.45
    noise_smoothing_px: float = 1.0           # Gaussian sigma in pixels (y and x) of the detector low-pass
    read_noise_adu: float = 0.5
    offset_adu: float = 153.0
    # dendrites
    dendrites: int = 1
    shaft_radius_um_range: Range = (0.25, 0.4)
    shaft_bend_um: float = 1.0                # RMS lateral meander of a shaft
    shaft_z_slope_max: float = 0.12           # |dz / dl| of a shaft's course, at most
    # spines
    spine_density_per_um: float = 0.9
    spine_kind_fractions: tuple[float, float, float, float] = (0.5, 0.1, 0.35, 0.05)  # see SPINE_KINDS
    head_radius_um_range: Range = (0.22, 0.5)
    neck_length_um_range: Range = (0.3, 1.6)  # shaft surface to head surface
    neck_radius_um_range: Range = (0.08, 0.15)
    spine_brightness_range: Range = (1.3, 2.2)  # dye concentration relative to the shaft
    # distractors
    varicosity_density_per_um: float = 0.04   # swellings of the shaft
    axons: int = 1                            # thin axons crossing the field
    axons_near_dendrites: bool = False        # run them right past the dendrites (crowded neuropil)
    axon_radius_um_range: Range = (0.08, 0.16)
    axon_brightness_range: Range = (0.4, 1.0)
    bouton_density_per_um: float = 0.12
    bouton_radius_um_range: Range = (0.25, 0.55)
    # over sessions
    spine_gain_probability: float = 0.06      # new spines per session, as a fraction of the first count
    spine_loss_probability: float = 0.06      # chance that a spine is gone in the next session
    transient_miss_probability: float = 0.03  # chance that a spine is out of sight for one session
    head_radius_change_fraction: float = 0.1  # relative head-size change between sessions
    drift_um: float = 1.0                     # xy length of the rigid translation between sessions
    drift_z_um: float = 0.5                   # z part of that translation, at most
    deformation_um: float = 0.2               # RMS of a smooth non-rigid displacement per session
    deformation_scale_um: float = 20.0        # its wavelength
    rotation_deg: float = 0.0                 # in-plane (y, x) rotation of a session, at most (re-mounting)
    brightness_change_fraction: float = 0.2   # between sessions: brightness (and so SNR)
    background_change_fraction: float = 0.3
    psf_change_fraction: float = 0.05

    def __post_init__(self):
        for f in dataclasses.fields(self):    # lists (from JSON) become tuples, so configs stay hashable
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        _validate(self)

    def replace(self, **changes) -> SynthConfig:
        """A copy with ``changes``; an unknown name is an :class:`InputError` listing the valid ones."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise InputError(f"unknown SynthConfig parameter(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(f.name for f in dataclasses.fields(self))}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able parameters; ``SynthConfig(**d)`` rebuilds the config."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def preset(cls, name: str = "default", seed: int = 0, **overrides) -> SynthConfig:
        """A named configuration (see :data:`PRESETS`), with ``seed`` and ``overrides`` applied."""
        if name not in PRESETS:
            raise InputError(f"unknown synthetic preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(seed=seed).replace(**PRESETS[name]).replace(**overrides)

    @classmethod
    def random(cls, seed: int, **overrides) -> SynthConfig:
        """Domain randomisation: every parameter drawn from :data:`RANDOM_RANGES`, deterministic by seed.

        ``overrides`` (e.g. ``shape`` or ``sessions`` for training patches) are applied afterwards.
        """
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
        drawn = {name: draw(rng) for name, draw in _RANDOM_DRAWS.items()}
        drawn["spine_kind_fractions"] = tuple(float(v) for v in rng.dirichlet([3.0, 1.5, 2.0, 0.6]))
        drawn["psf_fwhm_z_um"] = drawn["psf_fwhm_xy_um"] * float(rng.uniform(*RANDOM_RANGES["psf_fwhm_z_to_xy"]))
        return cls(seed=seed).replace(**drawn).replace(**overrides)


def _validate(cfg: SynthConfig) -> None:
    def bad(msg):
        raise InputError(f"SynthConfig: {msg}")

    if cfg.sessions < 1:
        bad(f"sessions must be >= 1 (got {cfg.sessions}).")
    if len(cfg.shape) != 3 or min(cfg.shape) < 1:
        bad(f"shape must be three positive voxel counts Z, Y, X (got {cfg.shape}).")
    if len(cfg.voxel_size_um) != 3 or min(cfg.voxel_size_um) <= 0:
        bad(f"voxel_size_um must be three positive sizes z, y, x in µm (got {cfg.voxel_size_um}).")
    if len(cfg.spine_kind_fractions) != len(SPINE_KINDS) or min(cfg.spine_kind_fractions) < 0 \
            or sum(cfg.spine_kind_fractions) <= 0:
        bad(f"spine_kind_fractions must be {len(SPINE_KINDS)} non-negative weights for {SPINE_KINDS}.")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name.endswith("_range") and (len(value) != 2 or not 0 <= value[0] <= value[1]):
            bad(f"{f.name} must be (low, high) with 0 <= low <= high (got {value}).")
        if f.name.endswith("_probability") and not 0 <= value <= 1:
            bad(f"{f.name} must lie in [0, 1] (got {value}).")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            bad(f"{f.name} must not be negative (got {value}).")
    if cfg.psf_fwhm_xy_um <= 0 or cfg.psf_fwhm_z_um <= 0:
        bad("PSF widths must be positive.")
    if cfg.head_radius_um_range[0] <= 0 or cfg.shaft_radius_um_range[0] <= 0:
        bad("head and shaft radii must be positive.")


#: Named configurations: overrides of the defaults (which are tuned to a real two-photon stack).
PRESETS: dict[str, dict] = {
    "default": {},
    "large_drift": dict(drift_um=3.0, drift_z_um=1.0, deformation_um=0.4),
    # a wide field (100 µm) whose sessions are also turned by up to 2 degrees about its centre
    "rotated": dict(shape=(32, 512, 512), voxel_size_um=(0.5, 0.2, 0.2), rotation_deg=2.0),
    "low_snr": dict(brightness_photons=10.0, background_photons=0.4, brightness_change_fraction=0.3),
    # the hardest spines of low_snr on their own: as dim, with small heads only (where its misses are)
    "faint": dict(brightness_photons=10.0, background_photons=0.4, brightness_change_fraction=0.3,
                  head_radius_um_range=(0.15, 0.32)),
    "crowded": dict(dendrites=2, spine_density_per_um=2.0, axons=4, axons_near_dendrites=True,
                    bouton_density_per_um=0.35, varicosity_density_per_um=0.08),
    "tiny": dict(sessions=3, shape=(12, 64, 64)),
    "sample": dict(sessions=5, shape=(24, 192, 192), dendrites=2, spine_density_per_um=1.1),
    # Deliberately outside RANDOM_RANGES wherever it can be: coarser voxels, a wider and much longer
    # PSF, a camera-like detector (gain below one ADU per photon, high offset and read noise, no
    # low-pass), bright autofluorescence and heavy haze, thick shafts, big heads on short necks, dense.
    "other_microscope": dict(
        voxel_size_um=(1.5, 0.25, 0.25), shape=(16, 128, 128), psf_fwhm_xy_um=0.7, psf_fwhm_z_um=8.0,
        gain_adu_per_photon=0.6, pmt_gain_cv=0.0, noise_smoothing_px=0.0, read_noise_adu=40.0,
        offset_adu=1500.0, brightness_photons=400.0, background_photons=20.0, haze_fraction=0.7,
        shaft_radius_um_range=(1.3, 1.6), head_radius_um_range=(0.8, 1.1), neck_length_um_range=(0.0, 0.4),
        spine_density_per_um=2.5, spine_kind_fractions=(0.0, 0.5, 0.5, 0.0)),
    # A second lab's two-photon microscope, different where such setups differ: 1 µm z steps, a
    # lower-NA PSF, a noisier detector with a high offset (outside the training ranges), dimmer
    # signal on more background, bigger heads on shorter necks, denser spines.
    "second_microscope": dict(
        voxel_size_um=(1.0, 0.22, 0.22), shape=(20, 128, 128), psf_fwhm_xy_um=0.65, psf_fwhm_z_um=3.5,
        gain_adu_per_photon=20.0, pmt_gain_cv=0.2, noise_smoothing_px=0.0, read_noise_adu=25.0,
        offset_adu=1000.0, brightness_photons=30.0, background_photons=3.0, haze_fraction=0.3,
        head_radius_um_range=(0.4, 0.7), neck_length_um_range=(0.1, 0.8), spine_density_per_um=1.5,
        spine_kind_fractions=(0.1, 0.45, 0.45, 0.0)),
}


def _uniform(lo, hi):
    return lambda rng: float(rng.uniform(lo, hi))


def _log_uniform(lo, hi):
    return lambda rng: float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _integer(lo, hi):
    return lambda rng: int(rng.integers(lo, hi + 1))


def _ordered(lo, hi, min_width):
    def draw(rng):
        a = rng.uniform(lo, hi - min_width)
        return (float(a), float(rng.uniform(a + min_width, hi)))
    return draw


#: Ranges drawn by :meth:`SynthConfig.random` (the training distribution), name -> (low, high).
RANDOM_RANGES: dict[str, tuple] = {
    "voxel_size_xy_um": (0.07, 0.2),
    "voxel_size_z_um": (0.3, 1.2),
    "psf_fwhm_xy_um": (0.28, 0.6),
    "psf_fwhm_z_to_xy": (3.5, 10.0),         # axial over lateral PSF width
    "brightness_photons": (4.0, 150.0),
    "background_photons": (0.005, 1.0),
    "background_variation": (0.0, 0.8),
    "haze_fraction": (0.0, 0.6),
    "haze_fwhm_xy_um": (0.6, 2.5),
    "haze_fwhm_z_um": (3.0, 10.0),
    "gain_adu_per_photon": (3.0, 250.0),
    "pmt_gain_cv": (0.0, 0.7),
    "noise_smoothing_px": (0.0, 1.4),
    "read_noise_adu": (0.2, 12.0),
    "offset_adu": (0.0, 600.0),
    "dendrites": (1, 3),
    "shaft_radius_um": (0.2, 1.2),
    "shaft_bend_um": (0.2, 2.5),
    "shaft_z_slope_max": (0.0, 0.35),
    "spine_density_per_um": (0.4, 2.2),
    "head_radius_um": (0.15, 0.8),
    "neck_length_um": (0.1, 2.0),
    "neck_radius_um": (0.05, 0.2),
    "spine_brightness": (0.6, 2.5),
    "varicosity_density_per_um": (0.0, 0.12),
    "axons": (0, 4),
    "bouton_density_per_um": (0.0, 0.4),
    "bouton_radius_um": (0.2, 0.7),
    "spine_gain_probability": (0.0, 0.2),
    "spine_loss_probability": (0.0, 0.2),
    "transient_miss_probability": (0.0, 0.08),
    "head_radius_change_fraction": (0.0, 0.25),
    "drift_um": (0.0, 3.0),
    "drift_z_um": (0.0, 1.5),
    "deformation_um": (0.0, 0.5),
    "brightness_change_fraction": (0.0, 0.4),
    "background_change_fraction": (0.0, 0.5),
}


def _draw_voxel(rng):
    xy = _log_uniform(*RANDOM_RANGES["voxel_size_xy_um"])(rng)
    return (_uniform(*RANDOM_RANGES["voxel_size_z_um"])(rng), xy, xy)


_R = RANDOM_RANGES
_RANDOM_DRAWS = {
    "voxel_size_um": _draw_voxel,
    "psf_fwhm_xy_um": _uniform(*_R["psf_fwhm_xy_um"]),
    "brightness_photons": _log_uniform(*_R["brightness_photons"]),
    "background_photons": _log_uniform(*_R["background_photons"]),
    "background_variation": _uniform(*_R["background_variation"]),
    "haze_fraction": _uniform(*_R["haze_fraction"]),
    "haze_fwhm_xy_um": _uniform(*_R["haze_fwhm_xy_um"]),
    "haze_fwhm_z_um": _uniform(*_R["haze_fwhm_z_um"]),
    "gain_adu_per_photon": _log_uniform(*_R["gain_adu_per_photon"]),
    "pmt_gain_cv": _uniform(*_R["pmt_gain_cv"]),
    "noise_smoothing_px": _uniform(*_R["noise_smoothing_px"]),
    "read_noise_adu": _log_uniform(*_R["read_noise_adu"]),
    "offset_adu": _uniform(*_R["offset_adu"]),
    "dendrites": _integer(*_R["dendrites"]),
    "shaft_radius_um_range": _ordered(*_R["shaft_radius_um"], 0.1),
    "shaft_bend_um": _uniform(*_R["shaft_bend_um"]),
    "shaft_z_slope_max": _uniform(*_R["shaft_z_slope_max"]),
    "spine_density_per_um": _uniform(*_R["spine_density_per_um"]),
    "head_radius_um_range": _ordered(*_R["head_radius_um"], 0.15),
    "neck_length_um_range": _ordered(*_R["neck_length_um"], 0.4),
    "neck_radius_um_range": _ordered(*_R["neck_radius_um"], 0.03),
    "spine_brightness_range": _ordered(*_R["spine_brightness"], 0.2),
    "varicosity_density_per_um": _uniform(*_R["varicosity_density_per_um"]),
    "axons": _integer(*_R["axons"]),
    "axons_near_dendrites": lambda rng: bool(rng.random() < 0.3),
    "bouton_density_per_um": _uniform(*_R["bouton_density_per_um"]),
    "bouton_radius_um_range": _ordered(*_R["bouton_radius_um"], 0.1),
    "spine_gain_probability": _uniform(*_R["spine_gain_probability"]),
    "spine_loss_probability": _uniform(*_R["spine_loss_probability"]),
    "transient_miss_probability": _uniform(*_R["transient_miss_probability"]),
    "head_radius_change_fraction": _uniform(*_R["head_radius_change_fraction"]),
    "drift_um": _uniform(*_R["drift_um"]),
    "drift_z_um": _uniform(*_R["drift_z_um"]),
    "deformation_um": _uniform(*_R["deformation_um"]),
    "brightness_change_fraction": _uniform(*_R["brightness_change_fraction"]),
    "background_change_fraction": _uniform(*_R["background_change_fraction"]),
}


# ----------------------------------------------------------------------------------------------------
# the series


@dataclass
class SynthSeries:
    """A synthetic chronic series and its truth (see the module docstring for the truth semantics)."""

    image: np.ndarray                 # (T, Z, Y, X) uint16
    truth: pd.DataFrame               # spine table + head_radius_um, kind, dendrite_id, spine_id, ...
    voxel_size_um: tuple[float, float, float]
    config: SynthConfig
    dendrite_length_um: float         # shaft centreline inside the volume, µm (mean over sessions)
    distractors: pd.DataFrame         # t, z, y, x (voxels of each session), kind, distractor_id
    drift_um: np.ndarray              # (T, 3) rigid translation of each session's content, z y x, µm
    session_dendrite_length_um: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rotation_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (T,) in-plane turn of each session

    def metadata(self) -> dict:
        """JSON-able summary: config, counts, per-session gained / lost / present, shaft length."""
        sessions = session_counts(self.truth, self.image.shape[0])
        return {
            "generator": "napari_spine_tracker.core.synth",
            "config": self.config.to_dict(),
            "shape": [int(n) for n in self.image.shape],
            "voxel_size_um": [float(v) for v in self.voxel_size_um],
            "tracks": int(self.truth["track_id"].nunique()),
            "rows": len(self.truth),
            "sessions": sessions,
            "gained": sum(s["gained"] for s in sessions),
            "lost": sum(s["lost"] for s in sessions),
            "kinds": {k: int(n) for k, n in self.truth.groupby("kind")["track_id"].nunique().items()},
            "distractors": {k: int(n) for k, n in self.distractors["kind"].value_counts().items()},
            "dendrite_length_um": float(self.dendrite_length_um),
            "session_dendrite_length_um": [float(v) for v in self.session_dendrite_length_um],
            "drift_um": np.asarray(self.drift_um, float).round(4).tolist(),
            "rotation_deg": np.asarray(self.rotation_deg, float).round(4).tolist(),
        }


def session_counts(truth: pd.DataFrame, sessions: int) -> list[dict]:
    """Per session: rows present, tracks gained (first row here) and lost (last row just before)."""
    first = truth.groupby("track_id")["t"].min().value_counts()
    last = truth.groupby("track_id")["t"].max().value_counts()
    present = truth["t"].value_counts()
    return [{"t": t, "present": int(present.get(t, 0)),
             "gained": int(first.get(t, 0)) if t else 0,
             "lost": int(last.get(t - 1, 0)) if t else 0} for t in range(sessions)]


def synthesize_series(config: SynthConfig | None = None, noise_free: bool = False, **overrides) -> SynthSeries:
    """Draw and render a synthetic series. ``overrides`` replace fields of ``config`` (default config).

    ``noise_free``: the image is each voxel's expected photon count (float32) before the detector,
    the same series otherwise (what any reader of the image could at best see; see
    benchmarks/resolvable.py).
    """
    cfg = (config or SynthConfig()).replace(**overrides)
    seeds = np.random.SeedSequence([cfg.seed, 0x5719]).spawn(3 + cfg.sessions)
    geometry_rng, warp_rng, miss_rng = (np.random.default_rng(s) for s in seeds[:3])
    world = build_world(cfg, geometry_rng)
    warps = session_warps(cfg, warp_rng)
    voxel = np.asarray(cfg.voxel_size_um, float)
    shape = np.asarray(cfg.shape)

    spines = world.spines
    heads_vox = np.stack([warps[t](spines.head_centre(t)) / voxel for t in range(cfg.sessions)])  # (T, S, 3)
    inside = np.all((heads_vox >= 0) & (heads_vox <= shape - 1), axis=2)
    exists = np.stack([spines.exists(t) for t in range(cfg.sessions)])
    visible = exists & inside
    missed = _transient_misses(miss_rng, visible, cfg.transient_miss_probability)
    rows = visible & ~missed
    truth = _truth_table(rows, heads_vox, spines)

    image = np.stack([_render_session(cfg, world, warps[t], t, missed[t], np.random.default_rng(seeds[3 + t]),
                                      noise_free) for t in range(cfg.sessions)])

    lengths = np.array([_length_inside(world, warps[t], voxel, shape) for t in range(cfg.sessions)])
    return SynthSeries(
        image=image, truth=truth, voxel_size_um=tuple(float(v) for v in voxel), config=cfg,
        dendrite_length_um=float(lengths.mean()), distractors=_distractor_table(world, warps, voxel, shape),
        drift_um=np.stack([w.drift_um for w in warps]), session_dendrite_length_um=lengths,
        rotation_deg=np.degrees([w.rotation_rad for w in warps]),
    )


def _transient_misses(rng: np.random.Generator, visible: np.ndarray, probability: float) -> np.ndarray:
    """(T, S) misses: only where the spine is visible the session before and after, never two in a row."""
    missed = np.zeros_like(visible)
    for t in range(1, visible.shape[0] - 1):
        candidate = visible[t - 1] & visible[t] & visible[t + 1] & ~missed[t - 1]
        missed[t] = candidate & (rng.random(visible.shape[1]) < probability)
    return missed


def _truth_table(rows: np.ndarray, heads_vox: np.ndarray, spines) -> pd.DataFrame:
    """The spine table; a spine's rows split into new tracks wherever more than :data:`KEPT_ID_GAP`
    sessions are missing."""
    segments = []   # (first session, spine, sessions)
    for s in np.flatnonzero(rows.any(axis=0)):
        ts = np.flatnonzero(rows[:, s])
        for part in np.split(ts, np.flatnonzero(np.diff(ts) > KEPT_ID_GAP + 1) + 1):
            segments.append((int(part[0]), int(s), part))
    segments.sort(key=lambda seg: seg[:2])
    lengths = [len(seg[2]) for seg in segments]
    t = np.concatenate([seg[2] for seg in segments]) if segments else np.zeros(0, np.int64)
    s = np.repeat(np.array([seg[1] for seg in segments], np.int64), lengths)
    track = np.repeat(np.arange(1, len(segments) + 1), lengths)
    order = np.lexsort((track, t))
    t, s, track = t[order], s[order], track[order]
    zyx = heads_vox[t, s]
    return pd.DataFrame({
        "track_id": track.astype(np.int64), "t": t.astype(np.int64),
        "z": zyx[:, 0], "y": zyx[:, 1], "x": zyx[:, 2],
        "score": np.ones(len(t)), "status": pd.Series(["confirmed"] * len(t), dtype=object),
        "head_radius_um": spines.head_radius[t, s],
        "kind": pd.Series(np.asarray(SPINE_KINDS, dtype=object)[spines.kind[s]], dtype=object),
        "dendrite_id": spines.dendrite[s].astype(np.int64) + 1,
        "spine_id": s + 1,
        "neck_length_um": spines.neck_length[s],
        "pointing_z": np.abs(spines.direction[s, 0]),
    })


def _distractor_table(world: World, warps: list[SessionWarp], voxel, shape) -> pd.DataFrame:
    pos = np.stack([warp(world.blobs.centre) / voxel for warp in warps])          # (T, N, 3)
    t, i = np.nonzero(np.all((pos >= 0) & (pos <= shape - 1), axis=2))
    return pd.DataFrame({"t": t.astype(np.int64), "z": pos[t, i, 0], "y": pos[t, i, 1], "x": pos[t, i, 2],
                         "kind": pd.Series(np.asarray(world.blobs.kind, dtype=object)[i], dtype=object),
                         "distractor_id": i.astype(np.int64) + 1})


def _length_inside(world: World, warp: SessionWarp, voxel, shape) -> float:
    total = 0.0
    for tube in world.dendrites:
        mid = warp(0.5 * (tube.points[1:] + tube.points[:-1])) / voxel
        total += tube.step_um * np.count_nonzero(np.all((mid >= 0) & (mid <= shape - 1), axis=1))
    return total


def _session_factor(rng: np.random.Generator, fraction: float) -> float:
    return float(np.exp(rng.normal(0.0, fraction) - 0.5 * fraction**2)) if fraction > 0 else 1.0


def _render_session(cfg: SynthConfig, world: World, warp: SessionWarp, t: int, missed: np.ndarray,
                    rng: np.random.Generator, noise_free: bool = False) -> np.ndarray:
    """One session's (Z, Y, X) uint16 image (``noise_free``: float32 expected photons; ``rng`` is
    the session's own, and the detector its last use, so the rest of the series is the same)."""
    voxel = np.asarray(cfg.voxel_size_um, float)
    brightness = cfg.brightness_photons * _session_factor(rng, cfg.brightness_change_fraction)
    background = cfg.background_photons * _session_factor(rng, cfg.background_change_fraction)
    psf_scale = _session_factor(rng, cfg.psf_change_fraction)
    sigma = render.psf_sigma_vox(cfg.psf_fwhm_z_um * psf_scale, cfg.psf_fwhm_xy_um * psf_scale, voxel)
    canvas = render.Canvas(cfg.shape, voxel, np.ceil(2 * sigma).astype(int) + 1)

    tubes = [_tube_capsules(tube, warp, 1.0) for tube in world.dendrites]
    tubes += [_tube_capsules(tube, warp, b) for tube, b in zip(world.axons, world.axon_brightness, strict=True)]
    necks, heads = _spine_shapes(world.spines, warp, t, missed, rng)
    canvas.capsules(*(np.concatenate(parts) for parts in zip(*tubes, necks, strict=True)))
    blobs = world.blobs
    canvas.ellipsoids(*(np.concatenate(parts) for parts in zip(
        (warp(blobs.centre), blobs.axes, blobs.radii, blobs.brightness), heads, strict=True)))

    signal = render.blur_and_crop(canvas, sigma)
    photons = render.haze_and_background(
        rng, signal, voxel, haze_fwhm_um=(cfg.haze_fwhm_z_um, cfg.haze_fwhm_xy_um),
        haze_photons=brightness * cfg.haze_fraction, background_photons=background,
        background_variation=cfg.background_variation)
    photons += signal * np.float32(brightness * (1.0 - cfg.haze_fraction))
    if noise_free:
        return photons
    return render.detect(rng, photons, gain_adu_per_photon=cfg.gain_adu_per_photon, pmt_gain_cv=cfg.pmt_gain_cv,
                         noise_smoothing_px=cfg.noise_smoothing_px, read_noise_adu=cfg.read_noise_adu,
                         offset_adu=cfg.offset_adu)


def _tube_capsules(tube, warp: SessionWarp, weight: float, segment_um: float = 1.0):
    """A tube as a chain of capsules about ``segment_um`` long: p0, p1, r0, r1, weight."""
    step = max(1, round(segment_um / tube.step_um))
    idx = np.r_[np.arange(0, len(tube.points) - 1, step), len(tube.points) - 1]
    points = warp(tube.points[idx])
    radius = tube.radius[idx]
    return points[:-1], points[1:], radius[:-1], radius[1:], np.full(len(idx) - 1, float(weight))


def _spine_shapes(spines, warp: SessionWarp, t: int, missed: np.ndarray, rng: np.random.Generator):
    """Necks as capsules (p0, p1, r0, r1, weight) and heads as ellipsoids (centre, axes, radii,
    weight) of the spines that exist in session ``t``, in that session's frame."""
    alive = np.flatnonzero(spines.exists(t))
    u = spines.direction[alive]
    r_shaft = spines.shaft_radius[alive][:, None]
    base = spines.base[alive]
    start = warp(base + 0.5 * r_shaft * u)
    middle = warp(base + (r_shaft + 0.5 * spines.neck_length[alive][:, None]) * u + spines.bend[alive])
    head = warp(spines.head_centre(t)[alive])
    # a transient miss: the spine is there but dimmed out of sight for this session
    dim = rng.uniform(0.0, 0.12, len(alive))
    weight = spines.brightness[alive] * np.where(missed[alive], dim, 1.0)
    neck_r = np.tile(spines.neck_radius[alive], 2)
    necks = (np.concatenate([start, middle]), np.concatenate([middle, head]), neck_r, neck_r, np.tile(weight, 2))
    helper = np.where(np.abs(u[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]])
    side = np.cross(u, helper)
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    axes = np.stack([u, side, np.cross(u, side)], axis=1)
    along, across = spines.head_shape[alive].T
    radii = np.stack([along, across, across], axis=1) * spines.head_radius[t, alive][:, None]
    return necks, (head, axes, radii, weight)
