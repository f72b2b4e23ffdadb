"""Link per-session spine detections into tracks with persistent ids.

Sessions are processed in order. In session ``t`` each detection is first offered to the tracks
seen in session ``t-1`` (frame-to-frame), then what is left to the tracks that were last seen in
sessions ``t-2 .. t-1-max_gap`` (gap closing), so a spine missed in one or two sessions keeps its
id. Each step is one optimal assignment (Hungarian) maximising the sum of ``gate - cost`` over the
links made: a link costs its distance in µm, and a pair farther apart than the gate is never linked.

The gate is, by default, chosen for each series from how far its spines land from where they were
expected ("auto"): 4 times the median distance of the frame-to-frame links made under a wide probe
gate, within 0.8-1.4 µm. Series whose spines are found where expected get a narrow gate, which
keeps a new spine from taking the id of a neighbour lost in the same session; series that deform
more, or whose spines are localised less well (another microscope), a wider one.

Where a detection came from (its expected position in session ``t-1``):

- with the network's displacement ``d = (dz, dy, dx)`` known:  ``p + d``;
- otherwise by registration, ``p - (drift[t] - drift[t-1])``, corrected by the local motion of
  the spines around it (the mode of the displacements between nearby detections of the two
  sessions; registration of whole images misses non-rigid deformation and errs by up to ~1 µm
  on large drift).

A track missed in a session becomes a ghost: its expected position is carried forward from
session to session by the registration step and the local motion of the spines linked around it,
and gap closing compares the new detections with these positions.

All positions are in voxels of each session's own grid; ``drift`` follows
:func:`napari_spine_tracker.core.register.estimate_drift` (a point at ``p`` in session 0 is at
``p + drift[t]`` in session ``t``). With a ``motion`` (``RigidMotion``, translation and rotation,
from :func:`~napari_spine_tracker.core.register.estimate_motion`), "registration" above means the
whole rigid map from one session to the other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..errors import Cancelled, InputError, number_or_nan
from ..io.tables import LINK_COLUMN, REQUIRED_COLUMNS, validate_spine_table
from .decode import VOUCH_MEAN_ABOVE
from .devices import thread_pool
from .metrics import parse_voxel_size, sparse_assignment
from .register import as_motion

log = logging.getLogger(__name__)

__all__ = ["AUTO_GATE", "DEFAULT_GATE_UM", "DEFAULT_MAX_GAP", "FIXED_GATE_UM", "check_linking",
           "link_detections", "parse_gate"]

DISPLACEMENT_COLUMNS = ("dz", "dy", "dx")
#: µm: pairs of detections this close (after registration) vote on the local motion; registration
#: errs by up to ~1.5 µm on large drift (benchmarks: tuning seeds 2000-2002)
MOTION_SEARCH_UM = 3.0
#: the gate word: chosen for each series from its own link distances
AUTO_GATE = "auto"
#: the default gate (``benchmarks/linking_gate.py``)
DEFAULT_GATE_UM = AUTO_GATE
#: µm: the gate where a series has too few links to measure (and the fixed default before "auto")
FIXED_GATE_UM = 1.2
#: "auto": this many times the median distance of the frame-to-frame links made at PROBE_GATE_UM,
#: within AUTO_GATE_RANGE_UM; chosen on the tuning seeds 2000-2002 and the second microscope's
#: 2000-2011 (docs/model_report.md, "A linking gate for each series")
AUTO_GATE_PER_MEDIAN = 4.0
AUTO_GATE_RANGE_UM = (0.8, 1.4)
PROBE_GATE_UM = 1.6
#: "auto" measures a series with at least this many probe links; fewer: FIXED_GATE_UM
MIN_PROBE_LINKS = 20
#: sessions a spine may be missed and keep its id
DEFAULT_MAX_GAP = 2


def check_linking(gate_um=None, max_gap=None) -> None:
    """An InputError unless the gate (if given) is ``"auto"`` or a positive distance in µm and the
    gap (if given) a whole number of sessions >= 0."""
    gate, gap = number_or_nan(gate_um), number_or_nan(max_gap)
    if gate_um is not None and not _is_auto(gate_um) and not (np.isfinite(gate) and gate > 0):
        raise InputError(f"gate_um must be 'auto' or a positive distance in µm, got {gate_um!r}.")
    if max_gap is not None and not (np.isfinite(gap) and gap >= 0 and gap == int(gap)):
        raise InputError(f"max_gap must be a whole number of sessions >= 0, got {max_gap!r}.")


def parse_gate(text: str) -> float | str:
    """A gate written as text (a command line): ``"auto"`` or a distance in µm; an InputError
    unless it is one."""
    if text.strip().lower() == AUTO_GATE:
        return AUTO_GATE
    check_linking(text)  # says what was wrong in the words given
    return float(text)


def _is_auto(gate_um) -> bool:
    return isinstance(gate_um, str) and gate_um == AUTO_GATE


def _assign(sources_um: np.ndarray, targets_um: np.ndarray,
            gates_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Links (source rows, target rows) maximising sum(gate - distance); ``gates_um`` per target."""
    if len(sources_um) == 0 or len(targets_um) == 0:
        empty = np.zeros(0, dtype=int)
        return empty, empty
    max_gate = float(np.max(gates_um))
    dist = cKDTree(sources_um).sparse_distance_matrix(cKDTree(targets_um), max_gate,
                                                      output_type="coo_matrix")
    rows, cols, d = dist.row.astype(int), dist.col.astype(int), dist.data
    keep = d <= gates_um[cols]
    rows, cols, d = rows[keep], cols[keep], d[keep]
    # a tiny positive floor keeps a link exactly at the gate allowed (weights must be > 0)
    weights = gates_um[cols] - d + 1e-9
    return sparse_assignment(rows, cols, weights, len(sources_um), len(targets_um), maximize=True)


