"""Where training batches come from: synthetic series and the user's training sets.

A :class:`SyntheticPool` keeps a few synthetic series on the model grid and renews one every few
batches; a :class:`BatchSource` cuts each batch's patches from it or from the user's reviewed
sessions (:func:`user_series`), in the training process or once per batch-preparing worker
(:func:`worker_source`), each with its own seeds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import Cancelled, InputError
from .batches import PatchOptions, PreparedSeries, make_batch, prepare_series, sample_patch
from .register import RigidMotion

log = logging.getLogger(__name__)

#: the first seed of training's synthetic series; validation (1500+), tuning (2000+) and the
#: benchmark's test series (1000+) lie far below
TRAINING_SEED_BASE = 100_000
#: presets (tuned on a real stack, see benchmarks/realism.py) that part of the pool is drawn from,
#: with fresh seeds; the rest comes from SynthConfig.random (domain randomisation)
REALISTIC_PRESETS = ("default", "large_drift", "low_snr", "crowded")
#: (preset, relative weight): the default mix, the realistic presets equally
DEFAULT_PRESETS = tuple((name, 1.0) for name in REALISTIC_PRESETS)
#: the synthetic engine's distractors that ``--hard-negative-weight`` weights: axon boutons, 97 of
#: the 99 false detections near a distractor in the `crowded` test series. Weighting the shaft
#: varicosities too scored the same within noise (docs/model_report.md, "Hard negatives"); a bump on the shaft is
#: also what a stubby spine looks like, so they are left out.
HARD_NEGATIVE_KINDS = ("bouton",)

#: µm, (low, high) of z and of y, x: the voxels a realistic preset is rendered at under
#: ``coarse_fraction``. In-vivo spine imaging often steps 1 µm or more in z and samples 0.15-0.25 µm
#: per pixel, while the presets (and the model grid) are 0.5 x 0.1 x 0.1 µm.
COARSE_VOXEL_UM = {"z": (0.5, 1.5), "yx": (0.1, 0.25)}


#: synthetic seeds per batch-preparing worker (a pool uses one per ``pool_refresh_every`` batches)
WORKER_SEED_STRIDE = 4_000
MAX_WORKERS = 24


def pool_first_seed(pool_seed: int, worker: int = 0) -> int:
    """The first synthetic seed of a pool. Validation (1500+) and benchmark (1000+) seeds are far
    below, so training never sees them; each batch-preparing worker draws from its own range."""
    return TRAINING_SEED_BASE + pool_seed * 100_000 + worker * WORKER_SEED_STRIDE


class SyntheticPool:
    """A pool of synthetic series on the model grid; one is replaced every few steps.

    A share ``realistic_fraction`` of the series come from the presets tuned to look like a real
    two-photon stack (fresh seeds), the rest from the widely randomised engine. A share
    ``coarse_fraction`` of the preset series is rendered at voxels drawn from
    :data:`COARSE_VOXEL_UM` (with its own random stream, so 0 draws exactly as before).
    """

    def __init__(self, size: int, model_voxel_um, normalization, seed: int, patch: PatchOptions,
                 realistic_fraction: float = 0.0, worker: int = 0,
                 presets: Sequence[tuple[str, float]] = DEFAULT_PRESETS, coarse_fraction: float = 0.0):
        self.model_voxel_um, self.normalization, self.patch = model_voxel_um, normalization, patch
        self.realistic_fraction, self.coarse_fraction = realistic_fraction, coarse_fraction
        self.presets = [name for name, _ in presets]
        weights = np.asarray([w for _, w in presets], float)
        self.preset_p = None if np.all(weights == weights[0]) else weights / weights.sum()
        self.first_seed = self.next_seed = pool_first_seed(seed, worker)
        self.series: list[PreparedSeries] = []
        self.size = size

    def fill(self, should_stop=None, progress=None) -> None:
        while len(self.series) < self.size:
            if should_stop is not None and should_stop():
                raise Cancelled("training cancelled")
            self.series.append(self._make())
            if progress is not None:
                progress(len(self.series), self.size)

    def refresh(self) -> None:
        self.series.pop(0)
        self.series.append(self._make())

    def config(self, seed: int):
        """The ``SynthConfig`` of the pool's series number ``seed`` (before it is sized for patches)."""
        from .synth import SynthConfig

        draw = np.random.default_rng(seed)
        if draw.random() < self.realistic_fraction:
            # equal weights draw as before weights existed, so earlier pools stay reproducible
            pick = (draw.integers(len(self.presets)) if self.preset_p is None
                    else draw.choice(len(self.presets), p=self.preset_p))
            config = SynthConfig.preset(self.presets[pick], seed=seed)
            if self.coarse_fraction:
                coarse = np.random.default_rng([seed, 0xC0A25E])
                if coarse.random() < self.coarse_fraction:
                    yx = coarse.uniform(*COARSE_VOXEL_UM["yx"])
                    config = config.replace(voxel_size_um=(coarse.uniform(*COARSE_VOXEL_UM["z"]), yx, yx))
        else:
            config = SynthConfig.random(seed)
        return config

    def sized_config(self, seed: int):
        """:meth:`config`, sized for patches: enough native voxels for a patch plus room to move it
        around (at this draw's voxel size), and a session more than a patch holds."""
        config = self.config(seed)
        room = np.asarray(self.patch.shape) + np.asarray([8, 48, 48])
        native = np.ceil(room * np.asarray(self.model_voxel_um) / np.asarray(config.voxel_size_um))
        return config.replace(sessions=max(self.patch.sessions + 1, 4), shape=tuple(int(n) for n in native))

    def _make(self) -> PreparedSeries:
        from .synth import synthesize_series

        seed = self.next_seed
        self.next_seed += 1
        synth = synthesize_series(self.sized_config(seed))
        # the true motion, turns included (a preset such as `rotated` turns its sessions about the
        # field centre), so that each session's patch is cut where the spines went
        voxel = np.asarray(synth.voxel_size_um, float)
        motion = RigidMotion(synth.drift_um / voxel, np.radians(synth.rotation_deg),
                             0.5 * (np.asarray(synth.image.shape[1:], float) - 1), voxel)
        return prepare_series(synth.image, synth.voxel_size_um, synth.truth, self.model_voxel_um,
                              self.normalization, motion=motion, name=f"synth-{seed}",
                              distractors=synth.distractors[synth.distractors["kind"].isin(HARD_NEGATIVE_KINDS)])


