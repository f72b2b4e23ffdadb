"""Learning from corrections: fine-tune the shipped model on a few corrected sessions of a series
from a deliberately different "microscope", and score it before and after.

1. A series from the ``other_microscope`` preset (other voxel size, PSF, detector noise,
   brightness, spine shapes: outside the randomised training range of the shipped model wherever
   it can be), or with ``--preset second_microscope`` from a plausible second lab's setup (1 µm
   z steps, lower-NA PSF, noisier detector with a high offset, dimmer, bigger heads).
2. Its first sessions' labels (the generator's truth, standing in for a user's corrections) are
   exported as a training set, those sessions marked reviewed, exactly as the widget does.
3. ``train DATASET --init MODEL`` with the default budget (8 minutes on a CPU, 2 on a GPU) and the
   default moving average of the weights (``--ema 0`` turns it off).
4. Detection F1 / IDF1 on the series' LATER sessions (never labelled), before and after, and on
   the original synthetic test series (to check nothing was forgotten), in one table.

    python benchmarks/finetune.py                        # default budget
    python benchmarks/finetune.py --minutes 3 --device cpu
    python benchmarks/finetune.py --preset second_microscope
    python benchmarks/finetune.py --preset second_microscope --ema 0   # the weights as trained, no average
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def score(model, image, voxel, truth, sessions=None) -> dict:
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.metrics import evaluate_tracks

    pred = detect_series(image, voxel, model=model)
    if sessions is not None:
        pred, truth = pred[pred["t"].isin(sessions)], truth[truth["t"].isin(sessions)]
    return evaluate_tracks(pred, truth, voxel)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth", help="the model to start from")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--minutes", type=float, help="fine-tuning budget (default: the train command's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the train command's)")
    parser.add_argument("--synthetic-fraction", type=float,
                        help="share of synthetic replay batches (default: the train command's)")
    parser.add_argument("--workers", type=int, help="batch-preparing processes (default: the train command's)")
    parser.add_argument("--ema", type=float,
                        help="decay of the weights' moving average (train --ema; default: the train command's, "
                             "0.99 when learning from training sets; 0: off)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log training and validation")
    parser.add_argument("--sessions", type=int, default=8, help="sessions of the other microscope's series")
    parser.add_argument("--labelled", type=int, default=3, help="first sessions given as corrections")
    parser.add_argument("--preset", default="other_microscope", choices=["other_microscope", "second_microscope"],
                        help="the other microscope: far outside the training ranges, or a plausible second lab's")
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--reference-cases", nargs="*", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--reference-seed", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s")

    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series
    from napari_spine_tracker.core.train import TrainOptions, train_model
    from napari_spine_tracker.io.trainset import append_training_item

    other = synthesize_series(SynthConfig.preset(args.preset, seed=args.seed, sessions=args.sessions))
    labelled = list(range(args.labelled))
    later = list(range(args.labelled, args.sessions))
    references = [(case, synthesize_series(SynthConfig.preset(case, seed=args.reference_seed)))
                  for case in args.reference_cases]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corrections"
        corrections = other.truth[other.truth["t"].isin(labelled)]
        append_training_item(folder, args.preset.replace("_", "-"), other.image, corrections, other.voxel_size_um,
                             reviewed_sessions=labelled)
        out = Path(tmp) / "finetuned.pt"
        averaged = f" --ema {args.ema:g}" if args.ema is not None else ""
        started = time.perf_counter()
        train_model(TrainOptions(out=out, datasets=[folder], init=args.model, device=args.device,
                                 minutes=args.minutes, lr=args.lr, synthetic_fraction=args.synthetic_fraction,
                                 workers=args.workers, ema=args.ema,
                                 command_line=f"napari-spine-tracker train {folder} --init {args.model} --out {out}"
                                              f"{averaged}"))
        minutes = (time.perf_counter() - started) / 60
        for label, name in (("before", args.model), ("after", str(out))):
            model = load_model(name, device=args.device)
            s = score(model, other.image, other.voxel_size_um, other.truth, later)
            rows.append({"model": label, "series": f"{args.preset}, sessions {later[0]}-{later[-1]}",
                         "f1": s["f1"], "idf1": s["idf1"], "precision": s["precision"], "recall": s["recall"]})
            for case, synth in references:
                s = score(model, synth.image, synth.voxel_size_um, synth.truth)
                rows.append({"model": label, "series": f"{case} (seed {args.reference_seed})", "f1": s["f1"],
                             "idf1": s["idf1"], "precision": s["precision"], "recall": s["recall"]})
    table = pd.DataFrame(rows)
    wide = table.pivot_table(index="series", columns="model", values=["f1", "idf1"], sort=False)
    wide.columns = [f"{metric} {when}" for metric, when in wide.columns]
    print(f"fine-tuning: {minutes:.1f} min on {args.device}, from {args.model}{averaged}, "
          f"{len(labelled)} labelled sessions ({len(corrections)} spine-sessions)")
    print(wide.round(3).to_string())
    ref = table[~table["series"].str.startswith(args.preset)]
    for metric in ("f1", "idf1"):
        change = ref[ref.model == "after"][metric].mean() - ref[ref.model == "before"][metric].mean()
        print(f"mean {metric.upper()} change on the original test series: {change:+.3f} "
              "(allowed: no worse than -0.02)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
