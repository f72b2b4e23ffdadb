"""What more test-time views, and the ConvLSTM's memory, add: F1 / IDF1 per case on the same series.

Training flips its patches in z, y and x and swaps y with x, so each of those 16 symmetries is an
equally good view of a tile. ``detect --views 4`` averages four of them (the mirrors in y and x,
``infer.VIEW_FLIPS``); the variants here also average the y/x swaps of those four (``8t``), their
z flips (``8z``) or all sixteen (``16``), each view with its own ConvLSTM state and its heatmap
turned back before the mean probability is taken, as ``infer._forward_views`` does for the four.
``nomemory`` runs one view with the ConvLSTM state dropped before every session (the network still
sees the previous session as its second input channel): what the memory itself adds.

Each variant is scored as ``detect`` runs (the series' own threshold, track evidence), and with
``--thresholds`` also by F1 at fixed peak thresholds, on one detection at the lowest of them
without track evidence (averaging more views lowers the score of a spine that only some views
see, so a variant may need another threshold).

    python benchmarks/symmetries.py                                   # tuning seeds 2000-2002, four cases
    python benchmarks/symmetries.py --variants 4 8t --thresholds 0.3 0.35 0.4 0.45 0.5
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

#: the variants; "1" and "nomemory" run one plain view (see view_transforms)
VARIANTS = ("1", "4", "8t", "8z", "16", "nomemory")


def view_transforms(variant: str) -> list[tuple[tuple[int, ...], bool]]:
    """The views of a variant, as (dims to flip, swap y/x); the first is the plain view."""
    from napari_spine_tracker.core.infer import VIEW_FLIPS

    mirrors = [(flips, False) for flips in VIEW_FLIPS]
    swapped = [(flips, True) for flips, _ in mirrors]
    z_flipped = [((-3, *flips), swap) for flips, swap in mirrors]
    return {"1": mirrors[:1], "nomemory": mirrors[:1], "4": mirrors, "8t": mirrors + swapped,
            "8z": mirrors + z_flipped,
            "16": mirrors + swapped + z_flipped + [((-3, *flips), True) for flips, _ in mirrors]}[variant]


def forward_views(transforms):
    """A stand-in for ``infer._forward_views`` that averages the given views (see the module doc)."""
    import torch

    def there(a, flips, swap):
        a = a.flip(flips) if flips else a
        return a.transpose(-2, -1) if swap else a

    def back(a, flips, swap):
        a = a.transpose(-2, -1) if swap else a
        return a.flip(flips) if flips else a

    def forward(net, x, previous, states):
        probability, after, outputs = None, [], None
        for (flips, swap), state in zip(transforms, states, strict=True):
            before = None if previous is None else there(previous, flips, swap)
            out, state = net.forward_sessions(there(x, flips, swap), before, state, point_heads=True)
            after.append(state)
            heat = back(torch.sigmoid(out["heatmap"].float()), flips, swap)
            probability = heat.clone() if probability is None else probability.add_(heat)
            if not flips and not swap:
                outputs = out  # the offset and displacement heads read the plain view's trunk
        outputs["heatmap"] = torch.logit(probability.div_(len(states)), eps=1e-6)
        return outputs, after

    return forward


@contextlib.contextmanager
def variant_running(variant: str, net):
    """Detection runs ``variant`` inside the block: its views, or the memory dropped."""
    from napari_spine_tracker.core import infer

    saved = infer._forward_views, infer.check_views
    kind = type(net)
    forward_sessions = kind.forward_sessions
    if variant == "nomemory":
        kind.forward_sessions = lambda self, x, previous=None, state=None, **kw: forward_sessions(
            self, x, previous, None, **kw)
    elif len(view_transforms(variant)) > 1:
        infer._forward_views, infer.check_views = forward_views(view_transforms(variant)), lambda views: views
    try:
        yield
    finally:
        infer._forward_views, infer.check_views = saved
        kind.forward_sessions = forward_sessions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spinenet-synth")
    parser.add_argument("--cases", nargs="+", default=["default", "large_drift", "low_snr", "crowded"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[2000, 2001, 2002],
                        help="series seeds (default: the tuning seeds; the test seeds are 1000-1002)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["1", "4", "8t", "8z", "nomemory"])
    parser.add_argument("--thresholds", nargs="*", type=float, default=[],
                        help="also F1 at these fixed peak thresholds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke run)")
    args = parser.parse_args(argv)

    import pandas as pd

    from napari_spine_tracker.core.bench import QUICK_OVERRIDES
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.infer import InferenceOptions
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.WARNING)
    model = load_model(args.model, device=args.device)
    changes = QUICK_OVERRIDES if args.quick else {}
    # without memory, one session per network call: the state is dropped at every session, not
    # only between pairs of them (the chunks change nothing else)
    alone = InferenceOptions(session_chunk=1)
    rows = []
    for case in args.cases:
        for seed in args.seeds:
            series = synthesize_series(SynthConfig.preset(case, seed=seed, **changes))
            for variant in args.variants:
                options = alone if variant == "nomemory" else None
                views = len(view_transforms(variant))
                with variant_running(variant, model.net):
                    table = detect_series(series.image, series.voxel_size_um, model=model, device=args.device,
                                          views=views, options=options)
                    low = (detect_series(series.image, series.voxel_size_um, model=model, device=args.device,
                                         views=views, options=options, threshold=min(args.thresholds),
                                         track_evidence=False) if args.thresholds else None)
                scores = evaluate_tracks(table, series.truth, series.voxel_size_um, tol_um=1.0)
                row = {"case": case, "seed": seed, "variant": variant,
                       **{key: scores[key] for key in ("f1", "idf1", "precision", "recall")}}
                for threshold in args.thresholds:
                    row[f"F1 at {threshold:g}"] = evaluate_tracks(low[low["score"] >= threshold], series.truth,
                                                                  series.voxel_size_um, tol_um=1.0)["f1"]
                rows.append(row)
                print(f"{case:12s} {seed:5d}  {variant:>8s}  F1 {scores['f1']:.3f}  IDF1 {scores['idf1']:.3f}  "
                      f"precision {scores['precision']:.3f}  recall {scores['recall']:.3f}"
                      + "".join(f"  {key} {value:.3f}" for key, value in row.items() if key.startswith("F1 at")),
                      flush=True)
    frame = pd.DataFrame(rows)
    means = frame.groupby(["variant", "case"], sort=False).mean(numeric_only=True).drop(columns="seed")
    print(f"\nmeans over seeds {args.seeds}, model {args.model} (F1 / IDF1 as detect runs):")
    table = means["f1"].unstack("case").assign(mean=lambda f: f.mean(axis=1)).round(3)
    identity = means["idf1"].unstack("case").assign(mean=lambda f: f.mean(axis=1)).round(3)
    print(table.astype(str).add(" / ").add(identity.astype(str)).to_string())
    if args.thresholds:
        print("\nmean F1 over the cases at fixed thresholds (one detection at the lowest, no track evidence):")
        print(means.filter(like="F1 at").groupby("variant", sort=False).mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