@dataclass
class SourceSpec:
    """What a :class:`BatchSource` is made of, picklable so that worker processes can build theirs."""

    pool_size: int
    pool_seed: int
    seed: int
    rank: int
    model_voxel_um: tuple
    normalization: dict
    patch: PatchOptions
    realistic_fraction: float
    presets: tuple
    coarse_fraction: float
    user_series: list
    synthetic_fraction: float
    batch_size: int
    out_shape: tuple
    stride: tuple
    out_voxel_um: tuple
    refresh_every: int
    hard_negative_weight: float = 1.0


class BatchSource:
    """Training batches as numpy arrays (see :func:`make_batch`).

    Each batch comes from the synthetic pool or, with probability ``1 - synthetic_fraction``, from
    the user's series; the pool renews one series every ``refresh_every`` batches. Built in the
    training process (``workers == 0``) or once per worker process, each with its own seeds.
    """

    def __init__(self, spec: SourceSpec, worker: int | None = None):
        in_process = worker is None
        self.spec = spec
        self.pool = SyntheticPool(spec.pool_size, spec.model_voxel_um, spec.normalization, spec.pool_seed,
                                  spec.patch, spec.realistic_fraction, worker=0 if in_process else worker,
                                  presets=spec.presets, coarse_fraction=spec.coarse_fraction)
        key = [spec.seed, spec.rank] if in_process else [spec.seed, spec.rank, worker + 1]
        self.rng = np.random.default_rng(key)
        self.count = 0

    def fill(self, should_stop=None, progress=None) -> None:
        self.pool.fill(should_stop=should_stop, progress=progress)

    def next(self) -> dict[str, np.ndarray]:
        spec, rng = self.spec, self.rng
        use_user = spec.user_series and (not self.pool.series or rng.random() >= spec.synthetic_fraction)
        sources = spec.user_series if use_user else self.pool.series
        patches = [sample_patch(sources[rng.integers(len(sources))], rng, spec.patch, spec.model_voxel_um)
                   for _ in range(spec.batch_size)]
        sessions = min(p[0].shape[0] for p in patches)
        patches = [(img[:sessions], pts[:sessions], lab[:sessions]) for img, pts, lab in patches]
        arrays = make_batch(patches, spec.out_shape, spec.stride, spec.out_voxel_um, spec.hard_negative_weight)
        self.count += 1
        if self.pool.series and self.count % spec.refresh_every == 0:
            self.pool.refresh()
        return arrays


def worker_source(spec: SourceSpec, worker: int, workers: int) -> BatchSource:
    """Worker ``worker`` of ``workers``: a share of the pool (at least two series), own seeds."""
    share = dataclasses.replace(spec, pool_size=max(2, math.ceil(spec.pool_size / workers)) if spec.pool_size else 0)
    return BatchSource(share, worker=worker)


def default_workers(device, world: int = 1) -> int:
    """Batch-preparing processes: none on a CPU (training uses its cores), up to 8 per GPU."""
    if device.type != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) // max(world, 1) - 2))


def user_series(datasets: Sequence[Path], model_voxel_um, normalization, rng: np.random.Generator):
    """Training-set items -> (training PreparedSeries, validation (name, image, voxel, table, sessions)).

    Only reviewed sessions are labels. Of items with at least two reviewed sessions, about a
    quarter of those sessions (at least one) are held out for validation and early stopping: they
    are not labels for training.
    """
    from ..io.trainset import read_training_set
    from .register import estimate_motion

    train, val = [], []
    for folder in datasets:
        for item in read_training_set(folder):
            image = np.asarray(item.load_image())
            spines = item.load_spines()
            reviewed = sorted(int(s) for s in item.reviewed_sessions)
            if not reviewed:
                log.warning("%s: no reviewed session, nothing to learn from; skipped", item.name)
                continue
            held = []
            if len(reviewed) >= 2:
                n_held = max(1, len(reviewed) // 4)
                held = sorted(rng.choice(reviewed, n_held, replace=False).tolist())
            kept = [s for s in reviewed if s not in held]
            motion = estimate_motion(image, item.voxel_size_um) if image.shape[0] > 1 else None
            train.append(prepare_series(image, item.voxel_size_um, spines, model_voxel_um, normalization,
                                        labelled_sessions=kept, motion=motion, name=item.name))
            if held:
                val.append((item.name, image, item.voxel_size_um, spines, held))
    if not train:
        raise InputError("the training sets hold no reviewed session: mark sessions reviewed in the "
                         "widget (or list them in reviewed_sessions) before training.")
    return train, val
