"""The command line: ``napari-spine-tracker`` (alias ``spinetrack``), a thin layer over core/ and io/.

Exit codes: 0 ok, 2 bad input (the message says what and how to fix it), 1 internal error.
Every subcommand imports what it needs when it runs, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import InputError

log = logging.getLogger("napari_spine_tracker")


# --------------------------------------------------------------------------------------------
# subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from .core.synth import SynthConfig, synthesize_series
    from .io.atomic import atomic_open
    from .io.series import write_series_tiff
    from .io.tables import write_spine_table

    overrides = {k: v for k, v in {
        "sessions": args.sessions,
        "shape": tuple(args.shape) if args.shape else None,
        "voxel_size_um": tuple(args.voxel_size) if args.voxel_size else None,
    }.items() if v is not None}
    config = SynthConfig.preset(args.preset, seed=args.seed, **overrides)
    result = synthesize_series(config)
    out = Path(args.out)
    write_series_tiff(out / "series.tif", result.image, result.voxel_size_um)
    write_spine_table(result.truth, out / "truth.csv")
    with atomic_open(out / "synth.json", "w") as f:
        json.dump(result.metadata(), f, indent=2)
    print(f"wrote {out / 'series.tif'} {tuple(result.image.shape)} (T,Z,Y,X), voxel size "
          f"{result.voxel_size_um} µm, and {out / 'truth.csv'} ({len(result.truth)} spines-sessions, "
          f"{result.truth['track_id'].nunique()} tracks)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .core.metrics import evaluate_tracks
    from .io.tables import read_spine_table

    pred = read_spine_table(args.pred)
    truth = read_spine_table(args.truth)
    scores = evaluate_tracks(pred, truth, voxel_size_um=tuple(args.voxel_size), tol_um=args.tol_um)
    print(json.dumps(scores))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from .core.cluster import detect_many

    out_dir = outputs = None  # --out is a folder (made if missing) unless it names the one input's table
    if args.out and (len(args.inputs) > 1 or Path(args.out).is_dir() or args.out.endswith(("/", "\\"))):
        out_dir = args.out
    elif args.out:
        outputs = [args.out]
    if args.workers is not None and args.scheduler != "local":
        raise InputError("--workers sets the size of a local cluster: add --scheduler local.")
    skip_done = args.skip_done if args.skip_done is not None else args.scheduler is not None
    with _progress_bar(f"detect {len(args.inputs)} series", quiet=args.quiet) as progress:
        report = detect_many(args.inputs, out_dir, outputs=outputs, scheduler=args.scheduler,
                             workers=args.workers, model=args.model, device=args.device,
                             voxel_size_um=args.voxel_size, channel=args.channel, threshold=args.threshold,
                             views=args.views, max_rotation_deg=args.max_rotation, gate_um=args.gate_um,
                             max_gap=args.max_gap, skip_done=skip_done, suggestions=args.suggestions,
                             track_evidence=args.track_evidence,
                             progress=progress)
    print(report.format())
    if report.failed:
        for result in report.failed:
            print(f"error: {result.input}: {result.message}", file=sys.stderr)
        if len(report.results) > 1:
            print(f"error: {len(report.failed)} of {len(report.results)} inputs failed; the others were written.",
                  file=sys.stderr)
        return 2
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .core.train import TrainOptions, train_model

    options = TrainOptions.from_args(args)
    with _progress_bar("train", quiet=args.quiet) as progress:
        path = train_model(options, progress=progress)
    print(f"wrote {path}")
    return 0


def cmd_dynamics(args: argparse.Namespace) -> int:
    from .core.dynamics import run_dynamics_report

    with _progress_bar("dynamics", quiet=args.quiet) as progress:
        outputs = run_dynamics_report(args.spines, image=args.image, voxel_size_um=args.voxel_size,
                                      out_dir=args.out, channel=args.channel, max_gap=args.max_gap,
                                      progress=progress)
    for path in outputs:
        print(f"wrote {path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .core.bench import run_bench

    print(run_bench(quick=args.quick, device=args.device, model=args.model, views=args.views))
    return 0


def cmd_gui(args: argparse.Namespace) -> int:
    try:
        import napari
    except ImportError as exc:
        raise InputError("the GUI needs napari and a Qt binding: pip install 'napari-spine-tracker[pyqt6]'") from exc
    if args.input and not Path(args.input).exists():
        raise InputError(f"{args.input} does not exist: check the path.")
    viewer = napari.Viewer()
    viewer.window.add_plugin_dock_widget("napari-spine-tracker", "Spine Tracker")
    if args.input:
        from ._napari import get_reader

        # a series or table through this plugin (scale, and the table beside a series); anything
        # else (a multi-channel TIFF) through napari's builtin one
        viewer.open(args.input, plugin="napari-spine-tracker" if get_reader(args.input) else "napari")
    napari.run()
    return 0


# --------------------------------------------------------------------------------------------
# parser


class _progress_bar:
    """A tqdm bar behind the core's ``progress(done, total)`` callback."""

    def __init__(self, desc: str, quiet: bool = False):
        self.desc, self.quiet, self.bar = desc, quiet, None

    def __enter__(self):
        return self

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="step", file=sys.stderr, leave=False)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _checked(module: str, parser: str):
    """An argparse type from a core parser (``core.MODULE.PARSER``, imported when first used):
    its InputError becomes argparse's usage error, with the core's message."""
    def convert(text: str):
        import importlib

        parse = getattr(importlib.import_module(f".core.{module}", __package__), parser)
        try:
            return parse(text)
        except InputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parser
    return convert