def _smooth_field(at_um: np.ndarray, samples_um: np.ndarray, values_um: np.ndarray,
                  scale_um: float) -> np.ndarray:
    """(len(at_um), 3) µm: at each point, the Gaussian-weighted (sigma ``scale_um``) mean of the
    ``values_um`` sampled at ``samples_um`` within 3 sigma; a prior weight of one sample at zero
    keeps isolated points where they are."""
    total = np.zeros((len(at_um), 3))
    if len(at_um) == 0 or len(samples_um) == 0:
        return total
    near = cKDTree(at_um).sparse_distance_matrix(cKDTree(samples_um), 3 * scale_um, output_type="coo_matrix")
    weights = np.exp(-near.data**2 / (2 * scale_um**2))
    np.add.at(total, near.row, weights[:, None] * values_um[near.col])
    weight_sum = np.bincount(near.row, weights=weights, minlength=len(at_um))
    return total / (weight_sum[:, None] + 1.0)


def _mean_shift(votes, weights, start, widths_um: Sequence[float]):
    """Modes of weighted displacement votes, for many points at once.

    ``votes`` (3, n, m) µm, one (n, m) array per axis (reductions over a last axis of 3 were half
    the linking time), and ``weights`` (n, m) (zero for a missing vote): point i's mode is climbed
    from ``start[i]`` (n, 3) by a mean shift with Gaussian kernels of shrinking width, at most 10
    steps per width; a point stops climbing at a width once its step is below 1e-3 µm, so its mode
    does not depend on the other points. A point whose kernel holds no weight keeps its start.
    Votes of zero weight cost time and add nothing: leave them out where rows hear few (see
    :func:`_heard`). NumPy arrays, or torch tensors on one device (the mode comes back as a
    tensor there).
    """
    ops = _Ops.of(votes)
    mode = ops.float64(start)
    votes, weights = ops.float32(votes), ops.float32(weights)
    for width in widths_um:
        climbing = ops.arange(len(mode))  # the points still climbing, and their votes
        v, wv = votes, weights
        for _ in range(10):
            here = mode[climbing]
            offset = v - ops.float32(here.T[:, :, None])
            offset *= offset
            w = offset.sum(0)
            w *= -1 / (2 * width**2)
            ops.exp_(w)
            w *= wv
            total = w.sum(1)
            heard = total > 1e-9
            shifted = ops.einsum("ij,kij->ik", w, v) / ops.where(heard, total, 1)[:, None]
            new = ops.where(heard[:, None], ops.float64(shifted), here)
            mode[climbing] = new
            going = (abs(new - here) >= 1e-3).any(1)
            still = int(going.sum())  # on a GPU the one wait of a step
            if not still:
                break
            if ops.torch is None and still < 0.5 * len(going):  # fewer, smaller arrays from here on
                climbing, v, wv = climbing[going], v[:, going], wv[going]
            else:  # the arrays as they are; a point that stopped hears nothing, so keeps its mode (on a
                # GPU always: selecting by a mask waits for the GPU to count it)
                wv = wv * going[:, None]
    return mode


