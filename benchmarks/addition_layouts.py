"""Which of the network's additions mix memory layouts or types: each residual addition of a
ResNeXt block and each decoder skip (``model._add_upsampled``) during one end-to-end detection,
with both operands' shapes, layouts and types.

On an H200 a generic (strided) elementwise kernel ran 60-94 times per 16x run, 21-29 ms of the
GPU's 115 ms (``results/gpu_session_h200_10.txt``, ``_11``): PyTorch falls back to it when the
operands of an addition differ in layout or type. On this CPU every residual addition's operands
share layout and type; this finds out whether they do on a GPU, under fp16 autocast. (The eighth
lease found most of them elsewhere: 60 were the convolutions' biases, which PyTorch's cuDNN path
adds as a broadcast after each convolution; a fused model now runs them inside cuDNN,
``model.use_cudnn_epilogues``, and 48 launches, 7.8 ms, remain: ``results/epilogues_h200.txt``.)

    python benchmarks/addition_layouts.py                     # the default preset's seed 1000 on the CPU
    python benchmarks/addition_layouts.py --device cuda --repeat-xy 4
"""

from __future__ import annotations

import argparse
import collections
import sys


def layout(tensor) -> str:
    """``channels-last``, ``contiguous`` or ``strided`` (a view of either), and the type."""
    import torch

    if tensor.is_contiguous(memory_format=torch.channels_last_3d) and tensor.dim() == 5:
        kind = "channels-last"
    elif tensor.is_contiguous():
        kind = "contiguous"
    else:
        kind = "strided"
    return f"{kind} {str(tensor.dtype).removeprefix('torch.')}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="default")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat-xy", type=int, default=1, help="tile the series N x N times in y and x")
    args = parser.parse_args(argv)

    import logging

    import numpy as np

    from napari_spine_tracker.core import model
    from napari_spine_tracker.core.detect import detect_series
    from napari_spine_tracker.core.models import load_model
    from napari_spine_tracker.core.synth import SynthConfig, synthesize_series

    logging.getLogger("napari_spine_tracker").setLevel(logging.ERROR)
    seen: collections.Counter = collections.Counter()
    block_forward, add_upsampled = model.ResNeXtBlock.forward, model._add_upsampled

    def residual(self, x):
        out = self.expand(self.grouped(self.reduce(x)))
        seen["residual", tuple(out.shape[1:2]), layout(out), layout(self.shortcut(x))] += 1
        return block_forward(self, x)

    def skip(fine, coarse):
        seen["decoder skip", tuple(fine.shape[1:2]), layout(fine), layout(coarse)] += 1
        return add_upsampled(fine, coarse)

    loaded = load_model("spinenet-synth", device=args.device)
    series = synthesize_series(SynthConfig.preset(args.case, seed=args.seed))
    image = np.tile(series.image, (1, 1, args.repeat_xy, args.repeat_xy))
    model.ResNeXtBlock.forward, model._add_upsampled = residual, skip
    try:
        detect_series(image, series.voxel_size_um, model=loaded)
    finally:
        model.ResNeXtBlock.forward, model._add_upsampled = block_forward, add_upsampled
    print(f"{args.case} seed {args.seed}: {image.shape} voxels on {loaded.device}")
    print("| addition | channels | result operand | added operand | calls | mixed |\n|---|---|---|---|---|---|")
    for (kind, channels, left, right), count in sorted(seen.items()):
        mixed = "yes" if left != right else ""
        print(f"| {kind} | {channels[0]} | {left} | {right} | {count} | {mixed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
