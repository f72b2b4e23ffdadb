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

import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, InputError
from .batches import PatchOptions, PreparedSeries, make_batch, prepare_series, sample_patch
from .decode import DEFAULT_DECODE
from .intensity import DEFAULT_NORMALIZATION

log = logging.getLogger(__name__)

MODEL_VOXEL_UM = (0.5, 0.1, 0.1)
TRAINING_SEED_BASE = 100_000
#: held-out synthetic validation series: (preset, seed); training seeds start at TRAINING_SEED_BASE
SYNTHETIC_VALIDATION = (("default", 1000), ("large_drift", 1001), ("low_snr", 1002), ("crowded", 1003))
VALIDATION_SHAPE = {"sessions": 4, "shape": (24, 128, 128)}
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)


@dataclass
class TrainOptions:
    out: Path
    datasets: Sequence[Path] = ()
    init: str | None = None
    steps: int | None = None
    minutes: float | None = None
    device: str = "auto"
    size: str = "lean"
    batch_size: int | None = None
    seed: int = 0
    resume: bool = False
    lr: float | None = None
    val_every: int = 250
    pool_size: int = 24
    pool_refresh_every: int = 8
    synthetic_fraction: float | None = None  # None: 1.0 from scratch, 0.3 when fine-tuning
    patch: PatchOptions = field(default_factory=PatchOptions)
    validation: Sequence[tuple[str, int]] = SYNTHETIC_VALIDATION
    validation_shape: dict = field(default_factory=lambda: dict(VALIDATION_SHAPE))
    command_line: str = ""

    @classmethod
    def from_args(cls, args) -> TrainOptions:
        return cls(out=Path(args.out), datasets=[Path(d) for d in args.datasets], init=args.init,
                   steps=args.steps, minutes=args.minutes, device=args.device, size=args.size,
                   batch_size=args.batch_size, seed=args.seed, resume=args.resume,
                   command_line=" ".join(["napari-spine-tracker", *sys.argv[1:]]))


# ---------------------------------------------------------------------------------------------
# data sources


class SyntheticPool:
    """A pool of randomised synthetic series on the model grid; one is replaced every few steps."""

    def __init__(self, size: int, model_voxel_um, normalization, seed: int, patch: PatchOptions):
        self.model_voxel_um, self.normalization, self.patch = model_voxel_um, normalization, patch
        # validation uses seeds 1000-1999 (core/bench.py too); training never touches them
        self.next_seed = TRAINING_SEED_BASE + seed * 1_000_000
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

    def _make(self) -> PreparedSeries:
        from .synth import SynthConfig, synthesize_series

        seed = self.next_seed
        self.next_seed += 1
        config = SynthConfig.random(seed)
        # enough native voxels for a patch plus room to move it around, at this draw's voxel size
        room = np.asarray(self.patch.shape) + np.asarray([8, 48, 48])
        native = np.ceil(room * np.asarray(self.model_voxel_um) / np.asarray(config.voxel_size_um))
        config = config.replace(sessions=max(self.patch.sessions + 1, 4), shape=tuple(int(n) for n in native))
        synth = synthesize_series(config)
        return prepare_series(synth.image, synth.voxel_size_um, synth.truth, self.model_voxel_um,
                              self.normalization, drift_vox=synth.drift_um / np.asarray(synth.voxel_size_um),
                              name=f"synth-{seed}")


def _validation_series(options: TrainOptions):
    """The fixed held-out synthetic series: (name, SynthSeries)."""
    from .synth import SynthConfig, synthesize_series

    return [(f"{preset}-{seed}", synthesize_series(SynthConfig.preset(preset, seed=seed, **options.validation_shape)))
            for preset, seed in options.validation]