class _Ops:
    """What :func:`_mean_shift` needs that NumPy and torch spell differently."""

    def __init__(self, torch=None, device=None):
        self.torch, self.device = torch, device

    @classmethod
    def of(cls, array) -> _Ops:
        if isinstance(array, np.ndarray) or not hasattr(array, "device"):
            return cls()
        import torch

        return cls(torch, array.device)

    def float32(self, x):
        if self.torch is None:
            return np.asarray(x, np.float32)
        return self.torch.as_tensor(x, dtype=self.torch.float32, device=self.device)

    def float64(self, x):
        if self.torch is None:
            return np.array(x, dtype=float)
        return self.torch.as_tensor(x, dtype=self.torch.float64, device=self.device).clone()

    def arange(self, n: int):
        return np.arange(n) if self.torch is None else self.torch.arange(n, device=self.device)

    def where(self, condition, x, y):
        return (np if self.torch is None else self.torch).where(condition, x, y)

    def exp_(self, x) -> None:
        if self.torch is None:
            np.exp(x, out=x)
        else:
            x.exp_()

    def einsum(self, *args):
        return (np if self.torch is None else self.torch).einsum(*args)


def _heard(valid: np.ndarray, found: np.ndarray, near: np.ndarray) -> tuple[np.ndarray, ...]:
    """The votes each source hears, as flat lists: ``valid`` (n, k) marks the votes each source
    casts, ``found`` and ``near`` (n, m) its neighbours. Returns (rows, places, neighbour slots,
    votes): vote ``votes[i]`` (an index into ``np.flatnonzero(valid)``) is heard by source
    ``rows[i]`` from its neighbour in slot ``slots[i]``, and goes to column ``places[i]`` of that
    source's row, its votes packed to the front in order of neighbour slot, then vote."""
    cast = valid.sum(axis=1)
    first_vote = np.cumsum(cast) - cast
    sources, slots = np.nonzero(found)  # row by row
    neighbour = near[sources, slots]
    each = cast[neighbour]
    pair = np.repeat(np.arange(len(sources)), each)
    votes = first_vote[neighbour][pair] + _ranks(each)
    rows = sources[pair]
    return rows, _ranks(np.bincount(rows, minlength=len(valid))), slots[pair], votes


def _ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., counts[0]-1, 0, 1, ..., counts[1]-1, ...: each item's place within its group."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


#: µm: the widths of the mean shifts that find the common motion of a session pair, and then each
#: detection's own (:func:`_local_motion`)
COMMON_WIDTHS_UM, LOCAL_WIDTHS_UM = (1.0, 0.5, 0.3), (1.0, 0.5)


def _local_motion(sources_um: np.ndarray, targets_um: np.ndarray, radius_um: float,
                  scale_um: float, votes_per_source: int = 12, neighbours: int = 32) -> np.ndarray:
    """(n_sources, 3) µm: how far each source must move to land on its own target, from the
    motion of the spines around it.

    Registration of whole images is off by up to ~1 µm when the field moves by several µm and
    deforms, and a rigid model cannot follow the deformation; the detections say better how the
    spines moved. Each source votes with its displacements to its nearest targets within
    ``radius_um``. The common motion is the densest cluster of all votes (a mean shift from zero:
    wrong pairs scatter, right ones agree); each source's own motion is then the mode of the votes
    of its nearest sources within 3 ``scale_um`` (Gaussian weight of sigma ``scale_um`` on their
    distance), climbed from the common one. Tissue deforms smoothly, so neighbours share their
    motion. The numbers of votes and neighbours are capped, so the cost stays linear in the
    number of detections however dense they are. Zero when there are too few pairs.
    """
    votes = _motion_votes(sources_um, targets_um, radius_um, scale_um, votes_per_source, neighbours)
    if votes is None:
        return np.zeros((len(sources_um), 3))
    cast, heard_votes, heard_weights = votes
    common = _mean_shift(cast[:, None], np.ones((1, cast.shape[1])), np.zeros((1, 3)), COMMON_WIDTHS_UM)[0]
    return _mean_shift(heard_votes, heard_weights, np.repeat(common[None], len(sources_um), axis=0),
                       LOCAL_WIDTHS_UM)


