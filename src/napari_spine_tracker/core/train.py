"""Training and fine-tuning SpineNet (``napari-spine-tracker train``).

From scratch, batches come from the synthetic data engine (a pool of randomised series, renewed as
training goes). Fine-tuning (``init`` given, training sets given) mixes the user's corrected
series with synthetic replay, so the model adapts to the lab's microscope without forgetting.
Every ``val_every`` steps the model runs the real detection pipeline (tiled inference, peak
decoding, linking) on fixed held-out series and is scored with the project's metrics; the best
model so far is what the output checkpoint holds (written atomically), together with the
threshold that scored best. A run can be resumed (``resume=True``) from its ``.resume.pt`` file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, InputError, number_or_nan
from .batches import PatchOptions
from .decode import DEFAULT_DECODE
from .intensity import DEFAULT_NORMALIZATION
from .sources import (
    COARSE_VOXEL_UM,
    DEFAULT_PRESETS,
    HARD_NEGATIVE_KINDS,
    MAX_WORKERS,
    REALISTIC_PRESETS,
    WORKER_SEED_STRIDE,
    BatchSource,
    SourceSpec,
    default_workers,
    pool_first_seed,
    user_series,
    worker_source,
)

log = logging.getLogger(__name__)

MODEL_VOXEL_UM = (0.5, 0.1, 0.1)
#: held-out synthetic validation series for model selection: (preset, seed). The benchmark's test
#: series (core/bench.py) use seeds 1000-1002, which training never sees; training series are drawn
#: from seed sources.TRAINING_SEED_BASE on.
SYNTHETIC_VALIDATION = (("default", 1500), ("large_drift", 1501), ("low_snr", 1502), ("crowded", 1503),
                        ("default", 1504), ("crowded", 1505))
VALIDATION_SHAPE = {"sessions": 4, "shape": (24, 128, 128)}
#: validation seeds stay below the tuning seeds (2000+) that benchmarks make choices on
MAX_VALIDATION_SERIES = 500
#: the moving average's decay when learning from training sets (``ema`` left None): a fine-tune
#: runs a few hundred steps, and 0.99 averages over about the last hundred of them
FINE_TUNING_EMA = 0.99
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


@dataclass
class TrainOptions:
    out: Path
    datasets: Sequence[Path] = ()
    init: str | None = None
    steps: int | None = None
    minutes: float | None = None
    device: str = "auto"
    size: str | None = None  # from scratch: "lean"; with init: grow into this preset
    batch_size: int | None = None
    seed: int = 0
    resume: bool = False
    lr: float | None = None
    val_every: int | None = None  # None: every 250 steps from scratch, 100 when fine-tuning
    pool_size: int = 24
    pool_refresh_every: int = 8
    workers: int | None = None  # batch-preparing processes; None: 0 on a CPU, up to 8 beside a GPU
    synthetic_fraction: float | None = None  # None: 1.0 from scratch, 0.5 when fine-tuning (replay)
    realistic_fraction: float = 0.5  # of the synthetic series: from the realistic presets
    #: the presets the realistic share is drawn from, with their relative weights
    presets: Sequence[tuple[str, float]] = DEFAULT_PRESETS
    #: of the realistic presets' series: rendered at coarser voxels (COARSE_VOXEL_UM) than their own
    coarse_fraction: float = 0.0
    #: weight of the heatmap's negative term at the synthetic engine's look-alikes of a spine head
    #: (HARD_NEGATIVE_KINDS), against 1 elsewhere; 1 trains as before
    hard_negative_weight: float = 1.0
    #: decay of an exponential moving average of the weights, which is what is validated and
    #: saved (0: off, the weights as trained; 0.999 averages over about the last 1000 steps);
    #: None: FINE_TUNING_EMA when training sets are given, else off (see :attr:`moving_average`)
    ema: float | None = None
    patch: PatchOptions = field(default_factory=PatchOptions)
    validation: Sequence[tuple[str, int]] = SYNTHETIC_VALIDATION
    validation_shape: dict = field(default_factory=lambda: dict(VALIDATION_SHAPE))
    command_line: str = ""

    @property
    def validation_interval(self) -> int:
        """Steps between validations. Fine-tuning runs a few hundred steps in its default budget,
        so it validates more often: more checkpoints to choose from, at ~25 s each on a CPU."""
        if self.val_every is not None:
            return int(self.val_every)
        return 100 if self.init else 250

    @property
    def moving_average(self) -> float:
        """The decay of the weights' moving average (0: none). Learning from a user's corrections
        averages by default: on a second microscope's series the short fine-tune then gained
        where the weights as trained did not, and forgot less (docs/model_report.md, "Learning from
        corrections"). Training on synthetic data alone does not, so that the recorded commands
        of the shipped weights make the same weights."""
        if self.ema is not None:
            return float(self.ema)
        return FINE_TUNING_EMA if self.datasets else 0.0

    @classmethod
    def from_args(cls, args) -> TrainOptions:
        """Options from the ``train`` command line; flags left out keep the defaults."""
        given = {name: getattr(args, name, None) for name in
                 ("init", "steps", "minutes", "batch_size", "lr", "val_every", "pool_size", "synthetic_fraction",
                  "realistic_fraction", "coarse_fraction", "hard_negative_weight", "ema", "workers")}
        if getattr(args, "presets", None):
            given["presets"] = parse_presets(args.presets)
        if getattr(args, "val_series", None) is not None:
            given["validation"] = validation_cases(args.val_series)
        options = cls(out=Path(args.out), datasets=[Path(d) for d in args.datasets], device=args.device,
                      size=args.size, seed=args.seed, resume=args.resume,
                      command_line=" ".join(["napari-spine-tracker", *sys.argv[1:]]),
                      **{k: v for k, v in given.items() if v is not None})
        patch = {"shape": tuple(args.patch) if getattr(args, "patch", None) else None,
                 "sessions": getattr(args, "patch_sessions", None), "jitter_um": getattr(args, "jitter_um", None)}
        patch = {k: v for k, v in patch.items() if v is not None}
        if patch:
            options.patch = dataclasses.replace(options.patch, **patch)
        return options


# ---------------------------------------------------------------------------------------------
# options and validation series


def validation_cases(count: int) -> tuple[tuple[str, int], ...]:
    """``count`` held-out synthetic validation series (preset, seed): the six of
    :data:`SYNTHETIC_VALIDATION` first, then the realistic presets in turn with seeds 1506, 1507, ...

    Six series rank checkpoints only to about 0.01 F1; more cost validation time in proportion.
    """
    value = number_or_nan(count)
    if not (np.isfinite(value) and value == int(value) and 1 <= value <= MAX_VALIDATION_SERIES):
        raise InputError(f"--val-series must be a whole number of series from 1 to {MAX_VALIDATION_SERIES}, "
                         f"got {count!r}.")
    count = int(value)
    base = SYNTHETIC_VALIDATION[0][1]
    more = tuple((REALISTIC_PRESETS[i % len(REALISTIC_PRESETS)], base + i)
                 for i in range(len(SYNTHETIC_VALIDATION), count))
    return (SYNTHETIC_VALIDATION + more)[:count]


def parse_presets(items: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """``["default", "low_snr:2"]`` -> ``(("default", 1.0), ("low_snr", 2.0))``: synthetic presets
    with relative weights (1 when left out), checked."""
    from .synth import PRESETS

    out = []
    for item in items:
        name, _, weight = str(item).partition(":")
        if name not in PRESETS:
            raise InputError(f"--presets: unknown synthetic preset {name!r}; choose from {', '.join(PRESETS)}.")
        value = number_or_nan(weight) if weight else 1.0
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"--presets: the weight of {name!r} must be a positive number, as in {name}:2 "
                             f"(got {weight!r}).")
        out.append((name, value))
    if not out:
        raise InputError("--presets: name at least one synthetic preset.")
    return tuple(out)


def check_fraction(value, name: str) -> float:
    """``value`` as a share in [0, 1], or an InputError naming the option."""
    number = number_or_nan(value)
    if not (np.isfinite(number) and 0 <= number <= 1):
        raise InputError(f"--{name.replace('_', '-')} must be a share between 0 and 1, got {value!r}.")
    return number


def _validation_series(options: TrainOptions):
    """The fixed held-out synthetic series: (name, SynthSeries)."""
    from .synth import SynthConfig, synthesize_series

    return [(f"{preset}-{seed}", synthesize_series(SynthConfig.preset(preset, seed=seed, **options.validation_shape)))
            for preset, seed in options.validation]


# ---------------------------------------------------------------------------------------------
# loss


def compute_loss(outputs: dict, batch: dict) -> tuple[Any, dict[str, float]]:
    """CenterNet focal loss on the heatmap; L1 on offset, displacement (µm) and size (µm).

    Sessions not labelled (``batch["labelled"]`` 0) contribute nothing: an unmarked spot there
    is not a negative. ``batch["negative_weight"]``, when present, weights the negative term
    voxel by voxel (hard negatives, see :func:`~napari_spine_tracker.core.targets.negative_weights`).
    """
    import torch
    from torch.nn import functional as F

    session = batch["labelled"][:, :, None, None, None, None]  # (B, T, 1, 1, 1, 1)
    logits = outputs["heatmap"].float()
    gt = batch["heatmap"]
    pos = (gt >= 1.0).float() * session
    neg = (1 - (gt >= 1.0).float()) * session
    if "negative_weight" in batch:
        neg = neg * batch["negative_weight"]
    p = torch.sigmoid(logits)
    pos_loss = -(F.logsigmoid(logits) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(F.logsigmoid(-logits) * p**2 * (1 - gt) ** 4 * neg).sum()
    n_pos = pos.sum().clamp(min=1.0)
    focal = (pos_loss + neg_loss) / n_pos

    # the other heads at the centres only (``batch["centre"]``: b, t, z, y, x per row)
    b, t, z, y, x = batch["centre"].long().unbind(1)
    labelled = batch["labelled"][b, t]

    def point_l1(name: str, flag: str | None = None):
        predicted = outputs[name][b, t, :, z, y, x].float()  # (N, C)
        weight = labelled if flag is None else labelled * batch[flag]
        diff = (predicted - batch[name].reshape(predicted.shape)).abs() * weight[:, None]
        return diff.sum() / weight.sum().clamp(min=1.0)

    parts = {
        "focal": focal,
        "offset": point_l1("offset"),
        "displacement": point_l1("displacement", "has_previous"),
        "size": point_l1("size", "has_size"),
    }
    total = parts["focal"] + parts["offset"] + 0.5 * parts["displacement"] + 0.5 * parts["size"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# validation


def validate(model, cases, thresholds: Sequence[float] = THRESHOLDS, views: int = 1,
             linking: Sequence[bool] = (True, False)) -> dict[str, Any]:
    """Run detection on each validation case and score it for each decoding choice.

    ``cases``: (name, image (T,Z,Y,X), voxel_size_um, truth table, sessions to score or None).
    The choices are the peak threshold and whether linking uses the network's displacement head
    or registration alone; the best pair (highest mean of F1 and IDF1 over cases) is returned with
    its per-case figures, and becomes the checkpoint's decoding defaults. ``linking``: the
    ``use_displacement`` choices to try. ``views``: test-time augmentation (core/infer.py), for
    measuring it; training validates without.
    """
    from .infer import InferenceOptions, predict_series
    from .link import link_detections
    from .metrics import evaluate_tracks
    from .register import estimate_motion

    choices = [(thr, use) for thr in thresholds for use in linking]
    results: dict[tuple[float, bool], list[dict]] = {choice: [] for choice in choices}
    for name, image, voxel, truth, sessions in cases:
        motion = estimate_motion(image, voxel) if image.shape[0] > 1 else None
        detections = predict_series(image, voxel, model, motion=motion,
                                    options=InferenceOptions(threshold=min(thresholds), views=views))
        if sessions is not None:
            truth = truth[truth["t"].isin(sessions)]
        for thr, use_displacement in choices:
            kept = detections[detections["score"] >= thr]
            if not use_displacement:
                kept = kept.drop(columns=["dz", "dy", "dx"])
            table = link_detections(kept, voxel, motion=motion)
            if sessions is not None:
                table = table[table["t"].isin(sessions)]
            scores = evaluate_tracks(table, truth, voxel)
            results[(thr, use_displacement)].append(
                {"case": name, **{k: scores[k] for k in ("f1", "idf1", "precision", "recall")}})

    threshold, use_displacement = max(choices, key=lambda choice: _quality(results[choice]))
    rows = results[(threshold, use_displacement)]
    return {
        "threshold": threshold,
        "use_displacement": use_displacement,
        "score": _quality(rows),
        "f1": float(np.mean([r["f1"] for r in rows])) if rows else 0.0,
        "idf1": float(np.mean([r["idf1"] for r in rows])) if rows else 0.0,
        "cases": rows,
    }


#: fine-tuning may cost this much of the initial model's synthetic validation score (mean of F1
#: and IDF1) before a checkpoint counts as forgetting
FORGETTING_TOLERANCE = 0.02


def selection_score(result: dict[str, Any], synthetic_baseline: float | None) -> float:
    """How a validation ``result`` ranks checkpoints.

    From scratch (no baseline): the mean score over all cases. Fine-tuning (``synthetic_baseline``
    is the initial model's score on the synthetic cases): the score on the user's held-out
    sessions, less ten times whatever the synthetic score fell beyond
    :data:`FORGETTING_TOLERANCE` below the baseline, so a checkpoint that learned the user's
    microscope by forgetting the rest loses to one that did not.
    """
    user = [r for r in result["cases"] if _is_user_case(r["case"])]
    synthetic = [r for r in result["cases"] if not _is_user_case(r["case"])]
    if synthetic_baseline is None or not user or not synthetic:
        return float(result["score"])
    forgotten = max(0.0, synthetic_baseline - FORGETTING_TOLERANCE - _quality(synthetic))
    return _quality(user) - 10.0 * forgotten


def _is_user_case(name) -> bool:
    """Validation cases named ``user:...`` are held-out sessions of the user's training sets."""
    return str(name).startswith("user:")


def _quality(rows) -> float:
    return float(np.mean([(r["f1"] + r["idf1"]) / 2 for r in rows])) if rows else 0.0


# ---------------------------------------------------------------------------------------------
# the loop


def averaged_model(net, decay: float):
    """An exponential moving average of ``net``'s weights and batch-norm statistics
    (:class:`torch.optim.swa_utils.AveragedModel`), updated with ``update_parameters(net)`` after
    each step. Its decay ramps up as ``(1 + n) / (10 + n)`` to ``decay`` over the first updates, so
    that early steps do not keep the starting weights for thousands of steps."""
    import torch
    from torch.optim.swa_utils import AveragedModel

    def update(averaged, current, n_averaged):
        if not averaged[0].is_floating_point():  # batch-norm step counters: the latest
            torch._foreach_copy_(averaged, current)
            return
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    average = AveragedModel(net, multi_avg_fn=update, use_buffers=True)
    return average.eval()


def _initial_model(options: TrainOptions):
    """(net, model_voxel_um, normalization, decode, provenance) from --init or from scratch."""
    from .model import SpineNet, build_config, grow_config, load_grown

    if options.init:
        from ..io.checkpoint import load_checkpoint
        from .models import resolve_model

        path = resolve_model(options.init)
        checkpoint = load_checkpoint(path)
        provenance = {"init": str(options.init), "init_training": checkpoint["training"]}
        if options.size and options.size != checkpoint["config"].get("preset"):
            try:
                net = SpineNet(grow_config(checkpoint["config"], options.size))
                provenance["grown_blocks"] = load_grown(net, checkpoint["state_dict"])
            except ValueError as exc:
                raise InputError(f"--size {options.size} with --init {options.init}: {exc}") from exc
            log.info("grew %s into %r: added %s, each starting as the identity", options.init, options.size,
                     ", ".join(provenance["grown_blocks"]) or "nothing")
        else:
            net = SpineNet(checkpoint["config"])
            net.load_state_dict(checkpoint["state_dict"])
        return (net, tuple(checkpoint["voxel_size_um"]), dict(checkpoint["normalization"]),
                dict(checkpoint["decode"]), provenance)
    try:
        net = SpineNet(build_config(options.size or "lean"))
    except ValueError as exc:
        raise InputError(f"--size: {exc}") from exc
    return net, MODEL_VOXEL_UM, dict(DEFAULT_NORMALIZATION), dict(DEFAULT_DECODE), {"init": None}


def _budget(options: TrainOptions, device) -> tuple[int, float | None]:
    """(steps, minutes): sensible defaults so that a user needs no flags but the datasets."""
    steps, minutes = options.steps, options.minutes
    if steps is None and minutes is None:
        if options.datasets:  # fine-tuning: within 10 minutes on a 2-core CPU, ~2 on a GPU
            minutes = 2.0 if device.type == "cuda" else 8.0
        else:
            steps = 20_000
    return (steps if steps is not None else 10**9), minutes


def _import_what_the_loop_needs() -> None:
    """Import now what validation and checkpoints import later: a run lasts hours, and if the
    package is upgraded (or, installed as editable, edited) meanwhile, a module first imported at
    the first validation would be the new one, out of step with the old ones already loaded (a
    run of this project died so at step 1000, its 1000 steps lost)."""
    from ..io import checkpoint  # noqa: F401
    from . import infer, link, metrics, models, register  # noqa: F401


def _resume_path(out: Path) -> Path:
    return out.with_name(out.stem + ".resume.pt")


def train_model(options: TrainOptions, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                on_log: Callable[[dict], None] | None = None) -> Path:
    """Train (or fine-tune) and write the best checkpoint to ``options.out``; returns its path.

    ``on_log(record)`` receives ``{"step", "loss", ...}`` records, and validation records with
    ``"validation"``; ``should_stop()`` cancels cleanly (the output keeps the best model validated
    so far, or is not created). Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on its
    own batches with DistributedDataParallel (``nccl`` on GPUs, ``gloo`` on CPUs); only rank 0
    validates and writes the checkpoint.
    """
    out = Path(options.out)
    if out.suffix != ".pt":
        raise InputError(f"--out must name a .pt checkpoint file, got {out}.")
    for name in ("realistic_fraction", "coarse_fraction", "synthetic_fraction"):
        if getattr(options, name) is not None:
            check_fraction(getattr(options, name), name)
    if not (np.isfinite(options.hard_negative_weight) and options.hard_negative_weight >= 1.0):
        raise InputError(f"--hard-negative-weight must be a number of at least 1 (1: off), "
                         f"got {options.hard_negative_weight}.")
    if not (np.isfinite(options.moving_average) and 0.0 <= options.moving_average < 1.0):
        raise InputError(f"--ema must be a decay in [0, 1) such as 0.999 (0: off), got {options.ema}.")
    _import_what_the_loop_needs()
    run = _Run(options, progress, should_stop, on_log)
    try:
        run.loop()
    finally:
        run.close()
    return out


class _Run:
    """One training run: model, data, optimiser, validation and checkpoints (one DDP rank)."""

    def __init__(self, options: TrainOptions, progress, should_stop, on_log):
        import torch

        from .devices import get_device

        self.options, self.progress, self.should_stop, self.on_log = options, progress, should_stop, on_log
        self.out = Path(options.out)
        self.dist = _init_distributed(get_device(options.device))
        self.device = self.dist.device
        self.rank0 = self.dist.rank == 0
        torch.manual_seed(options.seed + self.dist.rank)
        net, self.model_voxel, self.normalization, self.decode, self.provenance = _initial_model(options)
        self.steps, self.minutes = _budget(options, self.device)
        self.batch_size = options.batch_size or (32 if self.device.type == "cuda" else 4)
        self.lr = options.lr or (3e-4 if options.init else 2e-3)
        self.warmup = 50 if options.init else 200
        fraction = options.synthetic_fraction
        self.synthetic_fraction = fraction if fraction is not None else (0.5 if options.datasets else 1.0)
        # read and checked before any data is prepared (a pool takes minutes to fill)
        self.resume_file = _resume_path(self.out)
        resumed = None
        if options.resume and self.resume_file.exists():
            resumed = torch.load(self.resume_file, map_location="cpu", weights_only=True)
            if bool(options.moving_average) != ("ema" in resumed):
                raise InputError(f"{self.resume_file} was written by a run "
                                 f"{'with' if 'ema' in resumed else 'without'} --ema; resume it with the options "
                                 f"it started with.")

        user_train, user_val = ([], [])
        if options.datasets:
            user_train, user_val = user_series(options.datasets, self.model_voxel, self.normalization,
                                                np.random.default_rng(options.seed))
        stride = net.output_stride
        self.spec = SourceSpec(
            pool_size=options.pool_size if self.synthetic_fraction > 0 else 0,
            pool_seed=options.seed * 16 + self.dist.rank, seed=options.seed, rank=self.dist.rank,
            model_voxel_um=tuple(self.model_voxel),
            normalization=self.normalization, patch=options.patch, realistic_fraction=options.realistic_fraction,
            presets=tuple(options.presets), coarse_fraction=options.coarse_fraction, user_series=user_train,
            synthetic_fraction=self.synthetic_fraction,
            batch_size=self.batch_size,
            out_shape=tuple(int(n // s) for n, s in zip(options.patch.shape, stride)), stride=tuple(stride),
            out_voxel_um=tuple(v * s for v, s in zip(self.model_voxel, stride)),
            refresh_every=options.pool_refresh_every, hard_negative_weight=options.hard_negative_weight)
        self.workers = options.workers if options.workers is not None else default_workers(self.device, self.dist.world)
        if not 0 <= self.workers <= MAX_WORKERS:
            raise InputError(f"--workers must be between 0 and {MAX_WORKERS}, got {self.workers}.")
        self.source, self.batches = None, None
        if self.workers == 0:
            self.source = BatchSource(self.spec)
            self.source.fill(should_stop=should_stop)
        else:
            from functools import partial

            from .loader import worker_batches

            self.batches = worker_batches(partial(worker_source, self.spec), self.workers,
                                          pin_memory=self.device.type == "cuda")
        self.val_cases = []
        if self.rank0:
            self.val_cases = [(name, s.image, s.voxel_size_um, s.truth, None)
                              for name, s in _validation_series(options)]
            self.val_cases += [(f"user:{n}", image, voxel, table, sessions)
                               for n, image, voxel, table, sessions in user_val]

        self.net = net.to(self.device)
        if self.device.type in ("cpu", "cuda"):
            self.net = self.net.to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        # rank 0 validates and saves, so it alone keeps the average
        decay = options.moving_average
        self.ema = averaged_model(self.net, decay) if decay and self.rank0 else None
        self.step, self.best, self.history = 0, None, []
        self.validated_step = None  # the same on every rank (``best`` is known to rank 0 only)
        self.prior_minutes = 0.0  # spent before a resume: budgets and records count the whole run
        self.synthetic_baseline = None  # fine-tuning: the initial model's synthetic validation score
        if resumed is not None:
            self.net.load_state_dict(resumed["state_dict"])
            self.optimizer.load_state_dict(resumed["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(resumed["ema"])
            self.step, self.best, self.history = int(resumed["step"]), resumed["best"], list(resumed["history"])
            self.prior_minutes = float(resumed.get("minutes", 0.0))
            self.synthetic_baseline = resumed.get("synthetic_baseline")
            self.validated_step = self.step  # the resume file is written when a step is validated
            log.info("resumed at step %d from %s", self.step, self.resume_file)
        self.forward = self.dist.wrap(self.net)
        self.started = time.monotonic()

    # -- one step ---------------------------------------------------------------------------
    def lr_at(self, step: int, fraction: float) -> float:
        """Linear warm-up, then a cosine decay to zero over the run (``fraction`` of the budget spent)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))

    def budget_fraction(self) -> float:
        """How much of the budget is spent: steps or minutes, whichever runs out first (agreed by all ranks,
        so that every rank takes the same learning rate)."""
        fraction = self.step / self.steps if self.steps < 10**9 else 0.0
        if self.minutes is not None:
            fraction = max(fraction, self.elapsed_minutes() / self.minutes)
        return self.dist.max(fraction)

    def batch(self) -> dict:
        """The next batch, as tensors on the training device (float32, and the centres' indices)."""
        import torch

        if self.batches is not None:
            arrays = next(self.batches)
        else:
            arrays = {name: torch.from_numpy(value) for name, value in self.source.next().items()}
        moved = {name: value.to(self.device, non_blocking=True) for name, value in arrays.items()}
        return {name: value.float() if value.is_floating_point() else value for name, value in moved.items()}

    def train_step(self, fraction: float) -> dict:
        """One optimisation step, at the learning rate for ``fraction`` of the budget spent."""
        import torch

        from .devices import autocast

        batch = self.batch()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, fraction)
        with autocast(self.device):
            outputs = self.forward(batch["image"])
        loss, parts = compute_loss(outputs, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.net)
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), **parts}

    # -- the loop -----------------------------------------------------------------------------
    def elapsed_minutes(self) -> float:
        return self.prior_minutes + (time.monotonic() - self.started) / 60

    def wants_stop(self) -> tuple[bool, bool, float]:
        """(stop, cancelled, fraction of the budget spent), agreed by all ranks."""
        cancelled = self.dist.any(bool(self.should_stop is not None and self.should_stop()))
        fraction = self.budget_fraction()
        return cancelled or fraction >= 1.0, cancelled, fraction

    @property
    def kept_net(self):
        """What is validated and saved: the moving average of the weights with ``--ema``, else the
        network being trained."""
        return self.ema.module if self.ema is not None else self.net

    def loaded(self):
        """The network validated and saved (:attr:`kept_net`), with its grid, normalisation and
        decoding, as a model to detect with."""
        from .models import LoadedModel

        return LoadedModel(self.kept_net, self.device, self.model_voxel, self.normalization, self.decode)

    def measure_baseline(self) -> None:
        """Fine-tuning with held-out user sessions: score the initial model on the synthetic
        validation cases, the level that checkpoints must keep (see :func:`selection_score`)."""
        synthetic = [case for case in self.val_cases if not _is_user_case(case[0])]
        if not (self.rank0 and self.options.init and synthetic and len(synthetic) < len(self.val_cases)):
            return
        self.kept_net.eval()
        result = validate(self.loaded(), synthetic)
        self.synthetic_baseline = float(result["score"])
        log.info("initial model: synthetic validation F1 %.3f IDF1 %.3f; checkpoints must stay within %.2f",
                 result["f1"], result["idf1"], FORGETTING_TOLERANCE)

    def loop(self) -> None:
        if self.synthetic_baseline is None and self.step == 0:
            self.measure_baseline()
        first_step, recent, loop_started = self.step, [], time.monotonic()
        self.net.train()
        while True:
            stop, cancelled, fraction = self.wants_stop()
            if cancelled:
                if self.out.exists():
                    log.warning("training cancelled; %s holds the best model validated so far", self.out)
                raise Cancelled("training cancelled")
            if stop:
                break
            record = self.train_step(fraction)
            recent.append(record["loss"])
            if self.step % 50 == 0 and self.rank0:
                rate = (self.step - first_step) / max(time.monotonic() - loop_started, 1e-9)
                log.info("step %d: loss %.4f (%s), %.2f steps/s", self.step, float(np.mean(recent[-50:])),
                         ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in ("step", "loss")), rate)
            if self.on_log is not None:
                self.on_log(record)
            self.report_progress()
            if self.step % self.options.validation_interval == 0:
                self.validate_and_save()
        if self.validated_step != self.step:  # all ranks agree, so all reach the barrier inside
            self.validate_and_save()
        if self.rank0:
            self.resume_file.unlink(missing_ok=True)

    def report_progress(self) -> None:
        if self.progress is None:
            return
        if self.minutes is not None:
            self.progress(int(1000 * min(1.0, self.elapsed_minutes() / self.minutes)), 1000)
        else:
            self.progress(self.step, self.steps)

    # -- validation and checkpoints -------------------------------------------------------------
    def validate_and_save(self) -> None:
        import torch

        from ..io.checkpoint import save_checkpoint

        if self.rank0:
            self.kept_net.eval()
            result = validate(self.loaded(), self.val_cases)
            self.net.train()
            score = selection_score(result, self.synthetic_baseline)
            self.history.append({"step": self.step, "f1": result["f1"], "idf1": result["idf1"],
                                 "score": score, "minutes": self.elapsed_minutes()})
            log.info("step %d: validation F1 %.3f IDF1 %.3f (threshold %.2f)", self.step, result["f1"],
                     result["idf1"], result["threshold"])
            if self.on_log is not None:
                self.on_log({"step": self.step, "validation": result})
            if self.best is None or score > self.best["score"]:
                self.best = {"score": score, "step": self.step}
                checkpoint = self.snapshot(result)
                save_checkpoint(self.out, checkpoint)
                _write_sidecar(self.out, checkpoint)
            state = {"state_dict": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": self.step, "best": self.best, "history": self.history,
                     "minutes": self.elapsed_minutes(), "synthetic_baseline": self.synthetic_baseline}
            if self.ema is not None:
                state["ema"] = self.ema.state_dict()
            torch.save(state, self.resume_file)
        self.validated_step = self.step
        self.dist.barrier()

    def snapshot(self, validation: dict) -> dict[str, Any]:
        options = self.options
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.kept_net.state_dict().items()}
        return {
            "config": self.kept_net.config,
            "voxel_size_um": list(self.model_voxel),
            "normalization": self.normalization,
            "decode": {**self.decode, "threshold": validation["threshold"],
                       "use_displacement": validation["use_displacement"]},
            "state_dict": state,
            "training": {
                "command_line": options.command_line,
                "datasets": [str(d) for d in options.datasets],
                "synthetic_fraction": self.synthetic_fraction,
                "steps": self.step,
                "batch_size": self.batch_size * self.dist.world,
                "workers": self.workers,
                "processes": self.dist.world,
                "patch_shape": list(options.patch.shape),
                "sessions_per_patch": options.patch.sessions,
                "seed": options.seed,
                "ema": options.moving_average,
                "synthetic_seeds": self.seeds_description(),
                "validation": validation,
                "validation_cases": [list(v) for v in options.validation],
                "synthetic_baseline": self.synthetic_baseline,
                "history": list(self.history),
                "hardware": _hardware(self.device),
                "minutes": self.elapsed_minutes(),
                **{k: v for k, v in self.provenance.items() if k != "init_training"},
            },
        }

    def seeds_description(self) -> str:
        first = pool_first_seed(self.spec.pool_seed)
        where = (f"n from {first}" if self.workers == 0 else
                 f"n from {first} + {WORKER_SEED_STRIDE} w for worker w of {self.workers}")
        presets = self.options.presets
        if len({w for _, w in presets}) == 1:
            which = f"one of {tuple(name for name, _ in presets)}"
        else:
            which = "one of " + ", ".join(f"{name} (weight {w:g})" for name, w in presets)
        coarse = (f" (a share {self.options.coarse_fraction} of them at voxels z {COARSE_VOXEL_UM['z']}, "
                  f"y x {COARSE_VOXEL_UM['yx']} µm)" if self.options.coarse_fraction else "")
        hard = (f"; the heatmap's negative term weighted {self.options.hard_negative_weight:g}x at their "
                f"{' and '.join(k + 's' for k in HARD_NEGATIVE_KINDS)}" if self.options.hard_negative_weight != 1.0
                else "")
        return (f"{where}: SynthConfig.random(n), or with probability {self.options.realistic_fraction} "
                f"SynthConfig.preset({which}, n){coarse}{hard}")

    def close(self) -> None:
        from .devices import free_memory

        self.batches = None  # stops the worker processes
        free_memory(self.device)
        self.dist.close()


@dataclass
class _Distributed:
    """This process's place in a ``torchrun`` job (world 1 when run plainly)."""

    device: Any
    world: int = 1
    rank: int = 0
    # The last few tensors given to a collective, kept alive on purpose: gloo's worker thread lets
    # go of a finished collective's tensor a moment after the call returns, and if it held the last
    # reference it needs the GIL to free it; at interpreter exit that aborts the process ("terminate
    # called without an active exception", pytorch/pytorch#190489) after a finished run.
    held: deque = field(default_factory=lambda: deque(maxlen=4))

    def wrap(self, net):
        if self.world == 1:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(net, device_ids=ids)

    def any(self, flag: bool) -> bool:
        return self.max(1.0 if flag else 0.0) > 0

    def max(self, value: float) -> float:
        """The largest ``value`` over all ranks."""
        if self.world == 1:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([float(value)], device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        self.held.append(tensor)
        return float(tensor.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            time.sleep(0.05)  # gloo's workers let go of the last collectives' tensors while ``held`` keeps them
            self.held.clear()
            if dist.is_initialized():
                dist.destroy_process_group()


def _init_distributed(device) -> _Distributed:
    """Join the ``torchrun`` process group when WORLD_SIZE > 1 (one GPU per process on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Distributed(device)
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Distributed(device, world, rank)


def _hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _write_sidecar(out: Path, checkpoint: dict) -> None:
    """A small JSON next to the checkpoint: what it was trained on and how well it did."""
    from ..io.atomic import atomic_open

    training = checkpoint["training"]
    val = training["validation"]
    data = training["datasets"] or ["synthetic"]
    description = (f"trained on {', '.join(Path(d).name for d in data)}; {training['steps']} steps; "
                   f"validation F1 {val['f1']:.3f}, IDF1 {val['idf1']:.3f}")
    with atomic_open(out.with_suffix(".json"), "w") as f:
        json.dump({"description": description, "training": {k: v for k, v in training.items() if k != "history"}},
                  f, indent=2, default=str)