def _user_series(datasets: Sequence[Path], model_voxel_um, normalization, rng: np.random.Generator):
    """Training-set items -> (training PreparedSeries, validation (name, image, voxel, table, sessions)).

    Only reviewed sessions are labels. Of items with at least two reviewed sessions, about a
    quarter of those sessions (at least one) are held out for validation and early stopping: they
    are not labels for training.
    """
    from ..io.trainset import read_training_set
    from .register import estimate_drift

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
            drift = estimate_drift(image, item.voxel_size_um) if image.shape[0] > 1 else None
            train.append(prepare_series(image, item.voxel_size_um, spines, model_voxel_um, normalization,
                                        labelled_sessions=kept, drift_vox=drift, name=item.name))
            if held:
                val.append((item.name, image, item.voxel_size_um, spines, held))
    if not train:
        raise InputError("the training sets hold no reviewed session: mark sessions reviewed in the "
                         "widget (or list them in reviewed_sessions) before training.")
    return train, val


# ---------------------------------------------------------------------------------------------
# loss


def compute_loss(outputs: dict, batch: dict) -> tuple[Any, dict[str, float]]:
    """CenterNet focal loss on the heatmap; L1 on offset, displacement (µm) and size (µm).

    Sessions not labelled (``batch["labelled"]`` 0) contribute nothing: an unmarked spot there
    is not a negative.
    """
    import torch
    from torch.nn import functional as F

    session = batch["labelled"][:, :, None, None, None, None]  # (B, T, 1, 1, 1, 1)
    logits = outputs["heatmap"].float()
    gt = batch["heatmap"]
    pos = (gt >= 1.0).float() * session
    neg = (1 - (gt >= 1.0).float()) * session
    p = torch.sigmoid(logits)
    pos_loss = -(F.logsigmoid(logits) * (1 - p) ** 2 * pos).sum()
    neg_loss = -(F.logsigmoid(-logits) * p**2 * (1 - gt) ** 4 * neg).sum()
    n_pos = pos.sum().clamp(min=1.0)
    focal = (pos_loss + neg_loss) / n_pos

    def masked_l1(name: str, mask_name: str):
        mask = batch[mask_name] * session
        diff = (outputs[name].float() - batch[name]).abs() * mask
        return diff.sum() / mask.sum().clamp(min=1.0)

    parts = {
        "focal": focal,
        "offset": masked_l1("offset", "centre"),
        "displacement": masked_l1("displacement", "has_previous"),
        "size": masked_l1("size", "has_size"),
    }
    total = parts["focal"] + parts["offset"] + 0.5 * parts["displacement"] + 0.5 * parts["size"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# validation


def validate(model, cases, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, Any]:
    """Run detection on each validation case and score it for each threshold.

    ``cases``: (name, image (T,Z,Y,X), voxel_size_um, truth table, sessions to score or None).
    Returns the best threshold (highest mean of F1 and IDF1 over cases) with per-case figures.
    """
    from .infer import InferenceOptions, predict_series
    from .link import link_detections
    from .metrics import evaluate_tracks
    from .register import estimate_drift

    lowest = min(thresholds)
    per_threshold: dict[float, list[dict]] = {thr: [] for thr in thresholds}
    for name, image, voxel, truth, sessions in cases:
        drift = estimate_drift(image, voxel) if image.shape[0] > 1 else None
        detections = predict_series(image, voxel, model, drift_vox=drift,
                                    options=InferenceOptions(threshold=lowest))
        if sessions is not None:
            truth = truth[truth["t"].isin(sessions)]
        for thr in thresholds:
            kept = detections[detections["score"] >= thr]
            table = link_detections(kept, voxel, drift_vox=drift)
            if sessions is not None:
                table = table[table["t"].isin(sessions)]
            scores = evaluate_tracks(table, truth, voxel)
            per_threshold[thr].append({"case": name, "f1": scores["f1"], "idf1": scores["idf1"],
                                       "precision": scores["precision"], "recall": scores["recall"]})

    def quality(rows):
        return float(np.mean([(r["f1"] + r["idf1"]) / 2 for r in rows])) if rows else 0.0

    best = max(thresholds, key=lambda thr: quality(per_threshold[thr]))
    rows = per_threshold[best]
    return {
        "threshold": best,
        "score": quality(rows),
        "f1": float(np.mean([r["f1"] for r in rows])) if rows else 0.0,
        "idf1": float(np.mean([r["idf1"] for r in rows])) if rows else 0.0,
        "cases": rows,
    }


# ---------------------------------------------------------------------------------------------
# the loop


def _initial_model(options: TrainOptions):
    """(net, model_voxel_um, normalization, decode, provenance) from --init or from scratch."""
    from .model import SpineNet, build_config

    if options.init:
        from ..io.checkpoint import load_checkpoint
        from .models import resolve_model

        path = resolve_model(options.init)
        checkpoint = load_checkpoint(path)
        net = SpineNet(checkpoint["config"])
        net.load_state_dict(checkpoint["state_dict"])
        return (net, tuple(checkpoint["voxel_size_um"]), dict(checkpoint["normalization"]),
                dict(checkpoint["decode"]), {"init": str(options.init), "init_training": checkpoint["training"]})
    net = SpineNet(build_config(options.size))
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


def _resume_path(out: Path) -> Path:
    return out.with_name(out.stem + ".resume.pt")


def train_model(options: TrainOptions, progress: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                on_log: Callable[[dict], None] | None = None) -> Path:
    """Train (or fine-tune) and write the best checkpoint to ``options.out``; returns its path.

    ``on_log(record)`` receives ``{"step", "loss", ...}`` records, and validation records with
    ``"validation"``; ``should_stop()`` cancels cleanly (the output keeps the best model validated
    so far, or is not created).
    """
    import torch

    from ..io.checkpoint import save_checkpoint
    from .devices import autocast, free_memory, get_device

    out = Path(options.out)
    if out.suffix != ".pt":
        raise InputError(f"--out must name a .pt checkpoint file, got {out}.")
    device = get_device(options.device)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    net, model_voxel, normalization, decode, provenance = _initial_model(options)
    fine_tuning = bool(options.datasets)
    steps, minutes = _budget(options, device)
    batch_size = options.batch_size or (32 if device.type == "cuda" else 4)
    lr = options.lr or (3e-4 if options.init else 2e-3)
    synthetic_fraction = options.synthetic_fraction
    if synthetic_fraction is None:
        synthetic_fraction = 0.3 if fine_tuning else 1.0

    user_train, user_val = (_user_series(options.datasets, model_voxel, normalization, rng)
                            if fine_tuning else ([], []))
    pool = SyntheticPool(options.pool_size if synthetic_fraction > 0 else 0, model_voxel, normalization,
                         options.seed, options.patch)
    pool.fill(should_stop=should_stop)
    val_cases = [(name, s.image, s.voxel_size_um, s.truth, None) for name, s in _validation_series(options)]
    val_cases += [(f"user:{name}", image, voxel, table, sessions) for name, image, voxel, table, sessions in user_val]

    net.to(device)
    if device.type in ("cpu", "cuda"):
        net = net.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start_step, best, history = 0, None, []
    resume_file = _resume_path(out)
    if options.resume and resume_file.exists():
        state = torch.load(resume_file, map_location="cpu", weights_only=True)
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, best, history = int(state["step"]), state["best"], list(state["history"])
        log.info("resumed at step %d from %s", start_step, resume_file)

    from .models import LoadedModel

    out_stride = net.output_stride
    out_shape = tuple(int(n // s) for n, s in zip(options.patch.shape, out_stride))
    out_vox = tuple(v * s for v, s in zip(model_voxel, out_stride))
    started = time.monotonic()
    warmup = 200 if not options.init else 50

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if minutes is not None and steps >= 10**9:
            return lr  # time budget: constant after warm-up
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(steps, 1))))

    def snapshot(step: int, validation: dict) -> dict[str, Any]:
        return {
            "config": net.config,
            "voxel_size_um": list(model_voxel),
            "normalization": normalization,
            "decode": {**decode, "threshold": validation["threshold"]},
            "state_dict": {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()},
            "training": {
                "command_line": options.command_line,
                "datasets": [str(d) for d in options.datasets],
                "synthetic_fraction": synthetic_fraction,
                "steps": step,
                "batch_size": batch_size,
                "patch_shape": list(options.patch.shape),
                "sessions_per_patch": options.patch.sessions,
                "seed": options.seed,
                "synthetic_seeds": f"SynthConfig.random({TRAINING_SEED_BASE + options.seed * 1_000_000} ..)",
                "validation": validation,
                "validation_cases": [list(v) for v in options.validation],
                "hardware": _hardware(device),
                "minutes": (time.monotonic() - started) / 60,
                **{k: v for k, v in provenance.items() if k != "init_training"},
            },
        }

    def run_validation(step: int) -> None:
        nonlocal best
        net.eval()
        loaded = LoadedModel(net, device, model_voxel, normalization, decode, name="validation")
        result = validate(loaded, val_cases)
        net.train()
        record = {"step": step, "validation": result}
        history.append({"step": step, "f1": result["f1"], "idf1": result["idf1"], "score": result["score"]})
        log.info("step %d: validation F1 %.3f IDF1 %.3f (threshold %.2f)", step, result["f1"], result["idf1"],
                 result["threshold"])
        if on_log is not None:
            on_log(record)
        if best is None or result["score"] > best["score"]:
            best = {"score": result["score"], "step": step}
            checkpoint = snapshot(step, result)
            checkpoint["training"]["history"] = list(history)
            save_checkpoint(out, checkpoint)
            _write_sidecar(out, checkpoint)
        torch.save({"state_dict": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "best": best, "history": history}, resume_file)

    net.train()
    step = start_step
    recent: list[float] = []
    loop_started = time.monotonic()
    try:
        while step < steps:
            if minutes is not None and (time.monotonic() - started) / 60 >= minutes:
                break
            if should_stop is not None and should_stop():
                raise Cancelled("training cancelled")
            use_user = user_train and (not pool.series or rng.random() >= synthetic_fraction)
            sources = user_train if use_user else pool.series
            patches = [sample_patch(sources[rng.integers(len(sources))], rng, options.patch, model_voxel)
                       for _ in range(batch_size)]
            t_min = min(p[0].shape[0] for p in patches)
            patches = [(img[:t_min], pts[:t_min], lab[:t_min]) for img, pts, lab in patches]
            batch = {k: torch.from_numpy(v).to(device) for k, v in
                     make_batch(patches, out_shape, out_stride, out_vox).items()}
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            with autocast(device):
                outputs = net(batch["image"])
            loss, parts = compute_loss(outputs, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            optimizer.step()
            step += 1
            record = {"step": step, "loss": float(loss.detach()), **parts}
            recent.append(record["loss"])
            if step % 50 == 0:
                log.info("step %d: loss %.4f (%s), %.2f steps/s", step, float(np.mean(recent[-50:])),
                         ", ".join(f"{k} {v:.3f}" for k, v in parts.items()),
                         (step - start_step) / max(time.monotonic() - loop_started, 1e-9))
            if on_log is not None:
                on_log(record)
            if progress is not None:
                if minutes is not None:
                    progress(int(1000 * min(1.0, (time.monotonic() - started) / 60 / minutes)), 1000)
                else:
                    progress(step, steps)
            if pool.series and step % options.pool_refresh_every == 0:
                pool.refresh()
            if step % options.val_every == 0:
                run_validation(step)
        if best is None or best["step"] != step:
            run_validation(step)
    except Cancelled:
        if not out.exists():
            raise
        log.warning("training cancelled; %s holds the best model validated so far", out)
        raise
    finally:
        free_memory(device)
    resume_file.unlink(missing_ok=True)
    return out


def _hardware(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


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