def _motion_votes(sources_um: np.ndarray, targets_um: np.ndarray, radius_um: float, scale_um: float,
                  votes_per_source: int = 12, neighbours: int = 32) -> tuple[np.ndarray, ...] | None:
    """The votes of :func:`_local_motion` (same parameters): every vote cast, (3, m) µm, and the
    votes each source hears from its neighbours, (3, n, width) µm, with their weights (n, width);
    None when there are too few pairs."""
    n = len(sources_um)
    if n < 3 or len(targets_um) < 3:
        return None
    k = min(votes_per_source, len(targets_um))
    dist, idx = cKDTree(targets_um).query(sources_um, k=k, distance_upper_bound=radius_um)
    dist, idx = dist.reshape(n, k), idx.reshape(n, k)
    valid = np.isfinite(dist)
    if valid.sum() < 3:
        return None
    cast = (targets_um[idx[valid]] - sources_um[np.nonzero(valid)[0]]).T  # (3, votes)
    m = min(neighbours, n)
    near_dist, near = cKDTree(sources_um).query(sources_um, k=m, distance_upper_bound=3 * scale_um)
    near_dist, near = near_dist.reshape(n, m), near.reshape(n, m)
    found = np.isfinite(near_dist)
    near = np.where(found, near, 0)
    spatial = np.exp(-np.where(found, near_dist, 0.0) ** 2 / (2 * scale_um**2))
    # the votes each source hears from its neighbours, packed to the front of its row: (n, the most
    # any source hears); a dense (n, m * k) array would be mostly empty where neighbours hear few
    rows, places, slots, heard = _heard(valid, found, near)
    width = int(places.max()) + 1
    at = rows * width + places
    heard_weights, heard_votes = np.zeros(n * width, np.float32), np.zeros((3, n * width), np.float32)
    heard_weights[at] = spatial[rows, slots]
    for axis, votes in enumerate(cast.astype(np.float32)):  # axis by axis: a third of the time of cast[:, heard]
        heard_votes[axis][at] = np.take(votes, heard)
    return cast, heard_votes.reshape(3, n, width), heard_weights.reshape(n, width)


def _local_motions(jobs: Sequence[tuple[np.ndarray, np.ndarray]], radius_um: float, scale_um: float,
                   device=None) -> list[np.ndarray]:
    """:func:`_local_motion` of each (sources, targets) pair: on the CPU in threads (NumPy and
    SciPy release the GIL in most of it), or with a CUDA ``device`` the mean shifts of all pairs
    at once there (:func:`_local_motions_on`)."""
    if device is not None and device.type == "cuda":
        import torch

        try:
            return _local_motions_on(device, jobs, radius_um, scale_um)
        except torch.cuda.OutOfMemoryError:
            log.warning("out of GPU memory in linking's local motion; finding it on the CPU")
    return list(thread_pool().map(lambda job: _local_motion(*job, radius_um, scale_um), jobs))


def _local_motions_on(device, jobs: Sequence[tuple[np.ndarray, np.ndarray]], radius_um: float, scale_um: float,
                      rows_per_call: int = 1 << 15) -> list[np.ndarray]:
    """:func:`_local_motion` of each (sources, targets) pair, the votes gathered on the CPU and the
    mean shifts of all pairs run together on a torch ``device``, their vote arrays padded to one
    width with votes of zero weight (which change no mode), at most ``rows_per_call`` points at a
    time. On a GPU host's CPU, one mean shift per pair in NumPy took most of linking."""
    import torch

    def on_device(array):
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    def padded(arrays, width):  # (3, rows, w) and (rows, w) arrays -> one (3, sum rows, width), (.., width)
        votes = np.zeros((3, sum(a.shape[1] for a, _ in arrays), width), np.float32)
        weights = np.zeros(votes.shape[1:], np.float32)
        row = 0
        for v, w in arrays:
            votes[:, row:row + v.shape[1], :v.shape[2]] = v
            weights[row:row + v.shape[1], :v.shape[2]] = w
            row += v.shape[1]
        return votes, weights

    gathered = list(thread_pool().map(lambda job: _motion_votes(*job, radius_um, scale_um), jobs))
    out = [np.zeros((len(sources), 3)) for sources, _ in jobs]
    voting = [i for i, votes in enumerate(gathered) if votes is not None]
    if not voting:
        return out
    casts = [gathered[i][0] for i in voting]
    votes, weights = padded([(c[:, None], np.ones((1, c.shape[1]), np.float32)) for c in casts],
                            max(c.shape[1] for c in casts))
    common = _mean_shift(on_device(votes), on_device(weights), on_device(np.zeros((len(casts), 3))),
                         COMMON_WIDTHS_UM).cpu().numpy()
    heard = [gathered[i][1:] for i in voting]
    starts = np.concatenate([np.repeat(common[j][None], v.shape[1], axis=0) for j, (v, _) in enumerate(heard)])
    votes, weights = padded(heard, max(v.shape[2] for v, _ in heard))
    calls = [slice(a, a + rows_per_call) for a in range(0, len(starts), rows_per_call)]
    modes = np.concatenate([_mean_shift(on_device(votes[:, rows]), on_device(weights[rows]), on_device(starts[rows]),
                                        LOCAL_WIDTHS_UM).cpu().numpy() for rows in calls])
    bounds = np.cumsum([0] + [v.shape[1] for v, _ in heard])
    for j, i in enumerate(voting):
        out[i] = modes[bounds[j]:bounds[j + 1]]
    return out


