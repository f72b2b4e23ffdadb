"""Averaged weights ("model soups"): checkpoints fine-tuned from the same model, averaged, against each.

Fine-tuned models that share their start often lie in one basin of the loss, where the mean of their
weights can score above each of them (Wortsman et al. 2022, "Model soups"). Each mixture given as
``NAME=CKPT[:WEIGHT],CKPT[:WEIGHT]...`` is averaged (weighted; BatchNorm statistics too), kept in
memory, and scored with the ingredients on the tuning seeds: the four synthetic cases, the second
microscope's series (sessions 3-7) and the default tissue imaged at 1 x 0.2 x 0.2 µm voxels. The
decoding (threshold, suppression) is the first ingredient's; the threshold adapts to each series as
in ``detect``.

Ensembles (``--ensemble NAME=CKPT,CKPT...``) run every model on each tile and average their heatmaps
(the mean probability, as four mirror views do); the other heads and the decoding are the first
model's. They need no shared architecture, only the same strides and voxel size.

    python benchmarks/weight_average.py --models spinenet-synth spinenet-synth-coarse \\
        --mix A=spinenet-synth,spinenet-synth-coarse B=spinenet-synth,runs/hardlong.pt
    python benchmarks/weight_average.py --ensemble E=spinenet-synth,runs/deephard_gpu.pt --views 4
"""

from __future__ import annotations

import argparse
import sys

#: label, preset, seeds, preset overrides, first session scored
CASES = ("default", "large_drift", "low_snr", "crowded")
SETS = [(case, case, (2000, 2001, 2002), {}, 0) for case in CASES] + [
    ("second", "second_microscope", tuple(range(2000, 2006)), {"sessions": 8}, 3),
    ("coarse", "default", (2000, 2001), {"voxel_size_um": (1.0, 0.2, 0.2)}, 0),
]


def average_checkpoints(parts) -> dict:
    """One checkpoint from ``[(checkpoint dict, weight), ...]`` of one architecture: the weighted
    mean of every floating-point tensor (integer ones, such as BatchNorm's step count, are the
    first's); the rest (config, decoding, normalisation) is the first's."""
    first = parts[0][0]
    if any(c["config"] != first["config"] for c, _ in parts):
        raise SystemExit("these checkpoints have different architectures: only one architecture can be averaged")
    total = sum(w for _, w in parts)
    state = {}
    for key, value in first["state_dict"].items():
        if value.is_floating_point():
            state[key] = sum(c["state_dict"][key].float() * (w / total) for c, w in parts).to(value.dtype)
        else:
            state[key] = value
    return {**first, "state_dict": state}


def ensemble_model(models):
    """One LoadedModel whose network runs each of ``models``' networks and averages their heatmaps
    (the mean probability, as a logit); the other heads, the decoding and the normalisation are the
    first model's."""
    import dataclasses

    import torch

    first = models[0]
    if any(m.net.output_stride != first.net.output_stride or m.net.total_stride != first.net.total_stride
           or m.voxel_size_um != first.voxel_size_um for m in models):
        raise SystemExit("an ensemble needs models of the same strides and voxel size")

    class Ensemble(torch.nn.Module):
        def __init__(self, nets):
            super().__init__()
            self.nets = torch.nn.ModuleList(nets)
            self.output_stride, self.total_stride = nets[0].output_stride, nets[0].total_stride
            self.heads_at, self.config = nets[0].heads_at, nets[0].config

        def forward_sessions(self, x, previous=None, state=None, **kwargs):
            probability, after = 0.0, []
            for i, (net, own) in enumerate(zip(self.nets, state or [None] * len(self.nets))):
                out, own = net.forward_sessions(x, previous, own, **kwargs)
                after.append(own)
                probability = probability + torch.sigmoid(out["heatmap"].float()) / len(self.nets)
                if i == 0:
                    outputs = out
            outputs["heatmap"] = torch.logit(probability, eps=1e-6)
            return outputs, after

    return dataclasses.replace(first, net=Ensemble([m.net for m in models]), name="+".join(m.name for m in models))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="single models to score beside the mixtures")
    parser.add_argument("--mix", nargs="*", default=[], metavar="NAME=CKPT[:W],CKPT[:W]")
    parser.add_argument("--ensemble", nargs="*", default=[], metavar="NAME=CKPT,CKPT",
                        help="models run together, their heatmaps averaged")
    parser.add_argument("--views", type=int, default=1, help="mirror views averaged (1, 2 or 4)")
    parser.add_argument("--sets", nargs="*", help="only these sets (default: all)")
    parser.add_argument("--seeds", type=int, help="at most this many seeds per set (a quicker look)")
    parser.add_argument("--quick", action="store_true", help="small series (a smoke test)")
    args = parser.parse_args(argv)

    import logging

    import numpy as np
    import torch

    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.infer import InferenceOptions
    from napari_spine_tracker.core.metrics import evaluate_tracks
    from napari_spine_tracker.core.models import load_model, model_from_checkpoint, resolve_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)  # the coarse-voxel hint, per series
    candidates = [(name, load_model(name, device="cpu")) for name in args.models]
    for item in args.mix:
        name, _, spec = item.partition("=")
        parts = []
        for part in spec.split(","):
            path, _, weight = part.partition(":")
            checkpoint = torch.load(resolve_model(path), map_location="cpu", weights_only=True)
            parts.append((checkpoint, float(weight or 1.0)))
        candidates.append((name, model_from_checkpoint(average_checkpoints(parts), device="cpu", name=name)))
    for item in args.ensemble:
        name, _, spec = item.partition("=")
        candidates.append((name, ensemble_model([load_model(path, device="cpu") for path in spec.split(",")])))
    options = InferenceOptions(views=args.views)
    sets = [s for s in SETS if not args.sets or s[0] in args.sets]

    small = {"sessions": 3, "shape": (16, 96, 96)} if args.quick else {}
    series = {}
    print("F1 / IDF1, means over seeds; mean4: the four synthetic cases")
    for name, model in candidates:
        rows = []
        for label, case, seeds, extra, first in sets:
            values = []
            for seed in seeds[: args.seeds]:
                key = (label, seed)
                if key not in series:
                    series[key] = synthesize_series(SynthConfig.preset(case, seed=seed, **{**extra, **small}))
                s = series[key]
                first_scored = min(first, s.image.shape[0] - 1)
                table = detect_series(s.image, s.voxel_size_um, model=model, options=options)
                scores = evaluate_tracks(table[table["t"] >= first_scored], s.truth[s.truth["t"] >= first_scored],
                                         s.voxel_size_um)
                values.append((scores["f1"], scores["idf1"]))
            rows.append((label, np.mean(values, axis=0)))
        synthetic = [v for label, v in rows if label in CASES]
        mean4 = np.mean(synthetic, axis=0) if len(synthetic) == 4 else None
        four = "" if mean4 is None else f" | mean4 {mean4[0]:.4f}/{mean4[1]:.4f}"
        print(f"{name[-22:]:22s} " + " ".join(f"{label} {v[0]:.3f}/{v[1]:.3f}" for label, v in rows) + four, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
