"""The classical peer: trackpy's 3D ``locate`` in every session, drift removed, then ``trackpy.link``.

This is what a careful user would do with trackpy alone (Crocker & Grier spot finding and
linking), with the same registration our own pipeline uses, so that a comparison measures the
detector and the linker, not the registration. The default parameters were tuned on synthetic
tuning seeds 0-1 of the four benchmark presets (never on validation seeds);
``benchmarks/README.md`` records the search.

trackpy's ``minmass`` is an absolute brightness, which no single value can fit across microscopes
and sessions; by default it is set per session relative to the image's contrast:
``minmass = min_relative_mass * (p99.9 - p50 of the session) * voxels in the spot mask``, i.e. the
spot's mean band-passed brightness must reach that fraction of the bright-structure contrast.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import Cancelled, InputError
from ..io.tables import REQUIRED_COLUMNS, empty_spine_table, validate_spine_table
from .register import as_motion, estimate_motion, session_array

log = logging.getLogger(__name__)

__all__ = ["link_spots", "locate_spots", "odd_diameter_vox", "trackpy_detect_track"]

# Tuned on tuning seeds 0-1 of presets default, large_drift, low_snr, crowded (benchmarks/README.md).
DEFAULT_DIAMETER_UM = (1.5, 0.9, 0.9)
DEFAULT_SEPARATION_UM = (1.5, 0.9, 0.9)
DEFAULT_PERCENTILE = 95.0
DEFAULT_MIN_RELATIVE_MASS = 0.02
DEFAULT_SEARCH_RANGE_UM = 1.5
DEFAULT_MEMORY = 2


def odd_diameter_vox(diameter_um: Sequence[float] | float, voxel_um: np.ndarray) -> tuple[int, int, int]:
    """A size in µm as odd voxel counts per axis (z, y, x), at least 3."""
    size = np.broadcast_to(np.asarray(diameter_um, float), (3,))
    n = np.maximum(3, np.round(size / voxel_um).astype(int))
    n += 1 - n % 2
    return int(n[0]), int(n[1]), int(n[2])


def locate_spots(series, voxel_size_um: Sequence[float] | None = None, *,
                 diameter_um: Sequence[float] | float = DEFAULT_DIAMETER_UM,
                 separation_um: Sequence[float] | float | None = DEFAULT_SEPARATION_UM,
                 percentile: float = DEFAULT_PERCENTILE, minmass: float | None = None,
                 min_relative_mass: float = DEFAULT_MIN_RELATIVE_MASS,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """``trackpy.locate`` (3D) in every session, one session in memory at a time.

    Returns a table ``t, z, y, x`` (voxels of each session), ``mass`` and ``relative_mass`` (mass
    over contrast times mask voxels, see the module docstring). ``minmass`` (absolute, trackpy
    units) overrides ``min_relative_mass`` when given.
    """
    import trackpy

    data, voxel_um = session_array(series, voxel_size_um)
    if voxel_um is None:
        raise InputError("the trackpy peer needs the voxel size (z, y, x in µm): pass voxel_size_um.")
    diameter = odd_diameter_vox(diameter_um, voxel_um)
    separation = None if separation_um is None else tuple(
        float(s) for s in np.broadcast_to(np.asarray(separation_um, float), (3,)) / voxel_um)
    mask_voxels = float(np.prod(diameter))
    trackpy.quiet()
    found = []
    n_sessions = int(data.shape[0])
    for t in range(n_sessions):
        if should_stop is not None and should_stop():
            raise Cancelled("trackpy detection stopped")
        session = np.asarray(data[t])
        low, high = np.percentile(session, [50, 99.9])
        contrast = max(float(high - low), 1e-12)
        threshold = minmass if minmass is not None else min_relative_mass * contrast * mask_voxels
        spots = trackpy.locate(session, diameter, minmass=threshold, separation=separation,
                               percentile=percentile, characterize=False, engine="python")
        spots = spots[["z", "y", "x", "mass"]].assign(t=t, relative_mass=spots["mass"] / (contrast * mask_voxels))
        found.append(spots)
        if progress is not None:
            progress(t + 1, n_sessions)
    spots = pd.concat(found, ignore_index=True)[["t", "z", "y", "x", "mass", "relative_mass"]]
    log.debug("trackpy found %d spots in %d sessions (diameter %s voxels)", len(spots), n_sessions, diameter)
    return spots


def link_spots(spots: pd.DataFrame, voxel_size_um: Sequence[float], *, drift_vox: np.ndarray | None = None,
               motion=None, search_range_um: float = DEFAULT_SEARCH_RANGE_UM,
               memory: int = DEFAULT_MEMORY) -> pd.DataFrame:
    """``trackpy.link`` in registered µm coordinates; returns a spine table.

    Positions minus the drift (or moved back through ``motion``, a ``RigidMotion`` with rotation),
    times the voxel size, make one isotropic ``search_range_um`` fit every axis; the table keeps
    each session's own coordinates. ``score`` is the spot's mass
    relative to the brightest spot; ``mass`` is kept as an extra column.
    """
    import trackpy

    if len(spots) == 0:
        return empty_spine_table()
    voxel_um = np.broadcast_to(np.asarray(voxel_size_um, float), (3,))
    spots = spots.reset_index(drop=True)
    t = spots["t"].to_numpy(int)
    motion = as_motion(motion, drift_vox, int(t.max()) + 1, voxel_um)
    positions = spots[["z", "y", "x"]].to_numpy(float)
    registered = np.empty_like(positions)
    for frame in np.unique(t):
        registered[t == frame] = motion.to_reference(positions[t == frame], frame)
    registered *= voxel_um
    to_link = pd.DataFrame(registered, columns=["rz", "ry", "rx"]).assign(frame=t)
    trackpy.quiet()
    linked = trackpy.link(to_link, search_range_um, pos_columns=["rz", "ry", "rx"], t_column="frame",
                          memory=memory, adaptive_stop=0.1 * search_range_um)
    particle = linked["particle"].to_numpy()
    mass = spots["mass"].to_numpy(float)
    table = pd.DataFrame({
        "t": t, "z": spots["z"], "y": spots["y"], "x": spots["x"],
        "score": np.clip(mass / max(float(mass.max()), 1e-12), 0.0, 1.0),
        "status": "predicted",
        "mass": mass,
    })
    # ids 1, 2, ... in order of first appearance
    order = np.lexsort((np.arange(len(t)), t))
    first_seen = pd.unique(particle[order])
    table["track_id"] = pd.Series(particle).map({p: k + 1 for k, p in enumerate(first_seen)}).to_numpy(int)
    table = table.sort_values(["t", "track_id"], kind="stable")
    extra = [c for c in table.columns if c not in REQUIRED_COLUMNS]
    return validate_spine_table(table[list(REQUIRED_COLUMNS) + extra], source="trackpy result")


def trackpy_detect_track(series, voxel_size_um: Sequence[float] | None = None, *,
                         diameter_um: Sequence[float] | float = DEFAULT_DIAMETER_UM,
                         separation_um: Sequence[float] | float | None = DEFAULT_SEPARATION_UM,
                         minmass: float | None = None, min_relative_mass: float = DEFAULT_MIN_RELATIVE_MASS,
                         percentile: float = DEFAULT_PERCENTILE,
                         search_range_um: float = DEFAULT_SEARCH_RANGE_UM, memory: int = DEFAULT_MEMORY,
                         register: bool = True, max_rotation_deg: float = 3.0,
                         progress: Callable[[int, int], None] | None = None,
                         should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """Detect spines with ``trackpy.locate`` (3D) per session and link them with ``trackpy.link``.

    Parameters
    ----------
    series
        ``(T, Z, Y, X)`` array (read one session at a time) or a ``Series``.
    voxel_size_um
        ``(z, y, x)`` in µm (taken from ``series`` when omitted).
    diameter_um, separation_um
        Spot size and smallest spot separation in µm, per axis (z, y, x) or one number; turned into
        (odd) voxel counts for trackpy.
    minmass, min_relative_mass
        Smallest integrated brightness of a spot: absolute (trackpy units) when ``minmass`` is
        given, else relative to each session's contrast (module docstring).
    percentile
        A local maximum must be brighter than this percentile of the band-passed session.
    search_range_um
        Largest movement in µm between sessions after drift removal.
    memory
        Sessions a spot may vanish and keep its id.
    register, max_rotation_deg
        Remove the rigid motion (:func:`.register.estimate_motion`, the same registration as ours)
        before linking.

    Returns
    -------
    pd.DataFrame
        Spine table (z, y, x in each session's own voxel grid); ``score`` is the spot's mass
        relative to the brightest spot; trackpy's ``mass`` is kept as an extra column.
    """
    data, voxel_um = session_array(series, voxel_size_um)
    if voxel_um is None:
        raise InputError("the trackpy peer needs the voxel size (z, y, x in µm): pass voxel_size_um.")
    n_sessions = int(data.shape[0])
    register = register and n_sessions > 1
    total = 2 * n_sessions if register else n_sessions

    motion = None
    if register:
        motion = estimate_motion(data, voxel_um, max_rotation_deg=max_rotation_deg, should_stop=should_stop,
                                 progress=None if progress is None else lambda done, _: progress(done, total))
    offset = n_sessions if register else 0
    spots = locate_spots(data, voxel_um, diameter_um=diameter_um, separation_um=separation_um,
                         percentile=percentile, minmass=minmass, min_relative_mass=min_relative_mass,
                         should_stop=should_stop,
                         progress=None if progress is None else lambda done, _: progress(offset + done, total))
    return link_spots(spots, voxel_um, motion=motion, search_range_um=search_range_um, memory=memory)