def vouched_by_track(table: pd.DataFrame, threshold: float, mean_above: float = VOUCH_MEAN_ABOVE) -> np.ndarray:
    """Which rows of a linked ``table`` (``track_id``, ``score``) to keep: those scoring at least
    ``threshold``, and those under it whose track's mean score is at least ``threshold +
    mean_above``. A spine that is clear in most sessions vouches for the one where it is dim; a
    lone dim peak, or a track of them, does not."""
    scores = table["score"].to_numpy(float)
    track_mean = table.groupby("track_id")["score"].transform("mean").to_numpy(float)
    return (scores >= threshold) | (track_mean >= threshold + mean_above)


def keep_vouched(table: pd.DataFrame, threshold: float, mean_above: float = VOUCH_MEAN_ABOVE) -> pd.DataFrame:
    """The rows of a table linked down below ``threshold`` that :func:`vouched_by_track` keeps, ids
    numbered again 1, 2, ... in order of first appearance, as :func:`link_detections` numbers them."""
    kept = table[vouched_by_track(table, threshold, mean_above)].reset_index(drop=True)
    kept["track_id"] = _renumber(kept["track_id"].to_numpy(), kept["t"].to_numpy())
    kept.attrs = dict(table.attrs)
    return kept


def link_detections(detections: pd.DataFrame, voxel_size_um: Sequence[float] | float, *,
                    drift_vox: np.ndarray | None = None, motion=None, gate_um: float | str = DEFAULT_GATE_UM,
                    max_gap: int = DEFAULT_MAX_GAP,
                    gap_gate_growth_um: float = 0.25, local_scale_um: float | None = 4.0,
                    device=None, progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] | None = None) -> pd.DataFrame:
    """Give every detection a ``track_id`` so that the same spine keeps its id across sessions.

    Parameters
    ----------
    detections
        One row per detected spine: ``t`` (session), ``z, y, x`` (voxels of that session's grid),
        ``score``; optionally ``dz, dy, dx``, the predicted displacement in voxels from this point
        to the same spine in session ``t-1`` (NaN where unknown). Other columns are kept.
    voxel_size_um
        ``(z, y, x)`` in µm; costs and gates are distances in µm.
    drift_vox
        ``(T, 3)`` drift in voxels from :func:`~napari_spine_tracker.core.register.estimate_drift`,
        or None (no drift).
    motion
        A ``RigidMotion`` (translation and rotation); replaces ``drift_vox``.
    gate_um
        Largest distance in µm for a frame-to-frame link, after registration and the local motion
        correction, or ``"auto"`` (default): 4 times the median distance of this series' links under
        a 1.6 µm probe gate, within 0.8-1.4 µm (1.2 when fewer than 20 links are made). Chosen on
        the tuning seeds against fixed gates: the best fixed gate differs between series like the
        training data (0.8-0.9 µm; wider gates let a new spine take the id of a neighbour lost in
        the same session) and a second microscope's series (1.2-1.4 µm: its spines are localised
        less well, most of all in z); docs/model_report.md, "A linking gate for each series". The
        gate used is in ``table.attrs["gate_um"]``.
    max_gap
        Largest number of consecutive sessions a spine may be missing and keep its id (2: on the
        second microscope's series IDF1 +0.03 over 1, on the synthetic tuning series +0.002; 3
        adds nothing on the former and loses 0.005 on the latter).
    gap_gate_growth_um
        The gate grows by this much per missed session when closing a gap.
    local_scale_um
        Non-rigid correction of registration (for detections without displacement, and for the
        ghosts of missed tracks): the motion of the spines within about this distance (Gaussian
        sigma, µm) is shared. Tissue deforms smoothly, so neighbours move together. None: rigid
        registration only.
    device
        A torch CUDA device: the local motion's mean shifts run there, all session pairs at once
        (the same links; on a GPU run, linking on the host's CPU was its largest share). None (the
        default) or another device: on the CPU, the session pairs in threads.

    Returns
    -------
    pd.DataFrame
        A spine table (``track_id, t, z, y, x, score, status`` then the extra input columns and
        ``link_um``), ``track_id`` numbered from 1 in order of first appearance, sorted by ``t,
        track_id``. ``status`` is ``predicted`` unless the input carries one. ``link_um`` is how
        far in µm each detection lay from where its track was expected (NaN where a track
        starts): the links farthest from it are where the tracker most likely gave a new spine a
        lost neighbour's id (the review's **J** key visits them first).
    """
    scale = parse_voxel_size(voxel_size_um)
    check_linking(gate_um, max_gap)
    auto, max_gap = _is_auto(gate_um), int(max_gap)
    # the widest gate this call may use: how far the local motion looks
    reach_um = AUTO_GATE_RANGE_UM[1] if auto else float(gate_um)
    missing = [c for c in ("t", "z", "y", "x") if c not in detections.columns]
    if missing:
        raise InputError(f"detections lack the column(s) {', '.join(missing)}; they need t, z, y, x "
                         "(voxels) and score.")
    table = detections.drop(columns=["track_id"], errors="ignore").reset_index(drop=True).copy()
    if "score" not in table.columns:
        table["score"] = 1.0
    if "status" not in table.columns:
        table["status"] = "predicted"
    if len(table) == 0:
        table["track_id"] = pd.Series(dtype="int64")
        table[LINK_COLUMN] = pd.Series(dtype="float64")
        table = validate_spine_table(table[list(REQUIRED_COLUMNS) + _extra(table)])
        table.attrs.update(gate_um=FIXED_GATE_UM if auto else float(gate_um), gate_auto=auto)
        return table

    t_all = pd.to_numeric(table["t"], errors="coerce").to_numpy()
    if np.isnan(t_all).any() or (t_all < 0).any() or (t_all != np.round(t_all)).any():
        raise InputError("detections: column 't' must hold whole session indices >= 0.")
    t_all = t_all.astype(int)
    n_sessions = int(t_all.max()) + 1
    between = as_motion(motion, drift_vox, n_sessions, scale).between
    pos = table[["z", "y", "x"]].apply(pd.to_numeric, errors="coerce").to_numpy(float)
    if not np.isfinite(pos).all():
        raise InputError("detections: z, y, x must be finite numbers (voxels); "
                         f"row {int(np.argmax(~np.isfinite(pos).all(axis=1)))} is not.")
    if "dz" in table.columns or "dy" in table.columns or "dx" in table.columns:
        disp = np.column_stack([pd.to_numeric(table[c], errors="coerce").to_numpy(float)
                                if c in table.columns else np.full(len(table), np.nan)
                                for c in DISPLACEMENT_COLUMNS])
    else:
        disp = np.full((len(table), 3), np.nan)
    has_disp = np.isfinite(disp).all(axis=1)

    # the local motion of session t against session t-1 depends only on their detections (every
    # detection of t-1 is a track seen in t-1), so it is found for all sessions at once
    of_session = [np.flatnonzero(t_all == t) for t in range(n_sessions)]
    # each detection of session t mapped into session t-1 by registration alone
    rigid = {t: between(pos[rows], t, t - 1) for t, rows in enumerate(of_session) if t and len(rows)}
    local_motion: dict[int, np.ndarray] = {}
    jobs = {t: (rigid[t][~has_disp[rows]] * scale, pos[of_session[t - 1]] * scale)
            for t, rows in enumerate(of_session)
            if local_scale_um and t in rigid and len(of_session[t - 1]) and (~has_disp[rows]).any()}
    if jobs:
        found = _local_motions(list(jobs.values()), max(MOTION_SEARCH_UM, 2 * reach_um), local_scale_um, device)
        local_motion = dict(zip(jobs, found, strict=True))
    # where each detection of session t is expected in session t-1, µm
    expected: dict[int, np.ndarray] = {}
    for t, back in rigid.items():
        rows = of_session[t]
        expected[t] = np.where(has_disp[rows, None], pos[rows] + disp[rows], back) * scale
        if t in local_motion:
            expected[t][~has_disp[rows]] += local_motion[t]
    gate_um = _series_gate(expected, [pos[rows] * scale for rows in of_session]) if auto else float(gate_um)

    track_of_row = np.zeros(len(table), dtype=int)
    # active tracks: provisional key -> row index of its last detection
    last_row: dict[int, int] = {}
    # tracks missed in the last session(s): key -> expected position (voxels) in the last session's
    # frame, carried forward with the motion of the spines around it
    ghost: dict[int, np.ndarray] = {}
    next_key = 1
    link_um = np.full(len(table), np.nan)  # how far each linked detection lay from where it was expected
    for t in range(n_sessions):
        if should_stop is not None and should_stop():
            raise Cancelled("linking stopped")
        rows = of_session[t]
        # tracks that can no longer be continued
        for key in [k for k, r in last_row.items() if t_all[r] < t - 1 - max_gap]:
            del last_row[key]
            ghost.pop(key, None)
        linked = np.zeros(len(rows), dtype=bool)
        # residual motion of the spines linked frame-to-frame (beyond the rigid step), sampled at
        # their positions in session t-1: what moves the ghosts
        field_at, field = np.zeros((0, 3)), np.zeros((0, 3))

        # 1. frame-to-frame, to tracks seen in session t-1
        keys = [k for k, r in last_row.items() if t_all[r] == t - 1]
        if keys and len(rows):
            targets = pos[[last_row[k] for k in keys]] * scale
            src, dst = _assign(expected[t], targets, np.full(len(keys), gate_um))
            link_um[rows[src]] = np.linalg.norm(expected[t][src] - targets[dst], axis=1)
            for i, j in zip(src, dst, strict=True):
                track_of_row[rows[i]] = keys[j]
                last_row[keys[j]] = rows[i]
            linked[src] = True
            field_at, field = targets[dst], targets[dst] - rigid[t][src] * scale
        # tracks seen in t-1 and not found now become ghosts at their last position
        for key in keys:
            if t_all[last_row[key]] == t - 1:
                ghost[key] = pos[last_row[key]]

        # 2. gap closing, to tracks missed in the last 1..max_gap sessions, at their ghost
        #    positions moved into session t with the spines around them
        keys = list(ghost)  # a ghost is dropped with its track, so every ghost is active
        free = np.flatnonzero(~linked)
        if keys:
            before = np.array([ghost[k] for k in keys]) * scale
            moved = before - (_smooth_field(before, field_at, field, local_scale_um) if local_scale_um else 0)
            ahead = between(moved / scale, t - 1, t) if t else moved / scale
            for k, p in zip(keys, ahead, strict=True):
                ghost[k] = p
            if len(free):
                last_t = np.array([t_all[last_row[k]] for k in keys])
                gates = gate_um + gap_gate_growth_um * (t - 1 - last_t)
                src, dst = _assign(pos[rows[free]] * scale, ahead * scale, gates.astype(float))
                link_um[rows[free[src]]] = np.linalg.norm((pos[rows[free[src]]] - ahead[dst]) * scale, axis=1)
                for i, j in zip(src, dst, strict=True):
                    track_of_row[rows[free[i]]] = keys[j]
                    last_row[keys[j]] = rows[free[i]]
                    del ghost[keys[j]]
                linked[free[src]] = True

        # 3. the rest start new tracks
        for i in np.flatnonzero(~linked):
            track_of_row[rows[i]] = next_key
            last_row[next_key] = rows[i]
            next_key += 1
        if progress is not None:
            progress(t + 1, n_sessions)

    table["track_id"] = _renumber(track_of_row, t_all)
    table[LINK_COLUMN] = link_um
    log.debug("linked %d detections in %d sessions into %d tracks (gate %.2f µm%s)", len(table), n_sessions,
              table["track_id"].nunique(), gate_um, ", auto" if auto else "")
    table = table.sort_values(["t", "track_id"], kind="stable")
    table = validate_spine_table(table[list(REQUIRED_COLUMNS) + _extra(table)], source="linked detections")
    table.attrs.update(gate_um=gate_um, gate_auto=auto)
    return table