def _voxel_size(parser_action_name: str = "--voxel-size", required: bool = False) -> dict:
    return dict(nargs=3, type=float, metavar=("Z", "Y", "X"), required=required,
                help="voxel size in µm, z y x (overrides the file's metadata)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-spine-tracker",
        description="Find and track dendritic spines in two-photon time series.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", help="detect and track spines; writes a spine table per input")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="4D TIFF (T,Z,Y,X), 3D TIFF (one session) or folder of 3D TIFFs")
    p.add_argument("--out", help="output CSV (one input) or folder (made if missing); default INPUT.spines.csv")
    p.add_argument("--model", default="spinenet-synth", help="shipped model name or checkpoint path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--voxel-size", **_voxel_size())
    p.add_argument("--channel", type=int, help="channel index for multi-channel TIFFs")
    p.add_argument("--threshold", type=_checked("infer", "parse_threshold"), default="auto", metavar="P|auto|model",
                   help="peak score threshold: a probability, 'model' (the model's, chosen on validation) or 'auto' "
                        "(default): the model's, lowered to the split of the series' own peak scores where that is "
                        "lower, as on another microscope (not below 0.3)")
    p.add_argument("--views", type=int, choices=[1, 2, 4], default=1,
                   help="test-time augmentation: average over this many mirror images of each tile (default 1); "
                        "4 finds more spines, on data like the training series and (with --threshold auto) on "
                        "another microscope's, at about 3.5x the network's time (most of a CPU run, little of a "
                        "GPU's)")
    p.add_argument("--max-rotation", type=float, default=3.0, metavar="DEG",
                   help="largest turn in the imaging plane registration looks for between consecutive sessions "
                        "(default 3; 0: translation only). Fields too small for such a turn to move their corners "
                        "by 2 µm (up to about 54 µm across at 3 degrees) are not searched")
    p.add_argument("--gate-um", type=_checked("link", "parse_gate"), metavar="UM|auto",
                   help="linking gate: the farthest a spine is followed from one session to the next, after "
                        "registration and the local motion of its neighbours, in µm, or 'auto' (default): 4x the "
                        "median distance of the series' own links, within 0.8-1.4 µm")
    p.add_argument("--max-gap", type=int, metavar="N",
                   help="sessions a spine may be missed and keep its id (default 2)")
    p.add_argument("--track-evidence", action=argparse.BooleanOptionalAction, default=True,
                   help="keep a peak up to 0.1 under the threshold where the spine's track scores at least 0.05 "
                        "over it on average (default: on; held out, F1 +0.006 on synthetic series, +0.03 on "
                        "a second microscope's); --no-track-evidence: the threshold alone decides")
    p.add_argument("--suggestions", action="store_true",
                   help="also write NAME.suggestions.csv beside each table: the peaks that scored from 0.2 up to "
                        "the threshold, highest score first, with the track each would continue; napari offers "
                        "them with the table (G visits one, Y accepts it). They hold a third to a half of the spines "
                        "the detection misses")
    p.add_argument("--scheduler", metavar="local|ADDRESS",
                   help="run each input as a task on Dask: 'local' starts worker processes on this machine, "
                        "an address (tcp://host:8786) or scheduler file (.json) uses a running cluster; "
                        "needs pip install 'napari-spine-tracker[cluster]'. Default: one after the other here")
    p.add_argument("--workers", type=int, metavar="N",
                   help="worker processes of --scheduler local (default: one per GPU, or per two CPU cores)")
    p.add_argument("--skip-done", action=argparse.BooleanOptionalAction, default=None,
                   help="leave inputs whose output already holds a valid spine table (default: on with "
                        "--scheduler, off without); tables with hand corrections are never overwritten")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("synth", help="write a synthetic series (series.tif) with its truth (truth.csv)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions", type=int, help="number of sessions T")
    p.add_argument("--shape", nargs=3, type=int, metavar=("Z", "Y", "X"), help="volume shape in voxels")
    p.add_argument("--voxel-size", **_voxel_size())
    p.add_argument("--preset", default="default",
                   help="a named parameter set (default, large_drift, low_snr, crowded, ...)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("evaluate", help="score predicted spines against truth; prints JSON")
    p.add_argument("pred", metavar="PRED.csv")
    p.add_argument("truth", metavar="TRUTH.csv")
    p.add_argument("--voxel-size", **_voxel_size(required=True))
    p.add_argument("--tol-um", type=float, default=1.0, help="matching tolerance in µm (default 1.0)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train or fine-tune a model on training sets and synthetic data")
    p.add_argument("datasets", nargs="*", metavar="DATASET", help="training-set folders (none: synthetic only)")
    p.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    p.add_argument("--init", help="start from this model (name or path); default: from scratch")
    p.add_argument("--steps", type=int, help="optimisation steps")
    p.add_argument("--minutes", type=float, help="stop after this many minutes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--size", help="architecture preset (tiny, lean, deep, fine, base): from scratch (default lean), "
                   "or with --init a larger one the initial model grows into (lean -> deep or fine)")
    p.add_argument("--patch", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="training patch in model-grid voxels (default 16 96 96)")
    p.add_argument("--patch-sessions", type=int, help="sessions per training patch (default 3)")
    p.add_argument("--jitter-um", type=float,
                   help="registration error simulated between a patch's sessions, µm per axis (default 0.4)")
    p.add_argument("--pool-size", type=int, help="synthetic series kept in memory (default 24)")
    p.add_argument("--val-every", type=int,
                   help="validate (and keep the best model) every N steps (default 250; 100 when fine-tuning)")
    p.add_argument("--val-series", type=int, metavar="N",
                   help="synthetic validation series that choose the best step and the decoding (default 6: "
                        "they rank models only to about 0.01 F1; each costs about 4 s of a validation on a CPU)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-3 from scratch, 3e-4 fine-tuning)")
    p.add_argument("--realistic-fraction", type=float,
                   help="share of synthetic series from the realistic presets rather than fully randomised (0.5)")
    p.add_argument("--presets", nargs="+", metavar="NAME[:WEIGHT]",
                   help="synthetic presets the realistic share is drawn from, with relative weights "
                   "(default: default large_drift low_snr crowded, equally), e.g. low_snr:2 faint:2")
    p.add_argument("--coarse-fraction", type=float,
                   help="share of the realistic presets' series rendered at coarser voxels (z 0.5-1.5 µm, y x "
                        "0.1-0.25 µm) than their 0.5 x 0.1 x 0.1 µm (default 0)")
    p.add_argument("--hard-negative-weight", type=float,
                   help="weight of the heatmap's negative term at the synthetic engine's axon boutons, "
                        "look-alikes of a spine head, against 1 elsewhere (default 1: off)")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights with this decay, "
                        "e.g. 0.999 (about the last 1000 steps; 0: the weights as trained; default 0.99 "
                        "when training sets are given, else 0)")
    p.add_argument("--synthetic-fraction", type=float,
                   help="share of batches from the synthetic engine when training sets are given (default 0.5)")
    p.add_argument("--batch-size", type=int, help="patches per step (default 32 on a GPU, 4 on a CPU)")
    p.add_argument("--workers", type=int,
                   help="processes preparing batches beside the training one (default: 0 on a CPU, up to 8 with a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="resume from --out if it holds a run in progress")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("dynamics", help="gains, losses, survival and sizes from a spine table")
    p.add_argument("spines", metavar="SPINES.csv")
    p.add_argument("--image", help="the series, for dendrite length and spine head sizes")
    p.add_argument("--voxel-size", **_voxel_size())
    p.add_argument("--channel", type=int, help="channel index for multi-channel TIFFs")
    p.add_argument("--out", help="output folder (default: next to SPINES.csv)")
    p.add_argument("--max-gap", type=int, default=1,
                   help="sessions a spine may be missed and still count as present (default 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dynamics)

    p = sub.add_parser("bench", help="speed and accuracy against the trackpy peer on generated series")
    p.add_argument("--quick", action="store_true", help="small series, for a smoke run")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--model", default="spinenet-synth")
    p.add_argument("--views", type=int, choices=[1, 2, 4], default=1, help="SpineNet's test-time augmentation")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("gui", help="open napari with the Spine Tracker widget")
    p.add_argument("input", nargs="?", help="a series or spine table to open")
    p.set_defaults(func=cmd_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        log.exception("internal error (please report it with the command line you ran)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