def _series_gate(expected_um: dict[int, np.ndarray], found_um: list[np.ndarray]) -> float:
    """The ``"auto"`` gate in µm: ``AUTO_GATE_PER_MEDIAN`` times the median distance between where
    each session's detections were expected in the session before (``expected_um[t]``) and the
    detections there (``found_um[t - 1]``) they are linked to under the probe gate, within
    ``AUTO_GATE_RANGE_UM``; ``FIXED_GATE_UM`` when fewer than ``MIN_PROBE_LINKS`` links are made.

    The median is that of the right links as long as most links are right, and it measures what a
    gate must tolerate: how well this series' spines are localised and how much its tissue
    deforms beyond what registration and the local motion follow.
    """
    distances = []
    for t, expected in expected_um.items():
        found = found_um[t - 1]
        src, dst = _assign(expected, found, np.full(len(found), PROBE_GATE_UM))
        distances.append(np.linalg.norm(expected[src] - found[dst], axis=1))
    distances = np.concatenate(distances) if distances else np.zeros(0)
    if len(distances) < MIN_PROBE_LINKS:
        return FIXED_GATE_UM
    return float(np.clip(AUTO_GATE_PER_MEDIAN * np.median(distances), *AUTO_GATE_RANGE_UM))


def _extra(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in REQUIRED_COLUMNS]


def _renumber(keys: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Ids 1, 2, ... in order of first appearance (session, then row)."""
    order = np.lexsort((np.arange(len(keys)), t))
    _, first = np.unique(keys[order], return_index=True)
    rank = np.empty(len(first), dtype=int)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1)
    uniq = np.unique(keys)
    return rank[np.searchsorted(uniq, keys)]


def suggested_tracks(spines: pd.DataFrame, suggestions: pd.DataFrame, voxel_size_um: Sequence[float] | float, *,
                     motion=None, gate_um: float = FIXED_GATE_UM, max_gap: int = DEFAULT_MAX_GAP) -> np.ndarray:
    """For each suggestion of a missed spine (``t, z, y, x`` voxels), the id of the track it would
    continue, or 0 (a new spine).

    A track is a candidate in a session where it has no point and was seen within ``max_gap + 1``
    sessions before or after it: a spine missed there, in the middle of its track or next to one
    end. Its expected place is the mean of its nearest points before and after, each moved into
    the session by ``motion`` (registration). Suggestions and candidates are paired one to one
    (Hungarian, as in linking) within ``gate_um``."""
    scale = parse_voxel_size(voxel_size_um)
    found = np.zeros(len(suggestions), dtype=int)
    if not len(suggestions) or not len(spines):
        return found
    columns = ["z", "y", "x"]
    t_spine = spines["t"].to_numpy(int)
    t_suggested = suggestions["t"].to_numpy(int)
    between = as_motion(motion, None, int(max(t_spine.max(), t_suggested.max())) + 1, scale).between
    points = pd.DataFrame({"track": spines["track_id"].to_numpy(int), "t": t_spine,
                           "row": np.arange(len(spines))}).sort_values(["track", "t"], kind="stable")
    positions = spines[columns].to_numpy(float)
    for t in np.unique(t_suggested):
        absent = points[~points["track"].isin(points.loc[points["t"] == t, "track"])]
        before = absent[(absent["t"] < t) & (absent["t"] >= t - 1 - max_gap)].groupby("track").last()
        after = absent[(absent["t"] > t) & (absent["t"] <= t + 1 + max_gap)].groupby("track").first()
        tracks = np.union1d(before.index, after.index)
        if not len(tracks):
            continue
        total, count = np.zeros((len(tracks), 3)), np.zeros(len(tracks))
        for side in (before, after):
            at = np.searchsorted(tracks, side.index.to_numpy())
            for source in np.unique(side["t"]):
                mine = side["t"].to_numpy() == source
                total[at[mine]] += between(positions[side["row"].to_numpy()[mine]], int(source), int(t))
                count[at[mine]] += 1
        expected_um = total / count[:, None] * scale
        rows = np.flatnonzero(t_suggested == t)
        src, dst = _assign(suggestions[columns].to_numpy(float)[rows] * scale, expected_um,
                           np.full(len(tracks), float(gate_um)))
        found[rows[src]] = tracks[dst]
    return found
